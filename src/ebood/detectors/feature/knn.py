"""Deep nearest neighbours (Sun et al., ICML 2022)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..._arrays import accumulation_dtype
from ...outputs import Outputs
from .. import _linalg as la
from ..base import register
from ._bank import _Bank
from ._common import _check_positive_int

__all__ = ["KNN"]


_INDEXES = ("flat", "ivf", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("knn: index='ivf' / 'hnsw' needs faiss (pip install faiss-cpu)") from exc
    return faiss


@register
class KNN(_Bank):
    """Deep nearest neighbours (Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep
    Nearest Neighbors", ICML 2022).

    Fit: the bank of L2-normalised training features ``z_i = x_i / ||x_i||``.
    Score: ``||z - z_(k)||``, the Euclidean distance from the normalised input to its k-th nearest
    bank row (the paper's score; its confidence is the negated distance, and its code uses the
    squared distance, a monotone transform; higher = more OOD). Default ``k = 50`` (the paper's
    CIFAR-10 setting and OpenOOD v1.5's). ``k`` larger than the bank is an error.

    ``index="flat"`` (default) is exact: the best candidates by inner product (``faiss.knn`` on
    float32 CPU tensors, else chunked products and ``torch.topk``; on unit vectors
    ``||a - b||^2 = 2 - 2 a.b``), then the distances around rank k recomputed from difference
    vectors, so that close neighbours lose no digits to ``2 - 2 a.b``
    (:func:`ebood.detectors._linalg.kth_from_candidates`).

    Approximate modes propose candidates that are then measured exactly; a query with fewer than
    ``k`` candidates falls back to the exact search:

    * ``index="ivf"``: an inverted file, ``nlist = 2 sqrt(N)`` lists from spherical k-means (faiss),
      each query searching its ``nprobe = ceil(nlist / 56)`` (about 1.8 %) closest lists, with one
      matrix product per list (:func:`ebood.detectors._linalg.ivf_top_k`). Saved as tensors.
    * ``index="hnsw"``: faiss ``IndexHNSWFlat`` (M = 32, efConstruction = 64,
      efSearch = max(128, 2 (k + 5))), saved serialised in a uint8 tensor.
    """

    name = "knn"
    paper = "Sun et al., ICML 2022"

    def __init__(self, k: int = 50, index: str = "flat") -> None:
        self.k = k
        self.index = index
        _check_positive_int(self.name, "k", k)
        if index not in _INDEXES:
            raise ValueError(f"knn: unknown index {index!r}; choose one of 'flat' (exact), 'ivf', 'hnsw' (approximate)")

    def _reset(self) -> None:
        super()._reset()
        self.bank_size_ = 0
        self.index_bytes_: torch.Tensor | None = None  # hnsw: the serialised faiss index
        self.ivf_centroids_: torch.Tensor | None = None  # ivf: (nlist, D)
        self.ivf_offsets_: torch.Tensor | None = None  # ivf: list l holds bank_ rows offsets[l]:offsets[l+1]

    def _accumulate(self, batch: Outputs) -> None:
        x = batch.feature()
        self._append(la.normalise_finite_rows(x.to(accumulation_dtype(x.dtype)), "features", self.name))

    # ----- fit ---------------------------------------------------------------------------------
    def _finalize(self) -> None:
        grew = bool(getattr(self, "_pending", []))
        bank = self._collect_bank()
        self.bank_size_ = int(bank.shape[0])
        self._check_k(self.k)
        if self.index == "ivf" and (grew or self.ivf_centroids_ is None):
            self._build_ivf(bank)
        elif self.index == "hnsw" and (grew or self.index_bytes_ is None):
            self._index = self._build_hnsw(bank)
            self.index_bytes_ = torch.from_numpy(_faiss().serialize_index(self._index).copy())

    @staticmethod
    def _ivf_shape(n: int) -> tuple[int, int]:
        nlist = max(1, min(int(round(2 * math.sqrt(n))), n // 39))
        return nlist, max(1, math.ceil(nlist / 56))

    def _build_ivf(self, bank: torch.Tensor) -> None:
        nlist, _ = self._ivf_shape(bank.shape[0])
        centroids, lists = la.ivf_lists(bank, nlist)
        order = torch.argsort(lists, stable=True)
        self.bank_ = bank[order]  # the bank sorted by list (its order does not matter to KNN)
        counts = torch.bincount(lists, minlength=nlist)
        self.ivf_offsets_ = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self.ivf_centroids_ = centroids

    def _build_hnsw(self, bank: torch.Tensor) -> Any:
        faiss = _faiss()
        data = np.ascontiguousarray(bank.detach().to("cpu", torch.float32).numpy())
        index = faiss.IndexHNSWFlat(data.shape[1], 32)
        index.hnsw.efConstruction = 64
        index.add(data)
        self._tune_hnsw(index)
        return index

    def _tune_hnsw(self, index: Any) -> None:
        index.hnsw.efSearch = max(128, 2 * (self.k + la.WINDOW + 1))

    def _load_hnsw(self) -> Any:
        faiss = _faiss()
        try:
            index = faiss.deserialize_index(np.ascontiguousarray(self.index_bytes_.cpu().numpy()))
        except RuntimeError as exc:
            raise ValueError(f"index_bytes_ is not a valid faiss index: {str(exc).splitlines()[0]}") from None
        self._tune_hnsw(index)
        return index

    def _check_state(self) -> None:
        super()._check_state()
        n, d = self.bank_.shape
        kept = {"hnsw": self.index_bytes_ is not None, "ivf": self.ivf_centroids_ is not None or self.ivf_offsets_ is not None}
        for other, present in kept.items():
            if other != self.index and present:
                raise ValueError(f"the state holds an {other} index, but index={self.index!r}")
        if self.index == "hnsw":
            b = self.index_bytes_
            if not isinstance(b, torch.Tensor) or b.dtype != torch.uint8 or b.ndim != 1:
                raise ValueError("index='hnsw' needs index_bytes_, a 1-D uint8 tensor (a serialised faiss index)")
            index = self._load_hnsw()
            if index.ntotal != n or index.d != d:
                raise ValueError(f"the faiss index holds {index.ntotal} vectors of dimension {index.d}, bank_ has shape {(n, d)}")
            self._index = index
        elif self.index == "ivf":
            c, o = self.ivf_centroids_, self.ivf_offsets_
            if not isinstance(c, torch.Tensor) or not isinstance(o, torch.Tensor) or c.ndim != 2 or c.shape[1] != d or o.shape != (c.shape[0] + 1,):
                shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in (c, o)]
                raise ValueError(f"ivf_centroids_ {shapes[0]} and ivf_offsets_ {shapes[1]} must be (nlist, {d}) and (nlist + 1,)")
            if int(o[0]) != 0 or int(o[-1]) != n or bool((o[1:] < o[:-1]).any()):
                raise ValueError(f"ivf_offsets_ must rise from 0 to the bank size {n}")

    # ----- scoring ----------------------------------------------------------------------------
    def _score(self, outputs: Outputs) -> torch.Tensor:
        x = self._features(outputs, self.bank_.shape[1])
        acc = accumulation_dtype(x.dtype)
        bank = self.bank_.to(x.device, acc)
        queries = la.normalise_rows(x.to(acc))
        if self.index == "flat":
            out = la.kth_neighbour_distance(queries, bank, self.k)
        else:
            out = self._approximate(queries, bank)
        return self._finite_scores(out, x)

    def _candidates(self, queries: torch.Tensor, bank: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate best candidates: similarities (decreasing, ``-inf`` when missing) and rows."""
        if self.index == "ivf":
            _, nprobe = self._ivf_shape(bank.shape[0])
            centroids = self.ivf_centroids_.to(queries.device, queries.dtype)
            return la.ivf_top_k(queries, bank, centroids, self.ivf_offsets_, nprobe, kk)
        data = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        dist_sq, ids = self._index.search(data, kk)
        index = torch.from_numpy(ids).to(queries.device)
        values = torch.from_numpy(1.0 - dist_sq / 2.0).to(queries.device, queries.dtype)  # unit vectors
        values[index < 0] = -math.inf
        return values, index.clamp_min(0)

    def _approximate(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        kk = min(bank.shape[0], self.k + la.WINDOW + 1)
        values, index = self._candidates(queries, bank, kk)
        out = la.kth_from_candidates(queries, bank, values, index, self.k, exhaustive=False)
        valid = torch.isfinite(values)
        partial = torch.nonzero(~valid.all(dim=1))[:, 0]  # fewer than kk candidates found
        if partial.numel():
            q = queries[partial]
            dist = la.candidate_distances(q, bank, index[partial])
            dist[~valid[partial]] = math.inf
            short = valid[partial].sum(dim=1) < self.k
            out[partial] = torch.kthvalue(dist, self.k, dim=1).values
            if bool(short.any()):
                out[partial[short]] = la.kth_neighbour_distance(q[short], bank, self.k)
        return out

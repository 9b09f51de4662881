"""Exact KNN over a bank kept in shards across the cluster.

Fit: every block of the training data becomes one shard of the bank (its L2-normalised rows, as
in :class:`ebood.detectors.KNN`), left in Ray's object store: the bank is never gathered on the
driver. Score: each batch of queries asks every shard for its ``k`` nearest exact distances and
keeps the ``k`` smallest of all answers. The k-th smallest distance over the union of the shards
is the k-th smallest of the union of each shard's k smallest, so the merged answer is exact, and
every distance is computed as the single-process detector computes it (``||q - b||`` from the
difference vector), so the scores equal those of single-process exact KNN.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np
import torch

from .._arrays import accumulation_dtype
from ..detectors import _linalg as la
from ..detectors.base import NotFittedError
from ..metrics import id_threshold
from ..outputs import Outputs
from ._source import batch_outputs

BANK_COLUMN = "z"


def k_smallest_distances(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """The ``min(k, len(bank))`` smallest exact distances ``||q - b||`` per (unit) query, ascending.

    Candidates are the rows of largest inner product (``||a - b||^2 = 2 - 2 a.b`` on unit rows).
    With ``e`` the rounding margin of the similarities, a row whose similarity is more than ``2e``
    below the k-th best cannot be among the k nearest; when the candidate list reaches below that
    line, the k nearest are among the candidates, whose distances are then computed exactly. The
    other queries (near-equal similarities) get every row above the line measured."""
    m = bank.shape[0]
    kq = min(k, m)
    kk = min(m, k + la.WINDOW + 1)
    values, index = la.top_k_similarities(queries, bank, kk)
    values, index = values.to(queries.device), index.to(queries.device)
    eps2 = 2 * la.similarity_error(bank.shape[1], queries.dtype)
    threshold = values[:, kq - 1] - eps2
    safe = torch.ones(queries.shape[0], dtype=torch.bool, device=queries.device) if kk == m else values[:, -1] < threshold
    dist = la.candidate_distances(queries, bank, index)
    out = torch.sort(dist, dim=1).values[:, :kq]
    unsafe = torch.nonzero(~safe)[:, 0]
    if unsafe.numel():
        q = queries[unsafe]
        sim = q @ bank.T
        count = int((sim >= threshold[unsafe, None]).sum(dim=1).max())
        rows = torch.topk(sim, max(kq, count), dim=1, sorted=False).indices
        out[unsafe] = torch.sort(la.candidate_distances(q, bank, rows), dim=1).values[:, :kq]
    return out


def _shard_numpy(table: Any) -> np.ndarray:
    col = table.column(BANK_COLUMN)
    col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    n = len(col)
    return col.flatten().to_numpy(zero_copy_only=False).reshape(n, -1)


def shard_from_batch(table: Any, *, spec: Mapping[str, Any], widths: Mapping[str, int], files: list[str] | None) -> Any:
    """Ray Data UDF: the block's rows, L2-normalised in the accumulation dtype (as KNN's fit)."""
    import pyarrow as pa

    x = batch_outputs(table, spec, widths, files, None).feature()
    z = la.normalise_rows(x.to(accumulation_dtype(x.dtype))).numpy()
    values = pa.array(np.ascontiguousarray(z).reshape(-1))
    return pa.table({BANK_COLUMN: pa.FixedSizeListArray.from_arrays(values, z.shape[1])})


def shard_shape(table: Any) -> tuple[int, int, str]:
    z = _shard_numpy(table)
    return int(z.shape[0]), int(z.shape[1]) if z.ndim == 2 else 0, str(z.dtype)


class ShardedKNN:
    """A fitted exact KNN (``index="flat"``) whose bank lies in shards in the Ray object store.

    Scores like :class:`ebood.detectors.KNN` (``||z - z_(k)||``, the distance from the normalised
    input to its k-th nearest normalised training row; higher = more OOD). ``gather()`` builds the
    ordinary detector (on the driver: the whole bank must fit there) to save it.
    """

    name = "knn"
    requires = ("features",)
    needs_fit = True

    def __init__(self, k: int, shards: list[Any], sizes: list[int], dim: int, dtype: str) -> None:
        self.k = k
        self.shards = shards  # ObjectRefs of pyarrow tables holding one fixed-size-list column
        self.sizes = sizes
        self.dim = dim
        self.dtype = dtype
        self.threshold_: float | None = None

    def __repr__(self) -> str:
        return f"ShardedKNN(k={self.k}, shards={len(self.shards)}, bank={sum(self.sizes)}x{self.dim})"

    @property
    def bank_size(self) -> int:
        return int(sum(self.sizes))

    def get_params(self) -> dict[str, Any]:
        return {"k": self.k, "index": "flat"}

    def score(self, outputs: Outputs) -> torch.Tensor:
        """OOD scores of ``outputs`` (runs where it is called; the shards are fetched one by one)."""
        import ray

        x = outputs.feature()
        if x.shape[1] != self.dim:
            raise ValueError(f"detector 'knn': features have dimension {x.shape[1]}, the detector was fitted on dimension {self.dim} (it expects {self.dim})")
        la.check_finite(x, "features", self.name)
        acc = accumulation_dtype(x.dtype)
        queries = la.normalise_rows(x.to(acc))
        best: torch.Tensor | None = None
        for ref in self.shards:
            with warnings.catch_warnings():  # the shard is read-only shared memory; nothing writes to it
                warnings.simplefilter("ignore", UserWarning)
                bank = torch.from_numpy(_shard_numpy(ray.get(ref))).to(acc)
            part = k_smallest_distances(queries, bank, self.k)
            best = part if best is None else torch.sort(torch.cat([best, part], dim=1), dim=1).values[:, : self.k]
        return best[:, self.k - 1]

    def calibrate(self, id_outputs: Outputs, tpr: float = 0.95) -> "ShardedKNN":
        """Set ``threshold_`` as :meth:`ebood.detectors.Detector.calibrate` does."""
        self.threshold_ = id_threshold(self.score(id_outputs), tpr)
        return self

    def predict(self, outputs: Outputs) -> torch.Tensor:
        if self.threshold_ is None:
            raise NotFittedError("detector 'knn' has no threshold: call calibrate() on ID validation outputs first")
        return self.score(outputs) > self.threshold_

    def gather(self) -> Any:
        """The ordinary :class:`ebood.detectors.KNN` with the whole bank (on the driver)."""
        import ray

        from ..detectors import create

        det = create("knn", k=self.k)
        det._reset()
        for table in ray.get(list(self.shards)):
            det._append(torch.from_numpy(_shard_numpy(table).copy()))
        det._finish_fit()
        det._ensure_final()
        det.threshold_ = self.threshold_
        return det

    def save(self, path: Any) -> Any:
        """Save as an ordinary KNN detector (gathers the bank)."""
        return self.gather().save(path)

"""Linear-algebra kernels shared by the feature-based detectors (``detectors/feature.py``).

* Streaming class-conditional moments (counts, means, within-class scatter) in float64, combined
  batch by batch and across workers with the pairwise update of Chan, Golub & LeVeque (1979), so
  that a merge of partial fits equals one fit on all data and no raw second moment (which cancels)
  is ever formed.
* The inverse square root of a covariance (a pseudo-inverse with scipy's ``pinvh`` rank rule when
  it is singular), and the nearest class-conditional Gaussian found with one matrix product and
  recomputed without cancellation.
* Exact k-nearest-neighbour search on L2-normalised features: chunked matrix products with
  ``torch.topk`` on the similarity, the k-th distance recomputed from the difference vectors.
* A mergeable uniform sample of rows (bottom-k sketch over a hash of the row), for statistics that
  need the data again after the fit (ViM's alpha).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Iterator

import numpy as np
import torch

from ..scores import CHUNK_BYTES

__all__ = [
    "row_slices",
    "check_finite",
    "check_labels",
    "ClassMoments",
    "class_moments",
    "merge_moments",
    "total_moments",
    "inverse_sqrt",
    "nearest_whitened",
    "normalise_rows",
    "kth_neighbour_distance",
    "top_k_similarity_mean",
    "row_keys",
    "bottom_k_rows",
]

#: Budget of one chunk of a similarity matrix (queries x bank) in the neighbour searches: larger
#: than the general chunk budget, because a matrix product with few rows is slow.
SEARCH_CHUNK_BYTES = 512 * 2**20


# ----- small checks ------------------------------------------------------------------------------


#: Default budget of the temporaries of one chunk of rows. Below glibc's largest mmap threshold
#: (32 MiB), so that freed chunks are reused instead of being mapped (and page-faulted) afresh.
WORK_BYTES = min(CHUNK_BYTES, 16 * 2**20)


def row_slices(n: int, bytes_per_row: int, budget: int = WORK_BYTES) -> Iterator[slice]:
    """Consecutive row slices whose temporaries (``bytes_per_row`` each) stay within ``budget``."""
    rows = max(1, budget // max(1, bytes_per_row))
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def check_finite(x: torch.Tensor, what: str, detector: str) -> None:
    """A ValueError naming the rows when ``x`` holds NaN or inf."""
    if x.numel() == 0:
        return
    low, high = torch.aminmax(x)  # one read, no temporary; NaN propagates
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.reshape(bad.shape[0], -1).any(dim=1) if x.ndim > 1 else bad
        first = int(torch.nonzero(rows)[0, 0])
        raise ValueError(
            f"detector {detector!r}: {what} has non-finite values (NaN or inf) in {int(rows.sum())} sample(s), first at index {first}"
        )


def check_labels(labels: torch.Tensor, num_classes: int | None, detector: str) -> None:
    """Labels must be class indices ``0..num_classes-1`` (``>= 0`` when the count is unknown)."""
    if labels.numel() == 0:
        return
    bad = labels < 0 if num_classes is None else (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        values = torch.unique(labels[bad]).tolist()
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        allowed = "class indices >= 0" if num_classes is None else f"class indices in 0..{num_classes - 1} ({num_classes} classes)"
        raise ValueError(f"detector {detector!r}: labels must be {allowed}; got label(s) {shown} in {int(bad.sum())} sample(s)")


def as_float64(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float64. On the CPU through numpy: its single-threaded cast is memory-bound and
    does not stall behind busy cores the way a threaded torch cast does."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16) and not x.requires_grad:
        return torch.from_numpy(x.numpy().astype(np.float64))
    return x.to(torch.float64)


def column_sums(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(0)`` accumulated in float64 (numpy on the CPU, for the reason of :func:`as_float64`)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16, torch.float64) and not x.requires_grad:
        return torch.from_numpy(np.add.reduce(x.numpy(), axis=0, dtype=np.float64))
    return x.sum(dim=0, dtype=torch.float64)


# ----- streaming class-conditional moments -------------------------------------------------------

ClassMoments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(counts (C,), means (C, D), within-class scatter (D, D))``, all float64."""


def class_moments(x: torch.Tensor, labels: torch.Tensor, num_classes: int, device: torch.device | None = None) -> ClassMoments:
    """Counts, class means and within-class scatter ``sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T`` of
    one batch, in float64. The scatter is formed from rows centred by their class mean (no
    cancellation), over chunks of rows (bounded temporaries)."""
    device = x.device if device is None else device
    labels = labels.to(x.device)
    d = x.shape[1]
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    sums = torch.zeros(num_classes, d, dtype=torch.float64, device=x.device)
    chunks = list(row_slices(x.shape[0], 3 * d * 8))
    for rows in chunks:
        sums.index_put_((labels[rows],), as_float64(x[rows]), accumulate=True)  # index_add_ is slow on CPU
    means = sums / counts.clamp_min(1.0)[:, None]
    scatter = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    for rows in chunks:
        centred = as_float64(x[rows]) - means[labels[rows]]
        scatter.addmm_(centred.T, centred)
    return counts.to(device), means.to(device), scatter.to(device)


def merge_moments(a: ClassMoments, b: ClassMoments) -> ClassMoments:
    """Moments of the union of two sets (Chan et al.'s pairwise update, per class)."""
    na, ma, sa = a
    nb, mb, sb = b
    n = na + nb
    wb = torch.where(n > 0, nb / n.clamp_min(1.0), torch.zeros_like(n))
    delta = mb - ma
    means = ma + wb[:, None] * delta
    # sum_c (na nb / n) delta_c delta_c^T over the classes present on both sides, as one product
    both = torch.nonzero((na > 0) & (nb > 0))[:, 0]
    scatter = sa + sb
    if both.numel():
        d = delta[both]
        w = (na[both] * nb[both] / n[both])[:, None]
        scatter = scatter.addmm(d.T, d * w)
    return n, means, scatter


def pad_classes(m: ClassMoments, num_classes: int) -> ClassMoments:
    """The same moments over ``num_classes >= C`` classes (the new ones empty)."""
    counts, means, scatter = m
    extra = num_classes - counts.shape[0]
    if extra <= 0:
        return m
    counts = torch.cat([counts, counts.new_zeros(extra)])
    means = torch.cat([means, means.new_zeros(extra, means.shape[1])])
    return counts, means, scatter


def total_moments(m: ClassMoments) -> tuple[float, torch.Tensor, torch.Tensor]:
    """``(N, mean, total scatter)`` of all samples: within-class plus between-class scatter."""
    counts, means, scatter = m
    n = float(counts.sum())
    mean = (counts[:, None] * means).sum(dim=0) / n
    d = means - mean
    return n, mean, scatter + (d * counts[:, None]).T @ d


# ----- covariance -------------------------------------------------------------------------------


def inverse_sqrt(cov: torch.Tensor, detector: str, what: str = "covariance") -> torch.Tensor:
    """``W`` (D, r) with ``W W^T = pinv(cov)``: ``W = V_r diag(lambda_r^-1/2)`` over the eigenvalues
    above ``D * eps * lambda_max`` (scipy ``pinvh``'s rank rule, as sklearn's EmpiricalCovariance).

    A rank below D (fewer samples than dimensions, constant or collinear features) is warned about:
    the pseudo-inverse measures distances only inside the span of the data."""
    cov = (cov + cov.T) / 2
    vals, vecs = torch.linalg.eigh(cov)
    top = float(vals.max()) if vals.numel() else 0.0
    if not math.isfinite(top):
        raise ValueError(f"detector {detector!r}: the {what} has non-finite entries")
    if top <= 0:
        raise ValueError(f"detector {detector!r}: the {what} is zero (all training features are identical)")
    keep = vals > cov.shape[0] * torch.finfo(cov.dtype).eps * top
    rank = int(keep.sum())
    if rank < cov.shape[0]:
        warnings.warn(
            f"{detector}: the {what} is singular (rank {rank} of {cov.shape[0]}: fewer samples than dimensions, "
            "or constant / collinear features); using its pseudo-inverse, which ignores the directions without variance",
            RuntimeWarning,
            stacklevel=2,
        )
    return vecs[:, keep] / torch.sqrt(vals[keep])


def nearest_whitened(y: torch.Tensor, class_centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``min_c ||y - m_c||^2`` and its argmin, for whitened rows ``y`` (n, r) and whitened class
    means ``m_c`` (K, r).

    The expanded form ``||y||^2 - 2 y.m_c + ||m_c||^2`` (one matrix product with K columns)
    ranks the classes but cancels when ``||y||`` and ``||m_c||`` are large against their distance.
    So the distance to the best class is recomputed as ``||y - m_c||^2``; where the runner-up is
    within twice the rounding bound ``4 r eps (||y||^2 + max_c ||m_c||^2)`` of the best, the ranking
    itself is uncertain and every class within that margin is recomputed the same way.
    """
    n, r = y.shape
    if class_centres.shape[0] == 1:
        return torch.linalg.vector_norm(y - class_centres[0], dim=1).square(), torch.zeros(n, dtype=torch.long, device=y.device)
    centre_sq = class_centres.square().sum(dim=1)
    approx = torch.addmm(centre_sq, y, class_centres.T, alpha=-2.0)  # ||m_c||^2 - 2 y.m_c
    top2, idx2 = torch.topk(approx, 2, dim=1, largest=False)
    best = idx2[:, 0].clone()
    dist = torch.linalg.vector_norm(y - class_centres[best], dim=1).square()
    y_sq = (dist - top2[:, 0]).abs()  # ||y||^2, up to rounding
    margin = 8 * r * torch.finfo(y.dtype).eps * (y_sq + centre_sq.max())
    unsure = torch.nonzero(top2[:, 1] - top2[:, 0] <= margin)[:, 0]
    if unsure.numel():
        near = approx[unsure] <= (top2[unsure, :1] + margin[unsure, None])
        for i, row in zip(unsure.tolist(), near):
            cand = torch.nonzero(row)[:, 0]
            exact = torch.linalg.vector_norm(y[i] - class_centres[cand], dim=1).square()
            j = int(exact.argmin())
            dist[i], best[i] = exact[j], cand[j]
    return dist, best


# ----- neighbour search -------------------------------------------------------------------------


def normalise_rows(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||`` per row (an all-zero row stays zero)."""
    return torch.nn.functional.normalize(x, dim=1, eps=torch.finfo(x.dtype).tiny ** 0.5)


def _similarity_chunks(queries: torch.Tensor, bank: torch.Tensor, k: int, sort: bool = False) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """``(rows, top-k similarities, their bank indices)`` for chunks of queries."""
    bank_t = bank.T
    for rows in row_slices(queries.shape[0], bank.shape[0] * queries.element_size(), SEARCH_CHUNK_BYTES):
        sim = queries[rows] @ bank_t
        values, index = torch.topk(sim, k, dim=1, sorted=sort)
        del sim
        yield rows, values, index


#: ranks on each side of the k-th whose distances are recomputed exactly
WINDOW = 4


def similarity_error(dim: int, dtype: torch.dtype) -> float:
    """Rounding margin of an inner product of two unit vectors of ``dim`` entries computed in
    ``dtype``: ``4 sqrt(dim) eps``, four times the typical error of a sum of ``dim`` rounded
    products (the worst case ``dim * eps`` is never approached by blocked FMA products), which also
    covers the deviation of the normalised rows' norms from 1."""
    return 4 * math.sqrt(dim) * torch.finfo(dtype).eps


def kth_neighbour_distance(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean distance from each (unit) query to its k-th nearest row of ``bank`` (unit rows).

    On unit vectors ``||a - b||^2 = 2 - 2 a.b``: the nearest rows are those of largest inner
    product, found with one chunked matrix product and ``torch.topk``. ``2 - 2 a.b`` cancels for
    close neighbours, so distances are recomputed from difference vectors: for the candidates of
    rank ``k - WINDOW .. k + WINDOW`` when the similarity gaps at both edges of that window exceed
    twice the rounding margin ``eps`` of :func:`similarity_error` (no row outside can then swap
    with one inside); otherwise for every row whose similarity is within ``2 eps`` of the k-th
    largest (a set that surely holds the k nearest rows).
    """
    n_bank = bank.shape[0]
    lo = max(0, k - 1 - WINDOW)
    kk = min(n_bank, k + WINDOW + 1)  # ranks 0..kk-1; the window is lo..hi-1
    hi = kk - 1 if kk < n_bank else kk
    eps2 = 2 * similarity_error(bank.shape[1], queries.dtype)
    out = torch.empty(queries.shape[0], dtype=queries.dtype, device=queries.device)
    bank_t = bank.T
    for rows in row_slices(queries.shape[0], n_bank * queries.element_size(), SEARCH_CHUNK_BYTES):
        q = queries[rows]
        sim = q @ bank_t
        values, index = torch.topk(sim, kk, dim=1)
        safe = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
        if hi < kk:
            safe &= values[:, hi - 1] - values[:, hi] > eps2
        if lo > 0:
            safe &= values[:, lo - 1] - values[:, lo] > eps2
        result = torch.kthvalue(_distances(q, bank, index[:, lo:hi]), k - lo, dim=1).values
        unsafe = torch.nonzero(~safe)[:, 0]
        if unsafe.numel():
            result[unsafe] = _kth_within_margin(q[unsafe], sim[unsafe], bank, values[unsafe, k - 1] - eps2, k)
        del sim
        out[rows] = result
    return out


def _distances(queries: torch.Tensor, bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``||q_i - bank[index_ij]||`` (n, m), from difference vectors, in bounded chunks."""
    dist = torch.empty(index.shape, dtype=queries.dtype, device=queries.device)
    per_row = max(1, index.shape[1]) * bank.shape[1] * queries.element_size() * 2
    for sub in row_slices(queries.shape[0], per_row):
        dist[sub] = torch.linalg.vector_norm(queries[sub, None, :] - bank[index[sub]], dim=2)
    return dist


def _kth_within_margin(q: torch.Tensor, sim: torch.Tensor, bank: torch.Tensor, threshold: torch.Tensor, k: int) -> torch.Tensor:
    """k-th distance from exact distances to the rows of similarity >= ``threshold`` (per query).

    Rows below the threshold are farther than the k computed best, so the k nearest are among
    those above; candidates beyond a query's own count are real bank rows too, which cannot change
    its k-th smallest distance."""
    count = int((sim >= threshold[:, None]).sum(dim=1).max())
    index = torch.topk(sim, max(k, count), dim=1, sorted=False).indices
    return torch.kthvalue(_distances(q, bank, index), k, dim=1).values


def exact_kth_from_candidates(queries: torch.Tensor, bank: torch.Tensor, index: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest exact distance among candidate bank rows ``index`` (n, m >= k)."""
    return torch.kthvalue(_distances(queries, bank, index), k, dim=1).values


def top_k_similarity_mean(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest inner products of each query with the rows of ``bank``."""
    out = torch.empty(queries.shape[0], dtype=queries.dtype, device=queries.device)
    for rows, values, _ in _similarity_chunks(queries, bank, k):
        out[rows] = values.to(torch.float64).mean(dim=1).to(out.dtype)
    return out


# ----- a mergeable uniform sample of rows -------------------------------------------------------

_HASH_SEED = 0x5EED_EB00D


@functools.lru_cache(maxsize=16)
def _hash_weights(dim: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(_HASH_SEED)
    w = torch.randint(-(2**62), 2**62, (dim,), generator=g, dtype=torch.int64) | 1
    return w.to(device)


def row_keys(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash of each row's float32 bit pattern: the same row always gets the same key.

    Integer arithmetic wraps modulo 2**64, so the key does not depend on the summation order."""
    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    h = (bits * _hash_weights(x.shape[1], x.device)).sum(dim=1)
    # the splitmix64 finaliser (torch shifts int64 arithmetically: mask to a logical shift)
    h = h ^ _shift_right(h, 30)
    h = h * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed int64
    h = h ^ _shift_right(h, 27)
    h = h * -7723592293110705685  # 0x94d049bb133111eb
    return h ^ _shift_right(h, 31)


def _shift_right(h: torch.Tensor, s: int) -> torch.Tensor:
    return (h >> s) & ((1 << (64 - s)) - 1)


def bottom_k_rows(rows: torch.Tensor, keys: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``size`` rows of smallest key, sorted by key: a uniform sample without replacement that
    is the same whichever way the data were split into batches or partial fits."""
    order = torch.argsort(keys, stable=True)[:size]
    return rows[order], keys[order]

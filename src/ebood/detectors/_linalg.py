"""Linear-algebra kernels shared by the feature-based detectors (``detectors/feature/``).

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
from typing import Callable, Iterator

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
    "top_k_similarities",
    "kth_neighbour_distance",
    "kth_from_candidates",
    "candidate_distances",
    "top_k_similarity_mean",
    "ivf_lists",
    "ivf_top_k",
    "row_keys",
    "bottom_k_order",
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


def as_float64(x: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """``x`` in float64 (a new tensor if ``copy``, which a float64 ``x`` otherwise is not). On the
    CPU through numpy: its single-threaded cast is memory-bound and does not stall behind busy
    cores the way a threaded torch cast does."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16) and not x.requires_grad:
        return torch.from_numpy(x.numpy().astype(np.float64))
    return x.to(torch.float64, copy=copy)


# ----- streaming class-conditional moments -------------------------------------------------------

ClassMoments = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(counts (C,), means (C, D), within-class scatter (D, D))``, all float64."""


def _class_moments_numpy(x: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, ...]:
    """:func:`class_moments` on the CPU, all in numpy / scipy (BLAS ``dsyrk`` for the Gram
    matrix): interleaving torch's threaded operations would leave its spinning worker threads
    competing with the BLAS threads."""
    import scipy.sparse
    from scipy.linalg.blas import dsyrk

    n, d = x.shape
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    reference = x[0].astype(np.float64) if n else np.zeros(d)
    shifted_sums = np.zeros((num_classes, d))
    gram = np.zeros((d, d), order="F")
    for rows in row_slices(n, 2 * d * 8):
        y = labels[rows]
        c = x[rows].astype(np.float64)
        c -= reference
        one_hot = scipy.sparse.csr_matrix((np.ones(y.size), (y, np.arange(y.size))), shape=(num_classes, y.size))
        shifted_sums += one_hot @ c
        gram = dsyrk(1.0, c.T, beta=1.0, c=gram, trans=0, lower=0, overwrite_c=1)  # upper triangle
    return counts, reference, shifted_sums, np.ascontiguousarray(gram)


def _add_gram_torch(out: torch.Tensor, c: torch.Tensor) -> None:
    """``out += c^T c`` on the upper block triangle only (4 column blocks: 10 of the 16 block
    products; torch has no symmetric rank-k update). The lower triangle of ``out`` stays stale."""
    d = c.shape[1]
    if d < 256:
        out.addmm_(c.T, c)
        return
    edges = [round(i * d / 4) for i in range(5)]
    for a, b in zip(edges[:-1], edges[1:]):
        out[a:b, a:].addmm_(c[:, a:b].T, c[:, a:])


def mirror_upper(m: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is that of ``m``."""
    return torch.triu(m) + torch.triu(m, diagonal=1).T


def class_moments(x: torch.Tensor, labels: torch.Tensor, num_classes: int, device: torch.device | None = None) -> ClassMoments:
    """Counts, class means and within-class scatter ``sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T`` of
    one batch, in float64, in one pass over chunks of rows.

    Rows are shifted by the batch's first row ``r`` (removing any common offset of the features),
    ``G = sum_i c_i c_i^T`` of the shifted rows ``c = x_i - r`` is accumulated with a symmetric
    rank-k update (BLAS ``dsyrk`` on the CPU, the upper block triangle elsewhere), and
    ``S = G - sum_k n_k d_k d_k^T`` with ``d_k = mu_k - r``. The subtraction costs float64 about
    ``log10(||d_k||^2 / within-class variance)`` digits: one or two for class-structured
    features, leaving some 14."""
    device = x.device if device is None else device
    n, d = x.shape
    labels = labels.to(x.device)
    if x.device.type == "cpu":
        data = x.detach()
        if data.dtype not in (torch.float16, torch.float32, torch.float64):
            data = data.to(torch.float32)
        parts = _class_moments_numpy(data.numpy(), labels.numpy(), num_classes)
        counts, reference, shifted_sums, gram = (torch.from_numpy(a) for a in parts)
    else:
        counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
        reference = x[0].to(torch.float64) if n else torch.zeros(d, dtype=torch.float64, device=x.device)
        shifted_sums = torch.zeros(num_classes, d, dtype=torch.float64, device=x.device)
        gram = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        for rows in row_slices(n, 2 * d * 8):
            y = labels[rows]
            c = x[rows].to(torch.float64) - reference
            shifted_sums.index_put_((y,), c, accumulate=True)
            _add_gram_torch(gram, c)
    shift = shifted_sums / counts.clamp_min(1.0)[:, None]
    scatter = mirror_upper(gram) - (shift * counts[:, None]).T @ shift
    means = reference + shift
    means[counts == 0] = 0
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
    d = cov.shape[0]
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        # fast path: W = L^-T from the Cholesky factor cov = L L^T, kept only when surely far from
        # the pinvh cut: lambda_min >= 1 / ||W||_F^2 and lambda_max <= trace(cov)
        w = torch.linalg.solve_triangular(chol, torch.eye(d, dtype=cov.dtype, device=cov.device), upper=False).T
        bound = float(w.square().sum()) * float(torch.trace(cov))
        if math.isfinite(bound) and bound * 1e3 * d * torch.finfo(cov.dtype).eps < 1:
            return w
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


def normalise_finite_rows(x: torch.Tensor, what: str, detector: str) -> torch.Tensor:
    """:func:`normalise_rows` with :func:`check_finite`'s error, in one read less: a row holding
    NaN or inf has a non-finite norm, so the full check only runs when a norm is not finite."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        check_finite(x, what, detector)
    return x / norms.clamp_min(torch.finfo(x.dtype).tiny ** 0.5)


def _faiss_inputs(queries: torch.Tensor, bank: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """numpy views for faiss when both are contiguous float32 CPU tensors (else None)."""
    if queries.device.type != "cpu" or bank.device.type != "cpu" or queries.dtype != torch.float32 or bank.dtype != torch.float32:
        return None
    if queries.requires_grad or bank.requires_grad:
        return None
    try:
        import faiss  # noqa: F401
    except ImportError:  # pragma: no cover - faiss-cpu is a dependency
        return None
    return np.ascontiguousarray(queries.numpy()), np.ascontiguousarray(bank.numpy())


def top_k_similarities(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest inner products of each query with the bank rows, in decreasing order,
    and their bank indices: exact search, by ``faiss.knn`` on float32 CPU tensors (blocked
    products merged into per-query heaps: no (queries x bank) matrix), else chunked products and
    ``torch.topk``."""
    arrays = _faiss_inputs(queries, bank)
    if arrays is not None:
        import faiss

        values, index = faiss.knn(arrays[0], arrays[1], k, metric=faiss.METRIC_INNER_PRODUCT)
        return torch.from_numpy(values), torch.from_numpy(index)
    values = torch.empty(queries.shape[0], k, dtype=queries.dtype, device=queries.device)
    index = torch.empty(queries.shape[0], k, dtype=torch.long, device=queries.device)
    bank_t = bank.T
    for rows in row_slices(queries.shape[0], bank.shape[0] * queries.element_size(), SEARCH_CHUNK_BYTES):
        values[rows], index[rows] = torch.topk(queries[rows] @ bank_t, k, dim=1)
    return values, index


#: ranks on each side of the k-th whose distances are recomputed exactly
WINDOW = 4


def similarity_error(dim: int, dtype: torch.dtype) -> float:
    """Rounding margin of an inner product of two unit vectors of ``dim`` entries computed in
    ``dtype``: ``sqrt(dim) eps``. A sum of ``dim`` rounded products errs by about
    ``sqrt(dim) eps / 2`` at most in practice (the worst case ``dim * eps`` needs every rounding
    in the same direction; blocked FMA products stay far below: 0.4 sqrt(dim) eps / 2 measured on
    50000 x 10000 pairs of 512-dimensional features); the margin also covers the deviation of the
    normalised rows' norms from 1."""
    return math.sqrt(dim) * torch.finfo(dtype).eps


def kth_neighbour_distance(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean distance from each (unit) query to its k-th nearest row of ``bank`` (unit rows).

    On unit vectors ``||a - b||^2 = 2 - 2 a.b``: the nearest rows are those of largest inner
    product (:func:`top_k_similarities`). ``2 - 2 a.b`` cancels for close neighbours, so the
    distance is recomputed from difference vectors (:func:`kth_from_candidates`)."""
    kk = min(bank.shape[0], k + WINDOW + 1)
    values, index = top_k_similarities(queries, bank, kk)
    return kth_from_candidates(queries, bank, values, index, k, complete=kk == bank.shape[0])


def kth_from_candidates(
    queries: torch.Tensor, bank: torch.Tensor, values: torch.Tensor, index: torch.Tensor, k: int, complete: bool = False, exhaustive: bool = True
) -> torch.Tensor:
    """The k-th smallest exact distance ``||q - b||``, given each query's best candidates in
    decreasing similarity (``values``, bank rows ``index``; at least ``k + WINDOW + 1`` of them
    unless ``complete``, i.e. they are the whole bank).

    Distances are recomputed from difference vectors for the candidates of rank
    ``k - WINDOW .. k + WINDOW``. With ``e`` the rounding margin of :func:`similarity_error`, a
    similarity gap above ``2 e`` between two ranks is a certain order; one such gap above and one
    below rank k inside the window fence in every row that could be the k-th, which is then the
    window's ``(k - first rank)``-th closest. Queries without such gaps (near-equal similarities)
    get every bank row within ``2 e`` of the k-th similarity recomputed (``exhaustive``), or all
    their candidates (approximate search: the candidates are all it knows)."""
    m = values.shape[1]
    lo = max(0, k - 1 - WINDOW)
    hi = min(m - 1, k - 1 + WINDOW)  # the window: ranks lo..hi
    eps2 = 2 * similarity_error(bank.shape[1], queries.dtype)
    certain = (values[:, :-1] - values[:, 1:]) > eps2  # certain[:, j]: rank j surely closer than j + 1
    safe = torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
    if lo > 0:
        safe &= certain[:, lo - 1 : k - 1].any(dim=1)
    if not (complete and hi == m - 1):
        safe &= certain[:, k - 1 : hi + 1].any(dim=1) if hi < m - 1 else torch.zeros_like(safe)
    index = index.to(queries.device)
    out = torch.kthvalue(candidate_distances(queries, bank, index[:, lo : hi + 1]), k - lo, dim=1).values
    unsafe = torch.nonzero(~safe.to(queries.device))[:, 0]
    if unsafe.numel():
        q = queries[unsafe]
        if exhaustive:
            threshold = values[unsafe.to(values.device), k - 1].to(queries.device) - eps2
            out[unsafe] = _kth_within_margin(q, q @ bank.T, bank, threshold, k)
        else:
            out[unsafe] = torch.kthvalue(candidate_distances(q, bank, index[unsafe]), k, dim=1).values
    return out


def candidate_distances(queries: torch.Tensor, bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
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
    return torch.kthvalue(candidate_distances(q, bank, index), k, dim=1).values


def top_k_similarity_mean(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the ``k`` largest inner products of each query with the rows of ``bank``."""
    values, _ = top_k_similarities(queries, bank, k)
    return values.to(torch.float64).mean(dim=1).to(queries.dtype).to(queries.device)


# ----- an inverted file searched with matrix products ------------------------------------------


def ivf_lists(bank: torch.Tensor, nlist: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (faiss, 20 iterations, fixed seed) of unit rows into ``nlist`` lists:
    ``(centroids (nlist, D), list of each row (N,))``, the list being the most similar centroid."""
    import faiss

    data = np.ascontiguousarray(bank.detach().to("cpu", torch.float32).numpy())
    kmeans = faiss.Kmeans(data.shape[1], nlist, niter=20, seed=seed, spherical=True, verbose=False)
    kmeans.train(data)
    centroids = torch.from_numpy(kmeans.centroids.copy()).to(bank.device, bank.dtype)
    lists = torch.empty(bank.shape[0], dtype=torch.long, device=bank.device)
    for rows in row_slices(bank.shape[0], nlist * bank.element_size()):
        lists[rows] = (bank[rows] @ centroids.T).argmax(dim=1)
    return centroids, lists


def ivf_top_k(
    queries: torch.Tensor, bank: torch.Tensor, centroids: torch.Tensor, offsets: torch.Tensor, nprobe: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate :func:`top_k_similarities` over a bank sorted by list (list ``l`` holds rows
    ``offsets[l]:offsets[l+1]``): each query searches its ``nprobe`` most similar lists. The work
    is grouped by list, one matrix product per list with all the queries that probe it (faiss's
    IVF scans list by list per query, without matrix products). Missing candidates (lists with
    fewer than k rows in all) have similarity ``-inf`` and index 0."""
    nq, nlist = queries.shape[0], centroids.shape[0]
    nprobe = min(nprobe, nlist)
    values = torch.empty(nq, k, dtype=queries.dtype, device=queries.device)
    index = torch.empty(nq, k, dtype=torch.long, device=queries.device)
    bounds_of = offsets.tolist()
    # few, large chunks of queries: every chunk loops over all the lists
    for rows in row_slices(nq, nprobe * k * (queries.element_size() + 8) + nlist * queries.element_size(), SEARCH_CHUNK_BYTES // 4):
        q = queries[rows]
        probe = torch.topk(q @ centroids.T, nprobe, dim=1).indices
        width = nprobe * k
        best = torch.full((q.shape[0] * width,), -math.inf, dtype=q.dtype, device=q.device)
        where = torch.zeros(q.shape[0] * width, dtype=torch.long, device=q.device)
        flat = probe.flatten()
        order = torch.argsort(flat, stable=True)
        owner = torch.div(order, nprobe, rounding_mode="floor")  # query of each (query, probe) pair
        slot = order % nprobe
        edges = torch.searchsorted(flat[order], torch.arange(nlist + 1, device=q.device)).tolist()
        for lst in range(nlist):
            a, b = edges[lst], edges[lst + 1]
            lo, hi = bounds_of[lst], bounds_of[lst + 1]
            if a == b or lo == hi:
                continue
            who = owner[a:b]
            m = min(k, hi - lo)
            v, i = torch.topk(q[who] @ bank[lo:hi].T, m, dim=1, sorted=False)
            at = ((who * width + slot[a:b] * k)[:, None] + torch.arange(m, device=q.device)).flatten()
            best[at] = v.flatten()
            where[at] = (i + lo).flatten()
        values[rows], pick = torch.topk(best.view(-1, width), k, dim=1)
        index[rows] = where.view(-1, width).gather(1, pick)
    return values, index


# ----- a mergeable uniform sample of rows -------------------------------------------------------

_HASH_SEED = 0x5EED_EB00D
#: columns that enter a row's key (evenly spaced); rows equal there are ordered by their content
HASHED_COLUMNS = 64


@functools.lru_cache(maxsize=16)
def _hash_plan(dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(_HASH_SEED)
    cols = torch.linspace(0, dim - 1, min(dim, HASHED_COLUMNS)).round().long().unique()
    weights = torch.randint(-(2**62), 2**62, (cols.numel(),), generator=g, dtype=torch.int64) | 1
    return cols.to(device), weights.to(device)


def row_keys(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash of the float32 bit patterns of (up to ``HASHED_COLUMNS``) columns of each
    row: the same row always gets the same key. Integer arithmetic wraps modulo 2**64, so the key
    does not depend on the summation order."""
    cols, weights = _hash_plan(x.shape[1], x.device)
    picked = x[:, cols].to(torch.float32).contiguous()
    if picked.device.type == "cpu":  # numpy: unsigned, wrapping, single-threaded (no pool wake-ups)
        bits = picked.view(torch.int32).numpy().astype(np.int64).view(np.uint64)
        with np.errstate(over="ignore"):
            hn = (bits * weights.numpy().view(np.uint64)).sum(axis=1, dtype=np.uint64)
            hn ^= hn >> np.uint64(30)
            hn *= np.uint64(0xBF58476D1CE4E5B9)
            hn ^= hn >> np.uint64(27)
            hn *= np.uint64(0x94D049BB133111EB)
            hn ^= hn >> np.uint64(31)
        return torch.from_numpy(hn.view(np.int64))
    bits = picked.view(torch.int32).to(torch.int64)
    h = (bits * weights).sum(dim=1)
    # the splitmix64 finaliser (torch shifts int64 arithmetically: mask to a logical shift)
    h = h ^ _shift_right(h, 30)
    h = h * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed int64
    h = h ^ _shift_right(h, 27)
    h = h * -7723592293110705685  # 0x94d049bb133111eb
    return h ^ _shift_right(h, 31)


def _shift_right(h: torch.Tensor, s: int) -> torch.Tensor:
    return (h >> s) & ((1 << (64 - s)) - 1)


def bottom_k_order(keys: torch.Tensor, size: int, rows_at: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Positions of the ``size`` smallest keys, in key order: a uniform sample without
    replacement that is the same however the data were split into batches or partial fits.
    Equal keys (rows equal in the hashed columns) are ordered by the rows' full float32 bit
    patterns, fetched with ``rows_at(positions)``."""
    order = torch.argsort(keys, stable=True)
    head = keys[order[: size + 1]]
    tied = torch.nonzero(head[1:] == head[:-1])[:, 0]
    if tied.numel():
        order = order.clone()
        for key in torch.unique(head[tied]).tolist():
            group = torch.nonzero(keys == key)[:, 0]
            content = rows_at(group).to(torch.float32).contiguous().view(torch.int32).cpu().numpy()
            ranked = group[torch.from_numpy(np.lexsort(content.T[::-1]).copy()).to(group.device)]
            start = int(torch.nonzero(keys[order] == key)[0, 0])
            order[start : start + group.numel()] = ranked
    return order[:size]


def bottom_k_rows(rows: torch.Tensor, keys: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``size`` rows of smallest key, in key order (see :func:`bottom_k_order`)."""
    order = bottom_k_order(keys, size, lambda at: rows[at])
    return rows[order], keys[order]

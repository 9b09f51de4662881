"""Scores computed from logits, in one read of the logits.

Every function takes logits whose LAST dimension is the class dimension (any leading shape:
``(N, C)`` for a classifier, ``(B, L, V)`` for a language model's tokens) and returns one OOD
score per row: higher means more out-of-distribution (see CONVENTIONS.md).

All scores derive from per-row reductions accumulated together in one pass over the logits ``z``:
``m = max_j z_j``, ``S_T = sum_j exp((z_j - m)/T)``, ``S_1 = sum_j exp(z_j - m)`` and
``T_1 = sum_j exp(z_j - m) (z_j - m)``. Then

* ``energy = -(m + T log S_T)``            (= -T logsumexp(z/T); Liu et al., NeurIPS 2020)
* ``msp = -1 / S_T``                       (= -max softmax(z/T); Hendrycks & Gimpel, ICLR 2017)
* ``max_logit = -m``                       (Hendrycks et al., ICML 2022)
* ``entropy = log S_1 - T_1 / S_1``        (Shannon entropy of softmax(z) in nats; both terms
  are >= 0, so nothing cancels)

A row is reduced block by block with the online normaliser of Milakov & Gimelshein ("Online
normalizer calculation for softmax", 2018): when a block raises the running max from ``m`` to
``m'``, the running sums are rescaled once by ``exp(m - m')`` (``T_1`` also gains
``(m - m') S_1``). Entries equal to the running max contribute exactly 1 and are counted
rather than summed, so the entropy of confident rows keeps its relative precision.

Three implementations give the same results:

* a native kernel (``ebood._native._scores``, C built at install time, AVX2/FMA chosen at run
  time) for float32 / float16 / bfloat16 logits on the CPU; it reads the logits once, in place,
  row ranges split over ``torch.get_num_threads()`` threads;
* a Triton kernel (``ebood._native._triton_scores``) for the same dtypes on CUDA, where Triton
  is installed (it comes with CUDA builds of torch): one launch, each row read once;
* chunked torch code for everything else (float64, no compiler at install time, no Triton, or
  ``EBOOD_NO_NATIVE=1``): whole-row tiles in a few ops, rows with NaN / +inf / only -inf
  recomputed exactly by the online-normaliser code once per call.

None of them materialises an (N, C) exp or softmax buffer: the extra memory is O(rows) plus at
most :data:`CHUNK_BYTES`, also when a single row is larger than that (its column blocks are merged
with the online-normaliser rule).

Non-finite logits follow exact limits: a row containing ``+inf`` (and no NaN) has
``energy = max_logit = -inf``, ``msp = -1/k`` and ``entropy = log k`` with ``k`` the number of
``+inf`` entries (softmax is uniform over them) and predicts the first of them; a row of only
``-inf`` has ``energy = max_logit = +inf`` and NaN msp / entropy (softmax is undefined); a row
containing NaN gives NaN scores (prediction: its first NaN) and leaves other rows unaffected.
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ._arrays import accumulation_dtype, as_float_tensor
from ._native import scores_kernel, triton_score_kernel

__all__ = ["energy", "msp", "max_logit", "entropy", "logit_scores", "SCORE_NAMES"]

SCORE_NAMES = ("energy", "msp", "max_logit", "entropy")

#: Upper bound on the extra memory of one chunk of work, in bytes.
CHUNK_BYTES = 64 * 2**20

# The torch path keeps about this many tile-sized temporaries alive at once (the shifted logits,
# the exponentials, a copy of a tile with NaN / +inf entries).
_TORCH_TILE_COPIES = 4
# Native kernel dtype codes (see _native/_scores.c).
_NATIVE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# The kernel multiplies by 1/T in float32; outside this range the torch path divides instead.
_NATIVE_TEMPERATURES = (1e-30, 1e30)
# Below this many values per call, thread hand-off costs more than it saves.
_MIN_VALUES_PER_THREAD = 1 << 16


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return t


def _logits_tensor(logits: Any) -> torch.Tensor:
    """A tensor view of ``logits``; numpy arrays (also read-only memmaps and strided views) are
    wrapped without a copy, so that large inputs are only ever copied chunk by chunk."""
    if (
        isinstance(logits, np.ndarray)
        and logits.dtype in (np.float16, np.float32, np.float64)
        and logits.dtype.isnative
        and all(s >= 0 for s in logits.strides)
    ):
        with warnings.catch_warnings():
            # Read-only arrays are fine: scores never write to the logits.
            warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
            return torch.from_numpy(logits)
    return as_float_tensor(logits, "logits")


def _as_logits(logits: Any) -> torch.Tensor:
    x = _logits_tensor(logits)
    if x.ndim < 2:
        raise ValueError(
            f"logits must have at least 2 dimensions (..., classes) with classes last, "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[-1] == 0:
        raise ValueError(f"logits have an empty class dimension: shape {tuple(x.shape)}; expected (..., C) with C >= 1")
    return x.detach()


# ----- walking the rows in bounded pieces -------------------------------------------------------


def _row_blocks(x: torch.Tensor, max_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, 2-D block)`` over the rows of ``x`` flattened to ``(-1, C)``.

    Blocks are views where the leading dimensions can be flattened without a copy; otherwise
    they are copies of at most ``max_rows`` rows (never a copy of the whole input).
    """
    c = x.shape[-1]
    try:
        flat = x.view(-1, c)
    except RuntimeError:
        flat = None
    if flat is not None:
        for start in range(0, flat.shape[0], max_rows):
            yield start, flat[start : start + max_rows]
        return
    rows_per_item = math.prod(x.shape[1:-1])
    if rows_per_item <= max_rows:
        step = max_rows // rows_per_item
        for i in range(0, x.shape[0], step):
            yield i * rows_per_item, x[i : i + step].reshape(-1, c)
    else:
        for i in range(x.shape[0]):
            for start, block in _row_blocks(x[i], max_rows):
                yield i * rows_per_item + start, block


# ----- native path --------------------------------------------------------------------------------


def _native_usable(x: torch.Tensor, temperature: float) -> bool:
    lo, hi = _NATIVE_TEMPERATURES
    return (
        scores_kernel is not None
        and x.device.type == "cpu"
        and x.dtype in _NATIVE_DTYPES
        and lo <= temperature <= hi
        and x.layout == torch.strided
    )


_pool: ThreadPoolExecutor | None = None
_pool_pid = -1


def _thread_pool() -> ThreadPoolExecutor:
    """A process-wide pool; recreated in a forked child (whose copy has no live threads)."""
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid():
        _pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1)), thread_name_prefix="ebood-scores")
        _pool_pid = os.getpid()
    return _pool


def _in_parallel(run_rows: Callable[[int, int], None], rows: int, cols: int) -> None:
    """Calls ``run_rows(start, stop)`` on disjoint row ranges, in up to torch's thread count."""
    parts = min(torch.get_num_threads(), rows, max(1, rows * cols // _MIN_VALUES_PER_THREAD))
    if parts <= 1:
        run_rows(0, rows)
        return
    bounds = [rows * i // parts for i in range(parts + 1)]
    futures = [_thread_pool().submit(run_rows, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    run_rows(bounds[0], bounds[1])  # the kernel releases the GIL, so the calling thread works too
    for future in futures:
        future.result()


def _native_block(block: torch.Tensor, temperature: float, out: dict[str, torch.Tensor], row0: int) -> None:
    """Scores of a 2-D CPU block with unit column stride, written into ``out[...][row0:]``."""
    rows, cols = block.shape
    itemsize = block.element_size()
    energy_, msp_, max_logit_, prediction = (out[k] for k in ("energy", "msp", "max_logit", "prediction"))
    entropy_ = out.get("entropy")
    code = _NATIVE_DTYPES[block.dtype]
    base, row_stride = block.data_ptr(), block.stride(0)

    def run_rows(start: int, stop: int) -> None:
        r = row0 + start
        scores_kernel.row_scores(
            base + start * row_stride * itemsize, code, stop - start, cols, row_stride, temperature,
            entropy_ is not None,
            energy_.data_ptr() + 4 * r, msp_.data_ptr() + 4 * r, max_logit_.data_ptr() + 4 * r,
            entropy_.data_ptr() + 4 * r if entropy_ is not None else 0, prediction.data_ptr() + 8 * r,
        )  # fmt: skip

    _in_parallel(run_rows, rows, cols)


# ----- Triton path (CUDA) ------------------------------------------------------------------------


def _triton_usable(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in _NATIVE_DTYPES and x.layout == torch.strided and triton_score_kernel() is not None


def _triton_rows(x: torch.Tensor, temperature: float, out: dict[str, torch.Tensor]) -> None:
    """All rows in one kernel launch when ``x`` flattens to ``(-1, C)`` with unit column stride;
    otherwise bounded contiguous copies of row blocks, a launch each."""
    cols = x.shape[-1]
    try:
        whole = x.view(-1, cols) if x.stride(-1) == 1 else None
    except RuntimeError:
        whole = None
    blocks = [(0, whole)] if whole is not None else _row_blocks(x, max(1, CHUNK_BYTES // (cols * x.element_size())))
    write_scores = triton_score_kernel()
    for row0, block in blocks:
        write_scores(block if block.stride(-1) == 1 else block.contiguous(), temperature, out, row0)


# ----- torch path ---------------------------------------------------------------------------------


class _RowState:
    """Running per-row reductions of the torch path, merged tile by tile (online normaliser)."""

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        def full(value: float, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.full((rows,), value, dtype=dt, device=device)

        self.m = full(-math.inf)
        self.argmax = full(0, torch.int64)
        self.r_t, self.r_1, self.t_1, self.ties = full(0.0), full(0.0), full(0.0), full(0.0)
        self.n_posinf = full(0, torch.int64)
        self.first_posinf = full(-1, torch.int64)
        self.first_nan = full(-1, torch.int64)

    def update(self, tile: torch.Tensor, col0: int, temperature: float, want_entropy: bool, work: torch.Tensor) -> None:
        """Merges a (rows, w) tile starting at column ``col0``; ``work`` holds >= 2 * rows * w values
        of scratch space (reused across tiles: no fresh buffers, no page faults)."""
        tile_max, tile_arg = tile.max(dim=-1)  # NaN and +inf propagate into tile_max
        special = torch.isnan(tile_max) | (tile_max == math.inf)
        if bool(special.any()):  # rare: count them exactly, then treat them as -inf
            tile = self._track_special(tile, special, col0)
            tile_max, tile_arg = tile.max(dim=-1)
        tile_max = tile_max.to(self.m.dtype)
        grew = tile_max > self.m
        self.argmax = torch.where(grew, tile_arg + col0, self.argmax)
        new_m = torch.maximum(self.m, tile_max)
        # move the running sums to the new max; values at the old max stop being "ties"
        delta = torch.where(grew & torch.isfinite(self.m), self.m - new_m, torch.zeros_like(new_m))
        moved_ties = torch.where(grew, self.ties, torch.zeros_like(self.ties))
        scale_1 = torch.exp(delta)
        base_1 = self.r_1 + moved_ties
        self.t_1 = scale_1 * (self.t_1 + delta * base_1)
        self.r_1 = scale_1 * base_1
        self.r_t = torch.exp(delta / temperature) * (self.r_t + moved_ties)
        self.ties = self.ties - moved_ties
        self.m = new_m

        shift = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m)).unsqueeze(-1)
        size = tile.shape[0] * tile.shape[1]
        d = work[:size].view(tile.shape)
        e = work[size : 2 * size].view(tile.shape)
        torch.sub(tile, shift, out=d)  # -inf where z is -inf or z - m overflows: exp gives exactly 0
        # The tile's max, when it is the row's max, contributes exactly 1: count it and zero it,
        # so the sums only hold the small terms (full relative precision for confident rows).
        # Further ties with the max stay in the sums (then entropy >= log 2: no precision issue).
        hit = (tile_max == new_m) & torch.isfinite(new_m)
        self.ties += hit.to(d.dtype)
        at_max = tile_arg.unsqueeze(-1)
        if temperature != 1.0:
            torch.div(d, temperature, out=e).exp_()
            e.scatter_(1, at_max, torch.where(hit.unsqueeze(-1), 0.0, e.gather(1, at_max)))
            self.r_t += e.sum(dim=-1)
        if want_entropy or temperature == 1.0:
            torch.exp(d, out=e)
            e.scatter_(1, at_max, torch.where(hit.unsqueeze(-1), 0.0, e.gather(1, at_max)))
            self.r_1 += e.sum(dim=-1)
            # 0 * -inf is NaN and stands for 0 (NaN inputs never get here: _track_special)
            self.t_1 += e.mul_(d).nansum(dim=-1)

    def _track_special(self, tile: torch.Tensor, special: torch.Tensor, col0: int) -> torch.Tensor:
        """Counts NaN / +inf entries (and first positions) of the rows flagged ``special``;
        returns the tile with those entries replaced by -inf."""
        z = tile[special]
        nan, posinf = torch.isnan(z), z == math.inf
        for first, mask in ((self.first_nan, nan), (self.first_posinf, posinf)):
            found = mask.any(dim=-1)
            position = mask.to(torch.uint8).argmax(dim=-1) + col0  # argmax: the first maximal entry
            first[special] = torch.where((first[special] < 0) & found, position, first[special])
        self.n_posinf[special] += posinf.sum(dim=-1)
        tile = tile.clone()
        tile[special] = z.masked_fill(nan | posinf, -math.inf)
        return tile

    def finish(self, temperature: float, want_entropy: bool) -> dict[str, torch.Tensor]:
        m, ties = self.m, self.ties
        r_t = self.r_1 if temperature == 1.0 else self.r_t
        s_t = ties + r_t
        out = {"energy": -(m + temperature * torch.log(s_t)), "msp": -1.0 / s_t, "max_logit": -m}
        if want_entropy:
            out["entropy"] = torch.log1p((ties - 1.0) + self.r_1) - self.t_1 / (ties + self.r_1)
        prediction = self.argmax
        # exact limits for rows whose max is not finite (module docstring)
        k = self.n_posinf.to(m.dtype)
        has_posinf = k > 0
        has_nan = self.first_nan >= 0
        all_neginf = (m == -math.inf) & ~has_posinf & ~has_nan
        special = {
            "energy": (-math.inf, math.inf),
            "max_logit": (-math.inf, math.inf),
            "msp": (-1.0 / k.clamp_min(1), math.nan),
            "entropy": (torch.log(k.clamp_min(1)), math.nan),
        }
        for key in out:
            with_posinf, when_all_neginf = special[key]
            value = torch.where(has_posinf, with_posinf, out[key])
            value = torch.where(all_neginf, when_all_neginf, value)
            out[key] = torch.where(has_nan, math.nan, value)
        prediction = torch.where(has_posinf, self.first_posinf, prediction)
        prediction = torch.where(all_neginf, 0, prediction)
        out["prediction"] = torch.where(has_nan, self.first_nan, prediction)
        return out


def _torch_tile_values(dtype: torch.dtype) -> int:
    """Values per tile of the torch path, so that its temporaries fit in CHUNK_BYTES."""
    itemsize = max(torch.finfo(accumulation_dtype(dtype)).bits, torch.finfo(dtype).bits) // 8
    return max(1, CHUNK_BYTES // (_TORCH_TILE_COPIES * itemsize))


def _torch_tiles(block: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of the torch path's tiles of ``block``: as many whole rows as fit the budget."""
    budget = _torch_tile_values(block.dtype)
    return max(1, budget // block.shape[1]), min(block.shape[1], budget)


def _scratch(work: list[torch.Tensor], values: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The torch path's scratch buffer, cached across the blocks of one call (allocated on first use)."""
    if not work or work[0].numel() < values:
        work[:] = [torch.empty(values, dtype=dtype, device=device)]
    return work[0]


def _torch_block(
    block: torch.Tensor, temperature: float, out: dict[str, torch.Tensor], row0: int, work: list[torch.Tensor]
) -> None:
    """Scores of a 2-D block by chunked torch ops (any device / dtype), into ``out[...][row0:]``.

    Rows that fit a tile take the short path below: a handful of whole-tile ops, no branch on the
    data and no device synchronisation (on a GPU the Python cost per op, not the memory, is what
    a longer sequence would pay for). Rows whose max is not finite (NaN, +inf, all -inf) come out
    non-finite there and are recomputed exactly by :func:`_fix_special_rows`, once per call.
    Rows longer than a tile are merged column tile by column tile (:class:`_RowState`).
    """
    tile_rows, tile_cols = _torch_tiles(block)
    if tile_cols < block.shape[1]:
        _torch_block_online(block, temperature, out, row0, work)
        return
    acc = accumulation_dtype(block.dtype)
    scratch = _scratch(work, 2 * min(block.numel(), tile_rows * block.shape[1]), acc, block.device)
    for r in range(0, block.shape[0], tile_rows):
        _short_rows(block[r : r + tile_rows], temperature, out, row0 + r, scratch)


def _short_rows(tile: torch.Tensor, temperature: float, out: dict[str, torch.Tensor], row0: int, scratch: torch.Tensor) -> None:
    """One tile of whole rows: ``m`` and the first argmax, then ``r = S - 1`` (the exact 1 of the
    max left out, so confident rows keep their relative precision) and ``T_1``."""
    rows = slice(row0, row0 + tile.shape[0])
    m, arg = tile.max(dim=-1)
    m = m.to(scratch.dtype)
    d = scratch[: tile.numel()].view(tile.shape)
    e = scratch[tile.numel() : 2 * tile.numel()].view(tile.shape)
    torch.sub(tile, m.unsqueeze(-1), out=d)  # -inf where z is -inf or z - m overflows: exp gives 0
    at_max = arg.unsqueeze(-1)
    if "entropy" in out or temperature == 1.0:
        torch.exp(d, out=e).scatter_(1, at_max, 0.0)
        r_1 = e.sum(dim=-1)
        if "entropy" in out:
            s_1 = r_1 + 1.0
            # 0 * -inf is NaN and stands for 0 (rows with NaN inputs are recomputed anyway)
            out["entropy"][rows] = torch.log1p(r_1) - e.mul_(d).nansum(dim=-1) / s_1
    if temperature != 1.0:
        torch.exp(d.div_(temperature), out=e).scatter_(1, at_max, 0.0)
        r_t = e.sum(dim=-1)
    else:
        r_t = r_1
    out["energy"][rows] = -(m + temperature * torch.log1p(r_t))
    out["msp"][rows] = -1.0 / (r_t + 1.0)
    out["max_logit"][rows] = -m
    out["prediction"][rows] = arg


def _fix_special_rows(x: torch.Tensor, max_rows: int, temperature: float, out: dict[str, torch.Tensor]) -> None:
    """Recompute exactly the rows whose max is not finite (the short path flags them by a
    non-finite max_logit); the one device synchronisation of a call on the torch path."""
    special = ~torch.isfinite(out["max_logit"])
    if not bool(special.any()):
        return
    work: list[torch.Tensor] = []
    for row0, block in _row_blocks(x, max_rows):
        picked = special[row0 : row0 + block.shape[0]].nonzero().squeeze(1)
        if picked.numel() == 0:
            continue
        part = {k: torch.empty(picked.numel(), dtype=v.dtype, device=v.device) for k, v in out.items()}
        _torch_block_online(block[picked], temperature, part, 0, work)
        for key, value in part.items():
            out[key][row0 + picked] = value


def _torch_block_online(
    block: torch.Tensor, temperature: float, out: dict[str, torch.Tensor], row0: int, work: list[torch.Tensor]
) -> None:
    """Scores of a 2-D block merged tile by tile with the online normaliser (any row length;
    exact for NaN / +inf / -inf), into ``out[...][row0:]``."""
    rows, cols = block.shape
    acc = accumulation_dtype(block.dtype)
    tile_rows, tile_cols = _torch_tiles(block)
    scratch = _scratch(work, 2 * min(_torch_tile_values(block.dtype), rows * cols), acc, block.device)
    want_entropy = "entropy" in out
    for r in range(0, rows, tile_rows):
        tile = block[r : r + tile_rows]
        state = _RowState(tile.shape[0], acc, block.device)
        for c in range(0, cols, tile_cols):  # one column tile unless a single row exceeds the budget
            state.update(tile[:, c : c + tile_cols], c, temperature, want_entropy, scratch)
        for key, value in state.finish(temperature, want_entropy).items():
            out[key][row0 + r : row0 + r + tile.shape[0]] = value


# ----- driver -------------------------------------------------------------------------------------


def _compute(logits: Any, temperature: float, want_entropy: bool) -> dict[str, torch.Tensor]:
    temperature = _check_temperature(temperature)
    x = _as_logits(logits)
    lead, cols = x.shape[:-1], x.shape[-1]
    n = math.prod(lead)
    acc = accumulation_dtype(x.dtype)
    names = SCORE_NAMES if want_entropy else ("energy", "msp", "max_logit")
    out = {k: torch.empty(n, dtype=acc, device=x.device) for k in names}
    out["prediction"] = torch.empty(n, dtype=torch.int64, device=x.device)

    if _triton_usable(x):
        _triton_rows(x, temperature, out)
        _fix_special_rows(x, max(1, _torch_tile_values(x.dtype) // cols), temperature, out)
        return {k: v.reshape(lead) for k, v in out.items()}
    native = _native_usable(x, temperature)
    if native:
        # the kernel reads in place; a copy is only needed for non-unit column strides
        max_rows = max(1, CHUNK_BYTES // (cols * x.element_size()))
    else:
        max_rows = max(1, _torch_tile_values(x.dtype) // cols)
    work: list[torch.Tensor] = []  # the torch path's scratch buffer, shared by all blocks
    for row0, block in _row_blocks(x, max_rows):
        if native and block.stride(-1) != 1 and cols * block.element_size() <= CHUNK_BYTES:
            block = block.contiguous()
        if native and block.stride(-1) == 1:
            _native_block(block, temperature, out, row0)
        else:
            _torch_block(block, temperature, out, row0, work)
    if work:  # the torch path ran (it allocates its scratch buffer first)
        _fix_special_rows(x, max_rows, temperature, out)
    return {k: v.reshape(lead) for k, v in out.items()}


def energy(logits: Any, temperature: float = 1.0) -> torch.Tensor:
    """Free energy ``E(x) = -T * logsumexp(f(x) / T)`` (Liu, Wang, Owens & Li, "Energy-based
    Out-of-distribution Detection", NeurIPS 2020). Higher = more OOD (no sign flip needed)."""
    return _compute(logits, temperature, want_entropy=False)["energy"]


def msp(logits: Any, temperature: float = 1.0) -> torch.Tensor:
    """Negated maximum softmax probability ``-max_j softmax(f(x)/T)_j`` (Hendrycks & Gimpel, "A
    Baseline for Detecting Misclassified and Out-of-Distribution Examples", ICLR 2017).

    The paper's confidence is negated so that higher = more OOD.
    """
    return _compute(logits, temperature, want_entropy=False)["msp"]


def max_logit(logits: Any) -> torch.Tensor:
    """Negated maximum logit ``-max_j f_j(x)`` (Hendrycks et al., "Scaling Out-of-Distribution
    Detection for Real-World Settings", ICML 2022). Higher = more OOD."""
    x = _as_logits(logits)
    return -x.amax(dim=-1).to(accumulation_dtype(x.dtype))


def entropy(logits: Any) -> torch.Tensor:
    """Shannon entropy ``-sum_j p_j log p_j`` of ``p = softmax(f(x))``, in nats. Higher = more OOD.

    Computed as ``log S_1 - T_1 / S_1`` (module docstring), always at temperature 1.
    """
    return _compute(logits, 1.0, want_entropy=True)["entropy"]


def logit_scores(logits: Any, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """All logit scores and the predicted class, computed together in one read of the logits.

    Returns a dict with ``energy`` and ``msp`` (at ``temperature``), ``max_logit``, ``entropy``
    (always at temperature 1, as :func:`entropy`) and ``prediction`` (argmax, int64; the first
    maximal class).
    """
    return _compute(logits, temperature, want_entropy=True)

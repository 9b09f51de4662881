"""The logit-score reductions as one Triton kernel, for CUDA tensors: each row is read once.

Eager torch on a GPU pays a fixed launch cost per operation, and under the 64 MiB bound on extra
memory (:data:`ebood.scores.CHUNK_BYTES`) a large input needs many tiles of a dozen operations
each: on an H200 that costs more than the naive unbounded sequence. This kernel streams every row
once, keeping per row (float32) the running max ``m`` and its first index, the count ``ties`` of
entries equal to ``m`` (each contributes exactly 1, counted rather than summed so that the sums
below keep full relative precision for confident rows), ``r_1 = sum exp(z - m)``,
``t_1 = sum exp(z - m) (z - m)`` and ``r_T = sum exp((z - m) / T)`` over the other entries,
merged block by block with the online-normaliser rule (Milakov & Gimelshein, 2018).

The kernel writes the scores themselves (formulas in :mod:`ebood.scores`). Rows holding NaN or
+inf, and rows of only -inf, get ``m = NaN`` here; ``ebood.scores`` recomputes them exactly with
its torch path. Triton compiles the kernel on its first use in a
process (about a second; Triton caches the result on disk for later processes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["write_scores"]

_MAX_BLOCK = 4096


@triton.jit
def _row_kernel(
    x_ptr, stride, n_cols, inv_t, temperature,
    energy_ptr, msp_ptr, max_logit_ptr, entropy_ptr, prediction_ptr,
    BLOCK: tl.constexpr, WITH_T: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride
    m = -float("inf")
    arg = 0
    ties = 0.0
    r1 = 0.0
    t1 = 0.0
    rt = 0.0
    bad = 0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < n_cols
        z = tl.load(base + cols, mask=inside, other=-float("inf")).to(tl.float32)
        bad += tl.sum(((z != z) | (z == float("inf"))).to(tl.int32), axis=0)
        block_max = tl.max(z, axis=0)
        block_arg = tl.argmax(z, axis=0, tie_break_left=True) + start
        new_m = tl.maximum(m, block_max)
        grew = block_max > m
        arg = tl.where(grew, block_arg, arg)
        # the entries at the old max stop being ties when the max grows: rescale them into the sums
        finite_old = m > -float("inf")
        delta = tl.where(grew & finite_old, m - new_m, 0.0)
        alpha = tl.where(finite_old | ~grew, tl.exp(delta), 0.0)
        moved = tl.where(grew, ties, 0.0)
        # alpha == 0: the old terms vanish (also when m - new_m overflowed to -inf)
        t1 = tl.where(alpha > 0.0, alpha * (t1 + delta * (r1 + moved)), 0.0)
        r1 = alpha * (r1 + moved)
        if WITH_T:
            rt = tl.where(finite_old | ~grew, tl.exp(delta * inv_t), 0.0) * (rt + moved)
        ties = ties - moved
        m = new_m
        at_max = z == m
        ties += tl.sum(at_max.to(tl.float32), axis=0)
        skip = at_max | (z == -float("inf"))
        d = tl.where(skip, 0.0, z - m)  # z - m may overflow to -inf: exp gives 0, and so must e * d
        e = tl.where(skip, 0.0, tl.exp(d))
        r1 += tl.sum(e, axis=0)
        t1 += tl.sum(tl.where(e > 0.0, e * d, 0.0), axis=0)
        if WITH_T:
            rt += tl.sum(tl.where(skip, 0.0, tl.exp(d * inv_t)), axis=0)
    if not WITH_T:
        rt = r1
    m = tl.where((bad > 0) | (m == -float("inf")), float("nan"), m)
    tl.store(energy_ptr + row, -(m + temperature * _log1p((ties - 1.0) + rt)))
    tl.store(msp_ptr + row, -1.0 / (ties + rt))
    tl.store(max_logit_ptr + row, -m)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, _log1p((ties - 1.0) + r1) - t1 / (ties + r1))
    tl.store(prediction_ptr + row, arg.to(tl.int64))


@triton.jit
def _log1p(x):
    """log(1 + x) without losing small x (Goldberg's correction; libdevice's log1p is not in
    every Triton backend)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


def write_scores(x: torch.Tensor, temperature: float, out: dict[str, torch.Tensor], row0: int) -> None:
    """The scores of the rows of ``x`` (2-D, CUDA, unit column stride) into ``out[...][row0:]``
    (float32; ``out["entropy"]`` may be missing). Rows whose max is not finite get NaN max_logit."""
    rows, cols = x.shape
    if rows == 0:
        return
    block = min(_MAX_BLOCK, triton.next_power_of_2(cols))
    entropy = out.get("entropy", out["msp"])  # a placeholder pointer when the entropy is not wanted
    _row_kernel[(rows,)](
        x, x.stride(0), cols, 1.0 / temperature, temperature,
        out["energy"][row0:], out["msp"][row0:], out["max_logit"][row0:], entropy[row0:], out["prediction"][row0:],
        BLOCK=block, WITH_T=temperature != 1.0, WITH_ENTROPY="entropy" in out, num_warps=8 if block >= 2048 else 4,
    )

"""Scores computed from logits, in one read of the logits.

Every function takes logits whose LAST dimension is the class dimension (any leading shape) and
returns one OOD score per row: higher means more out-of-distribution (see CONVENTIONS.md).

All scores derive from three per-row reductions, accumulated together in one pass:
``m = max_j z_j``, ``s = sum_j exp((z_j - m)/T)`` and ``t = sum_j exp(z_j - m) (z_j - m)``.
Then ``energy = -(m + T log s)``, ``msp = -1/s``, ``max_logit = -m`` and
``entropy = log s1 - t/s1`` (with ``s1`` the sum at T = 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._arrays import accumulation_dtype, as_float_tensor

__all__ = ["energy", "msp", "max_logit", "entropy", "logit_scores", "SCORE_NAMES"]

SCORE_NAMES = ("energy", "msp", "max_logit", "entropy")

#: Upper bound on the extra memory of one chunk of work, in bytes.
CHUNK_BYTES = 64 * 2**20


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return t


def _as_logits(logits: Any) -> torch.Tensor:
    x = as_float_tensor(logits, "logits")
    if x.ndim < 2:
        raise ValueError(
            f"logits must have at least 2 dimensions (..., classes) with classes last, "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[-1] == 0:
        raise ValueError(f"logits have an empty class dimension: shape {tuple(x.shape)}; expected (..., C) with C >= 1")
    return x


def _reduce_chunk(z: torch.Tensor, temperature: float, want_entropy: bool) -> dict[str, torch.Tensor]:
    """Per-row reductions of a (rows, C) chunk, already in the accumulation dtype."""
    m, pred = z.max(dim=-1)
    inf_count = (z == math.inf).sum(dim=-1)
    finite_max = torch.isfinite(m)
    shift = torch.where(finite_max, m, torch.zeros_like(m)).unsqueeze(-1)
    d = (z - shift).clamp_min(-1e4) if z.dtype == torch.float64 else (z - shift).clamp_min(-1e3)
    e_t = torch.exp(d / temperature)
    s_t = e_t.sum(dim=-1)
    out = {"m": m, "pred": pred, "s_t": s_t, "inf_count": inf_count}
    if want_entropy:
        e1 = e_t if temperature == 1.0 else torch.exp(d)
        out["s1"] = e1.sum(dim=-1)
        out["t1"] = (e1 * d).sum(dim=-1)
    return out


def _finish(r: dict[str, torch.Tensor], temperature: float) -> dict[str, torch.Tensor]:
    m, s_t = r["m"], r["s_t"]
    k = r["inf_count"].to(m.dtype)
    has_inf = k > 0
    energy = torch.where(has_inf, torch.full_like(m, -math.inf), -(m + temperature * torch.log(s_t)))
    msp = torch.where(has_inf, -1.0 / k.clamp_min(1), -1.0 / s_t)
    out = {"energy": energy, "msp": msp, "max_logit": -m}
    if "s1" in r:
        s1, t1 = r["s1"], r["t1"]
        ent = torch.log(s1) - t1 / s1
        out["entropy"] = torch.where(has_inf, torch.log(k.clamp_min(1)), ent.clamp_min(0))
    all_neg_inf = m == -math.inf
    nan = torch.full_like(m, math.nan)
    out["msp"] = torch.where(all_neg_inf, nan, out["msp"])
    if "entropy" in out:
        out["entropy"] = torch.where(all_neg_inf, nan, out["entropy"])
    # NaN rows: max() propagates NaN into m, and every score of the row is NaN.
    row_nan = torch.isnan(m)
    for key in out:
        out[key] = torch.where(row_nan, nan, out[key])
    out["prediction"] = r["pred"]
    return out


def _compute(logits: Any, temperature: float, want_entropy: bool) -> dict[str, torch.Tensor]:
    temperature = _check_temperature(temperature)
    x = _as_logits(logits)
    lead, c = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, c)
    n = flat.shape[0]
    acc = accumulation_dtype(x.dtype)
    rows_per_chunk = max(1, CHUNK_BYTES // (3 * c * torch.finfo(acc).bits // 8))
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, n, rows_per_chunk):
        z = flat[start : start + rows_per_chunk].to(acc)
        parts.append(_finish(_reduce_chunk(z, temperature, want_entropy), temperature))
    if not parts:
        empty = torch.empty(0, dtype=acc, device=x.device)
        parts = [{k: empty for k in SCORE_NAMES} | {"prediction": empty.long()}]
    return {k: torch.cat([p[k] for p in parts]).reshape(lead) for k in parts[0]}


def energy(logits: Any, temperature: float = 1.0) -> torch.Tensor:
    """Free energy ``E(x) = -T * logsumexp(f(x) / T)`` (Liu et al., NeurIPS 2020). Higher = more OOD."""
    return _compute(logits, temperature, want_entropy=False)["energy"]


def msp(logits: Any, temperature: float = 1.0) -> torch.Tensor:
    """Negated maximum softmax probability ``-max_j softmax(f(x)/T)_j`` (Hendrycks & Gimpel, ICLR 2017).

    The paper's confidence is negated so that higher = more OOD.
    """
    return _compute(logits, temperature, want_entropy=False)["msp"]


def max_logit(logits: Any) -> torch.Tensor:
    """Negated maximum logit ``-max_j f_j(x)`` (Hendrycks et al., ICML 2022). Higher = more OOD."""
    x = _as_logits(logits)
    return -x.amax(dim=-1).to(accumulation_dtype(x.dtype))


def entropy(logits: Any) -> torch.Tensor:
    """Shannon entropy ``-sum_j p_j log p_j`` of ``p = softmax(f(x))``, in nats. Higher = more OOD."""
    return _compute(logits, 1.0, want_entropy=True)["entropy"]


def logit_scores(logits: Any, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """All logit scores and the predicted class, computed together in one read of the logits.

    Returns a dict with ``energy`` and ``msp`` (at ``temperature``), ``max_logit``, ``entropy``
    (always at temperature 1, as :func:`entropy`) and ``prediction`` (argmax, int64).
    """
    return _compute(logits, temperature, want_entropy=True)

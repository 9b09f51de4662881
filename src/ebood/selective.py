"""Rejection thresholds with a guaranteed selective risk.

:func:`calibrate` picks a threshold ``t`` from labelled validation data (scores, higher = more
likely to fail, and whether each prediction was right) such that, with probability at least
``1 - delta`` over the draw of that data, the selective risk of new data,
``P(wrong | score <= t)``, is at most ``risk``. Predictions with ``score <= t`` are accepted.

Candidate thresholds are the distinct validation scores (a tie group is one threshold). Two
procedures:

* ``"sgr"``: Selection with Guaranteed Risk (Geifman & El-Yaniv, "Selective Classification for
  Deep Neural Networks", NeurIPS 2017). A binary search over the candidates; at each of its at
  most ``k = ceil(log2(G + 1))`` steps (``G`` candidates) the binomial tail bound
  ``b* = max {b : P(Bin(n_t, b) <= e_t) >= delta / k}`` (the one-sided Clopper-Pearson upper
  bound on the risk, ``n_t`` accepted of which ``e_t`` wrong) is computed; a step whose bound is
  below ``risk`` moves to larger coverage. ``delta`` is split over the ``k`` steps (union bound),
  so every bound computed holds at once with probability ``1 - delta``; the largest tested
  coverage whose bound is below ``risk`` is returned. (The paper returns the last tested
  threshold, which need not pass its test; returning the best passing one keeps the guarantee.)
* ``"ltt"``: Learn-then-Test (Angelopoulos, Bates, Candes, Jordan & Lei, 2021), distribution
  free. For each candidate, the null "risk at t > risk" has the exact binomial p-value
  ``p_t = P(Bin(n_t, risk) <= e_t)`` (given ``n_t``, the accepted samples are i.i.d. and each is
  wrong with probability equal to the risk at ``t``). Fixed-sequence testing from the smallest
  acceptance set upwards, at level ``delta`` without splitting it, rejects nulls while
  ``p_t <= delta``; the last rejected candidate is returned. The sequence starts at the first
  acceptance set large enough for a p-value to reach ``delta`` (``(1 - risk)^n <= delta``).
  This is the high-probability guarantee, not conformal risk control's guarantee in expectation.

When no candidate passes, the threshold is ``-inf`` (reject everything) and a warning says so.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import numpy as np
from scipy.special import bdtr, betaincinv
from scipy.stats import binom

from ._arrays import as_correct, as_scores_1d

__all__ = ["calibrate", "sgr_bound", "METHODS"]

METHODS = ("sgr", "ltt")


def _check_risk_delta(risk: float, delta: float) -> tuple[float, float]:
    r, d = float(risk), float(delta)
    if not (0.0 < r < 1.0):
        raise ValueError(f"risk must be in (0, 1), got {risk!r}")
    if not (0.0 < d < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return r, d


def sgr_bound(errors: Any, accepted: Any, level: float) -> np.ndarray:
    """The binomial tail bound of SGR: the ``b`` with ``P(Bin(accepted, b) <= errors) = level``.

    It is the ``1 - level`` quantile of ``Beta(errors + 1, accepted - errors)`` (1 where every
    accepted prediction is wrong), float64, element-wise.
    """
    e = np.asarray(errors, dtype=np.float64)
    n = np.asarray(accepted, dtype=np.float64)
    # scipy.special ufuncs rather than scipy.stats: the same functions without the per-call checks
    b = betaincinv(e + 1.0, np.maximum(n - e, 1.0), 1.0 - level)
    return np.where(e >= n, 1.0, b)


def _cumulative(scores: Any, correct: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores ascending, and for each the number accepted and the number wrong among them."""
    s = as_scores_1d(scores, "scores")
    ok = as_correct(correct, s.size)
    order = np.argsort(s)
    ordered = s[order]
    ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])  # last index of each tie group
    return ordered[ends], ends + 1, np.cumsum(~ok[order])[ends]


def _sgr(accepted: np.ndarray, wrong: np.ndarray, risk: float, delta: float) -> int:
    steps = math.ceil(math.log2(accepted.size + 1))
    level = delta / steps
    lo, hi, best = 0, accepted.size - 1, -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if float(sgr_bound(wrong[mid], accepted[mid], level)) < risk:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _most_wrong(accepted: np.ndarray, risk: float, delta: float) -> np.ndarray:
    """The most mistakes among ``accepted`` whose p-value ``P(Bin(accepted, risk) <= k)`` is <= delta."""
    k = binom.ppf(delta, accepted, risk)  # smallest k with P(<= k) >= delta
    return np.where(bdtr(k, accepted, risk) <= delta, k, k - 1)


def _ltt(accepted: np.ndarray, wrong: np.ndarray, risk: float, delta: float, block: int = 1024) -> int:
    smallest = math.ceil(math.log(delta) / math.log1p(-risk))
    first = int(np.searchsorted(accepted, smallest))
    if first >= accepted.size:
        return -1
    # Only the first failing test matters. Both the mistakes and the allowance grow with the
    # acceptance set, so a block whose last mistake count is within the allowance of its first
    # candidate passes whole; p-values are computed only inside blocks where that check fails.
    starts = np.arange(first, accepted.size, block)
    ends = np.minimum(starts + block, accepted.size)
    if starts.size == 1:  # one block: computing its p-values costs less than the check
        passes_whole = np.zeros(1, dtype=bool)
    else:
        passes_whole = wrong[ends - 1] <= _most_wrong(accepted[starts], risk, delta)
    for a, b in zip(starts[~passes_whole], ends[~passes_whole]):
        p = bdtr(wrong[a:b], accepted[a:b], risk)  # P(Bin(n, risk) <= e)
        failed = np.flatnonzero(p > delta)
        if failed.size:
            return a + int(failed[0]) - 1 if a + failed[0] > first else -1
    return accepted.size - 1


def calibrate(
    scores: Any,
    correct: Any,
    risk: float,
    delta: float = 0.05,
    method: Literal["sgr", "ltt"] = "sgr",
) -> float:
    """A threshold ``t`` (accept where ``score <= t``) whose selective risk is at most ``risk`` with
    probability at least ``1 - delta`` over the draw of the calibration data.

    ``scores``: 1-D, higher = more likely to fail (any ebood score or detector output).
    ``correct``: bool per sample, True where the prediction was right. ``method``: ``"sgr"``
    (Geifman & El-Yaniv 2017) or ``"ltt"`` (Learn-then-Test); see the module docstring.
    Returns ``-inf`` (reject everything) with a warning when no threshold can be certified.
    """
    r, d = _check_risk_delta(risk, delta)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    values, accepted, wrong = _cumulative(scores, correct)
    best = (_sgr if method == "sgr" else _ltt)(accepted, wrong, r, d)
    if best < 0:
        warnings.warn(
            f"calibrate: no threshold certifies a selective risk <= {r} at delta = {d} from {int(accepted[-1])} samples "
            "(too few samples, or an error rate too high); the threshold rejects everything",
            RuntimeWarning,
            stacklevel=2,
        )
        return -math.inf
    return float(values[best])

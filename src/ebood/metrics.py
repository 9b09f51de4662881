"""OOD detection metrics, exact in float64, from one sort of the pooled scores.

Inputs are OOD scores (higher = more OOD) of in-distribution samples (``id_scores``) and of
out-of-distribution samples (``ood_scores``). Definitions follow CONVENTIONS.md exactly:

* ``auroc``: ``P(ood > id) + 0.5 P(ood == id)`` (= scikit-learn ``roc_auc_score`` with OOD = 1).
* ``aupr_out``: average precision with OOD positive, ranked by score.
* ``aupr_in``: average precision with ID positive, ranked by ``-score``.
* ``fpr_at_tpr(tpr, positive="id")``: a sample is accepted as ID when ``score <= t``; ``t`` is the
  smallest threshold accepting at least ``tpr`` of ID; returns the fraction of OOD accepted at ``t``
  (the reading of the energy-OOD and MSP-baseline papers).
* ``fpr_at_tpr(tpr, positive="ood")``: a sample is flagged when ``score >= t``; ``t`` is the largest
  threshold flagging at least ``tpr`` of OOD; returns the fraction of ID flagged (OpenOOD,
  pytorch-ood).

Average precision uses scikit-learn's step-wise definition ``sum_k (R_k - R_{k-1}) P_k`` over
distinct thresholds, so tied scores form one operating point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._arrays import as_scores_1d

__all__ = ["auroc", "aupr_in", "aupr_out", "fpr_at_tpr", "evaluate", "id_threshold", "METRIC_NAMES"]

METRIC_NAMES = ("fpr95", "auroc", "aupr_in", "aupr_out")


@dataclass(frozen=True)
class _Ranked:
    """Pooled scores grouped by distinct value, ascending, with ID / OOD counts per group."""

    values: np.ndarray
    n_id: np.ndarray
    n_ood: np.ndarray

    @property
    def total_id(self) -> int:
        return int(self.n_id.sum())

    @property
    def total_ood(self) -> int:
        return int(self.n_ood.sum())


def _rank(id_scores: Any, ood_scores: Any) -> _Ranked:
    a = as_scores_1d(id_scores, "id_scores")
    b = as_scores_1d(ood_scores, "ood_scores")
    pooled = np.concatenate([a, b])
    order = np.argsort(pooled, kind="stable")
    s = pooled[order]
    is_ood = order >= a.size
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ood_per_group = np.add.reduceat(is_ood.astype(np.int64), starts)
    size = np.diff(np.r_[starts, s.size])
    return _Ranked(values=s[starts], n_id=size - ood_per_group, n_ood=ood_per_group)


def _check_tpr(tpr: float) -> float:
    if isinstance(tpr, (str, bytes, bool)):
        raise TypeError(f"tpr must be a number in (0, 1], got {tpr!r}")
    t = float(tpr)
    if not (0.0 < t <= 1.0) or math.isnan(t):
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    return t


def _needed(tpr: float, n: int) -> int:
    """Smallest k with k / n >= tpr (computed so that 0.95 * 100 gives 95, not 96)."""
    k = max(1, math.ceil(tpr * n))
    while k > 1 and (k - 1) / n >= tpr:
        k -= 1
    while k < n and k / n < tpr:
        k += 1
    return k


def _auroc(r: _Ranked) -> float:
    id_below = np.cumsum(r.n_id) - r.n_id
    wins = np.sum(r.n_ood * (id_below + 0.5 * r.n_id))
    return float(wins / (r.total_id * r.total_ood))


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """AP over groups already in ranking order (most positive-looking first)."""
    tp = np.cumsum(pos)
    fp = np.cumsum(neg)
    precision = tp / (tp + fp)
    return float(np.sum(pos * precision) / tp[-1])


def _fpr(r: _Ranked, tpr: float, positive: str) -> float:
    if positive == "id":
        k = _needed(tpr, r.total_id)
        g = int(np.searchsorted(np.cumsum(r.n_id), k))  # first group where k ID are accepted
        return float(r.n_ood[: g + 1].sum() / r.total_ood)
    if positive == "ood":
        k = _needed(tpr, r.total_ood)
        g = int(np.searchsorted(np.cumsum(r.n_ood[::-1]), k))
        return float(r.n_id[::-1][: g + 1].sum() / r.total_id)
    raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}")


def _metrics(r: _Ranked, tpr: float, positive: str) -> dict[str, float]:
    return {
        "fpr95": _fpr(r, tpr, positive),
        "auroc": _auroc(r),
        "aupr_in": _average_precision(r.n_id, r.n_ood),
        "aupr_out": _average_precision(r.n_ood[::-1], r.n_id[::-1]),
    }


def auroc(id_scores: Any, ood_scores: Any) -> float:
    """Area under the ROC curve with OOD as the positive class: ``P(ood > id) + 0.5 P(ood == id)``."""
    return _auroc(_rank(id_scores, ood_scores))


def aupr_out(id_scores: Any, ood_scores: Any) -> float:
    """Average precision with OOD as the positive class, ranked by score."""
    r = _rank(id_scores, ood_scores)
    return _average_precision(r.n_ood[::-1], r.n_id[::-1])


def aupr_in(id_scores: Any, ood_scores: Any) -> float:
    """Average precision with ID as the positive class, ranked by ``-score``."""
    r = _rank(id_scores, ood_scores)
    return _average_precision(r.n_id, r.n_ood)


def fpr_at_tpr(
    id_scores: Any, ood_scores: Any, tpr: float = 0.95, positive: Literal["id", "ood"] = "id"
) -> float:
    """False positive rate at a true positive rate of ``tpr``, exact on ties.

    ``positive="id"`` (default; energy paper): fraction of OOD accepted when at least ``tpr`` of
    ID is accepted (accepted = ``score <= t``, OOD tied with ``t`` counts as accepted).
    ``positive="ood"`` (OpenOOD): fraction of ID flagged when at least ``tpr`` of OOD is flagged
    (flagged = ``score >= t``, ID tied with ``t`` counts as flagged).
    """
    return _fpr(_rank(id_scores, ood_scores), _check_tpr(tpr), positive)


def evaluate(
    id_scores: Any, ood_scores: Any, tpr: float = 0.95, positive: Literal["id", "ood"] = "id"
) -> dict[str, float]:
    """All metrics from one sort: ``{"fpr95", "auroc", "aupr_in", "aupr_out"}`` as fractions.

    ``fpr95`` is :func:`fpr_at_tpr` at ``tpr`` (0.95 unless given) with the given ``positive``.
    """
    return _metrics(_rank(id_scores, ood_scores), _check_tpr(tpr), positive)


def id_threshold(id_scores: Any, tpr: float = 0.95) -> float:
    """The threshold ``t`` at which at least ``tpr`` of ID is accepted (``score <= t``).

    The smallest such threshold: the ``k``-th smallest ID score with ``k = ceil(tpr * n)``.
    """
    a = as_scores_1d(id_scores, "id_scores")
    k = _needed(_check_tpr(tpr), a.size)
    return float(np.partition(a, k - 1)[k - 1])

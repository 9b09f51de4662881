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

Failure detection and selective prediction (CONVENTIONS.md, "Failure detection and selective
prediction") take ``scores`` (higher = more likely to fail) and ``correct`` (the prediction was
right); a prediction is accepted when ``score <= t``, and every tie group is one threshold:

* ``misclassification``: AUROC / FPR at 95% TPR / AUPR with the correct predictions as the
  positive (kept) class (Hendrycks & Gimpel, ICLR 2017).
* ``risk_coverage``: for every distinct score ``t``, coverage = fraction accepted and risk =
  mean loss of the accepted (the 0/1 error unless a per-sample ``loss`` is given).
* ``aurc``: the mean over samples of the risk at the first acceptance set that contains the
  sample's tie group; ``e_aurc``: ``aurc`` minus that of the optimal ordering (Geifman, Uziel &
  El-Yaniv, ICLR 2019).
* ``selective_risk(coverage=c)`` and ``coverage_at_risk(risk=r)``: points on that curve.
* ``failure``: the misclassification metrics and ``aurc`` over ID and OOD samples together, OOD
  samples counted as failures (Jaeger et al., ICLR 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._arrays import as_correct, as_scores_1d

__all__ = [
    "auroc",
    "aupr_in",
    "aupr_out",
    "fpr_at_tpr",
    "evaluate",
    "id_threshold",
    "METRIC_NAMES",
    "misclassification",
    "risk_coverage",
    "aurc",
    "e_aurc",
    "selective_risk",
    "coverage_at_risk",
    "failure",
]

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


# ----- failure detection and selective prediction ------------------------------------------------


def _sample_losses(correct: Any, loss: Any, n: int) -> np.ndarray:
    """The per-sample loss: ``loss`` when given (finite, >= 0), else the 0/1 error ``1 - correct``."""
    if loss is None:
        if correct is None:
            raise ValueError("give correct (the 0/1 error is the risk) or a per-sample loss")
        return (~as_correct(correct, n)).astype(np.int64)
    values = as_scores_1d(loss, "loss")
    if values.size != n:
        raise ValueError(f"loss has {values.size} entries but scores has {n}: one loss per score is needed")
    if (values < 0).any():
        i = int(np.flatnonzero(values < 0)[0])
        raise ValueError(f"loss must be >= 0, got {values[i]!r} at index {i}")
    if correct is not None:
        as_correct(correct, n)
    return values


@dataclass(frozen=True)
class _Curve:
    """Samples grouped by distinct score, ascending (accepted first): group sizes and loss sums."""

    values: np.ndarray
    counts: np.ndarray
    loss_sums: np.ndarray

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def coverage_risk(self) -> tuple[np.ndarray, np.ndarray]:
        accepted = np.cumsum(self.counts)
        return accepted / self.total, np.cumsum(self.loss_sums) / accepted


def _tie_groups(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, starts, sizes)``: the ascending order of ``s`` and where each tie group starts."""
    order = np.argsort(s)
    ordered = s[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    return order, starts, np.diff(np.r_[starts, s.size])


def _curve_and_losses(scores: Any, correct: Any, loss: Any) -> tuple[_Curve, np.ndarray]:
    s = as_scores_1d(scores, "scores")
    per_sample = _sample_losses(correct, loss, s.size)
    order, starts, sizes = _tie_groups(s)
    return _Curve(s[order[starts]], sizes, np.add.reduceat(per_sample[order], starts)), per_sample


def _curve(scores: Any, correct: Any, loss: Any) -> _Curve:
    return _curve_and_losses(scores, correct, loss)[0]


def _aurc(c: _Curve) -> float:
    _, risk = c.coverage_risk()
    return float(np.dot(c.counts, risk) / c.total)


def _optimal_aurc(c: _Curve, per_sample: np.ndarray | None) -> float:
    """AURC of the ordering by increasing loss, one sample per threshold (the best any score can do)."""
    n = c.total
    if per_sample is None:  # 0/1 loss: every correct prediction first, then the wrong ones
        wrong = int(c.loss_sums.sum())
        i = np.arange(n - wrong + 1, n + 1, dtype=np.float64)
        return float(np.sum((i - (n - wrong)) / i) / n)
    risk = np.cumsum(np.sort(per_sample)) / np.arange(1, n + 1)
    return float(risk.mean())


def _check_fraction(value: float, name: str, low_open: bool = True) -> float:
    v = float(value)
    ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v <= 1.0)
    if not ok or math.isnan(v):
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")
    return v


def risk_coverage(scores: Any, correct: Any, *, loss: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The risk-coverage curve: ``(coverage, risk)``, float64 arrays with one point per distinct score.

    Thresholds run over the distinct scores in increasing order (a tie group is one threshold);
    at ``t`` a prediction is accepted when ``score <= t``, coverage is the fraction accepted and
    risk the mean loss of the accepted: the 0/1 error ``1 - correct`` unless a per-sample
    ``loss`` is given (then ``correct`` may be None). The last point has coverage 1.
    """
    return _curve(scores, correct, loss).coverage_risk()


def aurc(scores: Any, correct: Any, *, loss: Any = None) -> float:
    """Area under the risk-coverage curve (Geifman, Uziel & El-Yaniv, ICLR 2019), lower is better.

    ``aurc = (1/N) sum_i risk(t_i)`` where ``t_i`` is the score of sample ``i``: each tie group
    contributes the risk of the first acceptance set containing it, weighted by its size.
    """
    return _aurc(_curve(scores, correct, loss))


def e_aurc(scores: Any, correct: Any, *, loss: Any = None) -> float:
    """Excess AURC: ``aurc`` minus the AURC of the optimal ordering (every correct prediction
    before every wrong one; with a ``loss``, samples in increasing loss), one sample per step."""
    c, per_sample = _curve_and_losses(scores, correct, loss)
    return _aurc(c) - _optimal_aurc(c, None if loss is None else per_sample)


def selective_risk(scores: Any, correct: Any, coverage: float, *, loss: Any = None) -> float:
    """Risk at the smallest threshold whose coverage is at least ``coverage`` (in (0, 1])."""
    c = _curve(scores, correct, loss)
    k = _needed(_check_fraction(coverage, "coverage"), c.total)
    g = int(np.searchsorted(np.cumsum(c.counts), k))
    _, risk = c.coverage_risk()
    return float(risk[g])


def coverage_at_risk(scores: Any, correct: Any, risk: float, *, loss: Any = None) -> float:
    """The largest coverage whose risk is at most ``risk`` (0 when no threshold reaches it)."""
    r = float(risk)
    if not math.isfinite(r) or r < 0:
        raise ValueError(f"risk must be a finite number >= 0, got {risk!r}")
    cov, rk = _curve(scores, correct, loss).coverage_risk()
    ok = np.flatnonzero(rk <= r)
    return float(cov[ok[-1]]) if ok.size else 0.0


def _misclassification(s: np.ndarray, ok: np.ndarray, tpr: float, what: str) -> tuple[dict[str, float], _Ranked, np.ndarray, np.ndarray]:
    n_right = int(ok.sum())
    if n_right == 0 or n_right == ok.size:
        kind = "wrong" if n_right == ok.size else "correct"
        raise ValueError(f"{what} needs both correct and wrong predictions, but there is no {kind} one")
    order, starts, sizes = _tie_groups(s)
    wrong = np.add.reduceat((~ok[order]).astype(np.int64), starts)
    r = _Ranked(values=s[order[starts]], n_id=sizes - wrong, n_ood=wrong)
    out = {"auroc": _auroc(r), "fpr95": _fpr(r, tpr, "id"), "aupr": _average_precision(r.n_id, r.n_ood)}
    return out, r, sizes, wrong


def misclassification(scores: Any, correct: Any, *, tpr: float = 0.95) -> dict[str, float]:
    """Misclassification detection: ``{"auroc", "fpr95", "aupr"}`` with the correct predictions as
    the positive (kept) class (Hendrycks & Gimpel, ICLR 2017).

    ``auroc = P(score_wrong > score_right) + 0.5 P(equal)``; ``fpr95`` is the fraction of wrong
    predictions accepted when at least ``tpr`` of the correct ones are (accepted = ``score <= t``,
    as :func:`fpr_at_tpr` with ``positive="id"``); ``aupr`` is the average precision of finding
    the correct predictions ranked by ``-score``.
    """
    s = as_scores_1d(scores, "scores")
    out, *_ = _misclassification(s, as_correct(correct, s.size), _check_tpr(tpr), "misclassification")
    return out


def failure(id_scores: Any, id_correct: Any, ood_scores: Any, *, tpr: float = 0.95) -> dict[str, float]:
    """Failure detection over ID and OOD together (Jaeger et al., ICLR 2023): every OOD sample is a
    failure. ``{"auroc", "fpr95", "aupr", "aurc"}`` as :func:`misclassification` and :func:`aurc`
    on the pooled scores."""
    a = as_scores_1d(id_scores, "id_scores")
    b = as_scores_1d(ood_scores, "ood_scores")
    ok = np.concatenate([as_correct(id_correct, a.size, "id_correct"), np.zeros(b.size, dtype=bool)])
    out, _, sizes, wrong = _misclassification(np.concatenate([a, b]), ok, _check_tpr(tpr), "failure")
    accepted = np.cumsum(sizes)
    out["aurc"] = float(np.dot(sizes, np.cumsum(wrong) / accepted) / accepted[-1])
    return out

"""ebood.metrics against scikit-learn and hand-worked cases (CONVENTIONS.md definitions)."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from ebood import metrics


def sk_reference(id_s, ood_s):
    y = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    s = np.r_[id_s, ood_s]
    return {
        "auroc": roc_auc_score(y, s),
        "aupr_out": average_precision_score(y, s),
        "aupr_in": average_precision_score(1 - y, -s),
    }


def brute_fpr_id_positive(id_s, ood_s, tpr):
    """Scan every candidate threshold: smallest t with mean(id <= t) >= tpr, then mean(ood <= t)."""
    for t in np.sort(np.unique(np.r_[id_s, ood_s])):
        if np.mean(id_s <= t) >= tpr - 1e-12 and np.sum(id_s <= t) >= math.ceil(round(tpr * len(id_s), 9)):
            return float(np.mean(ood_s <= t))
    raise AssertionError


def brute_fpr_ood_positive(id_s, ood_s, tpr):
    for t in np.sort(np.unique(np.r_[id_s, ood_s]))[::-1]:
        if np.sum(ood_s >= t) >= math.ceil(round(tpr * len(ood_s), 9)):
            return float(np.mean(id_s >= t))
    raise AssertionError


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tied", [False, True])
def test_matches_sklearn(seed, tied):
    rng = np.random.default_rng(seed)
    id_s = rng.normal(0, 1, 300 + seed * 17)
    ood_s = rng.normal(0.8, 1.3, 200 + seed * 11)
    if tied:  # heavy ties, within and across the two sets
        id_s, ood_s = np.round(id_s * 2) / 2, np.round(ood_s * 2) / 2
    got = metrics.evaluate(id_s, ood_s)
    ref = sk_reference(id_s, ood_s)
    for k in ("auroc", "aupr_in", "aupr_out"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k
    assert got["fpr95"] == pytest.approx(brute_fpr_id_positive(id_s, ood_s, 0.95), abs=0)
    assert metrics.fpr_at_tpr(id_s, ood_s, positive="ood") == pytest.approx(brute_fpr_ood_positive(id_s, ood_s, 0.95), abs=0)
    assert metrics.auroc(id_s, ood_s) == got["auroc"]
    assert metrics.aupr_in(id_s, ood_s) == got["aupr_in"]
    assert metrics.aupr_out(id_s, ood_s) == got["aupr_out"]


def test_ood_positive_fpr_matches_sklearn_roc_curve_without_ties():
    rng = np.random.default_rng(7)
    id_s, ood_s = rng.normal(0, 1, 1000), rng.normal(1, 1, 1000)
    y = np.r_[np.zeros(1000), np.ones(1000)]
    fpr, tpr_curve, _ = roc_curve(y, np.r_[id_s, ood_s], drop_intermediate=False)
    expected = fpr[np.searchsorted(tpr_curve, 0.95, side="left")]
    assert metrics.fpr_at_tpr(id_s, ood_s, 0.95, positive="ood") == pytest.approx(expected, abs=0)


def test_hand_worked_example():
    # ID scores 1..20; 95% of 20 = 19 must be accepted -> t = 19.
    id_s = np.arange(1, 21, dtype=float)
    ood_s = np.array([0.5, 19.0, 19.5, 25.0])
    # OOD accepted at t=19: 0.5 and the tie 19.0 -> 2/4.
    assert metrics.fpr_at_tpr(id_s, ood_s) == 0.5
    # AUROC: pairs (ood > id) + 0.5 ties: 0.5 ->0, 19 -> 18 + .5, 19.5 -> 19, 25 -> 20 => 57.5 / 80
    assert metrics.auroc(id_s, ood_s) == pytest.approx(57.5 / 80)
    # OOD-positive: flag 95% of 4 OOD -> all 4 -> t = 0.5 -> every ID flagged.
    assert metrics.fpr_at_tpr(id_s, ood_s, positive="ood") == 1.0


def test_exact_95_point_is_not_skipped():
    # 100 ID scores; the 95th smallest is exactly 94 -> OOD at 94.5 is rejected, at 94 accepted.
    id_s = np.arange(100, dtype=float)
    assert metrics.fpr_at_tpr(id_s, np.array([94.5])) == 0.0
    assert metrics.fpr_at_tpr(id_s, np.array([94.0])) == 1.0


def test_all_scores_tied():
    s = np.zeros(50)
    m = metrics.evaluate(s, s[:30])
    assert m["fpr95"] == 1.0  # oodeel returns 0 here; every OOD is accepted with the ID
    assert m["auroc"] == 0.5
    assert m["aupr_out"] == pytest.approx(30 / 80)
    assert m["aupr_in"] == pytest.approx(50 / 80)
    assert metrics.fpr_at_tpr(s, s[:30], positive="ood") == 1.0


def test_perfect_and_reversed_separation():
    id_s, ood_s = np.zeros(10), np.ones(10)
    assert metrics.evaluate(id_s, ood_s) == {"fpr95": 0.0, "auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0}
    assert metrics.evaluate(ood_s, id_s)["fpr95"] == 1.0
    assert metrics.evaluate(ood_s, id_s)["auroc"] == 0.0


def test_accepts_torch_and_lists():
    a = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float16)
    assert metrics.auroc(a, [0.25, 0.5]) == pytest.approx(roc_auc_score([0, 0, 0, 1, 1], [*a.double().tolist(), 0.25, 0.5]))


@pytest.mark.parametrize(
    "id_s, ood_s, match",
    [
        ([], [1.0], "id_scores is empty"),
        ([1.0], [], "ood_scores is empty"),
        ([1.0, np.nan], [1.0], "NaN"),
        ([1.0], [np.inf], "inf"),
        ([[1.0, 2.0]], [1.0], "1-D"),
    ],
)
def test_bad_inputs(id_s, ood_s, match):
    with pytest.raises(ValueError, match=match):
        metrics.evaluate(np.asarray(id_s, dtype=float), np.asarray(ood_s, dtype=float))


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.01, float("nan")])
def test_bad_tpr(tpr):
    with pytest.raises(ValueError, match="tpr"):
        metrics.fpr_at_tpr([1.0, 2.0], [3.0], tpr=tpr)


def test_bad_positive():
    with pytest.raises(ValueError, match="positive"):
        metrics.fpr_at_tpr([1.0, 2.0], [3.0], positive="both")


def test_id_threshold_keeps_tpr_of_id():
    rng = np.random.default_rng(3)
    s = rng.normal(size=1001)
    t = metrics.id_threshold(s, 0.95)
    assert np.mean(s <= t) >= 0.95
    assert np.mean(s < t) < 0.95  # smallest such threshold
    assert t in s


def test_large_inputs_are_fast_enough():
    rng = np.random.default_rng(0)
    id_s, ood_s = rng.normal(size=1_000_000), rng.normal(0.5, 1, size=1_000_000)
    got = metrics.evaluate(id_s, ood_s)
    assert got["auroc"] == pytest.approx(roc_auc_score(np.r_[np.zeros(10**6), np.ones(10**6)], np.r_[id_s, ood_s]), abs=1e-12)

"""ebood.metrics failure-detection / selective-prediction metrics against brute force and sklearn."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from ebood import metrics


# ----- brute-force references (one threshold at a time, straight from CONVENTIONS.md) -------------


def brute_curve(s, loss):
    cov, risk = [], []
    for t in np.unique(s):
        acc = s <= t
        cov.append(acc.mean())
        risk.append(loss[acc].mean())
    return np.array(cov), np.array(risk)


def brute_aurc(s, loss):
    return float(np.mean([loss[s <= t].mean() for t in s]))


def brute_optimal_aurc(loss):
    ordered = np.sort(loss, kind="stable")
    return float(np.mean([ordered[: k + 1].mean() for k in range(len(ordered))]))


def brute_selective_risk(s, loss, c):
    need = math.ceil(round(c * len(s), 9))
    for t in np.unique(s):
        if np.sum(s <= t) >= need:
            return float(loss[s <= t].mean())
    raise AssertionError


def brute_coverage_at_risk(s, loss, r):
    best = 0.0
    for t in np.unique(s):
        acc = s <= t
        if loss[acc].mean() <= r:
            best = max(best, acc.mean())
    return best


def brute_fpr95(s, ok):
    need = math.ceil(round(0.95 * ok.sum(), 9))
    for t in np.unique(s):
        if np.sum(s[ok] <= t) >= need:
            return float(np.mean(s[~ok] <= t))
    raise AssertionError


def case(kind, seed, n=400):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=n)
    p_wrong = {"random": 0.3, "tied": 0.3, "few_wrong": 0.02, "few_right": 0.97}[kind]
    # failures lean towards high scores, so the metrics are not all at chance
    wrong = rng.random(n) < np.clip(p_wrong * (1 + 0.8 * np.tanh(s)), 0, 1)
    if kind == "tied":
        s = np.round(s * 2) / 2
    if wrong.all() or not wrong.any():
        wrong[0] = not wrong[0]
    return s, ~wrong


KINDS = ["random", "tied", "few_wrong", "few_right"]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", KINDS)
def test_selective_metrics_match_brute_force(kind, seed):
    s, ok = case(kind, seed)
    loss = (~ok).astype(float)
    cov, risk = metrics.risk_coverage(s, ok)
    ref_cov, ref_risk = brute_curve(s, loss)
    np.testing.assert_allclose(cov, ref_cov, rtol=0, atol=1e-15)
    np.testing.assert_allclose(risk, ref_risk, rtol=0, atol=1e-15)
    assert metrics.aurc(s, ok) == pytest.approx(brute_aurc(s, loss), abs=1e-14)
    assert metrics.e_aurc(s, ok) == pytest.approx(brute_aurc(s, loss) - brute_optimal_aurc(loss), abs=1e-14)
    for c in (0.01, 0.3, 0.5, 0.95, 1.0):
        assert metrics.selective_risk(s, ok, coverage=c) == pytest.approx(brute_selective_risk(s, loss, c), abs=1e-15)
    for r in (0.0, 0.01, 0.1, 0.25, 1.0):
        assert metrics.coverage_at_risk(s, ok, risk=r) == pytest.approx(brute_coverage_at_risk(s, loss, r), abs=1e-15)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tied", [False, True])
def test_per_sample_loss_matches_brute_force(seed, tied):
    rng = np.random.default_rng(100 + seed)
    s = rng.normal(size=300)
    if tied:
        s = np.round(s)
    loss = rng.exponential(size=300) * (1 + (s > 0))
    cov, risk = metrics.risk_coverage(s, None, loss=loss)
    ref_cov, ref_risk = brute_curve(s, loss)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-14)
    np.testing.assert_allclose(risk, ref_risk, rtol=1e-12)
    assert metrics.aurc(s, None, loss=loss) == pytest.approx(brute_aurc(s, loss), rel=1e-12)
    assert metrics.e_aurc(s, None, loss=loss) == pytest.approx(brute_aurc(s, loss) - brute_optimal_aurc(loss), rel=1e-10)
    assert metrics.selective_risk(s, None, 0.4, loss=loss) == pytest.approx(brute_selective_risk(s, loss, 0.4), rel=1e-12)
    assert metrics.coverage_at_risk(s, None, 1.0, loss=loss) == pytest.approx(brute_coverage_at_risk(s, loss, 1.0), abs=1e-15)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", KINDS)
def test_misclassification_matches_sklearn(kind, seed):
    s, ok = case(kind, seed)
    got = metrics.misclassification(s, ok)
    assert got["auroc"] == pytest.approx(roc_auc_score(~ok, s), abs=1e-12)
    assert got["aupr"] == pytest.approx(average_precision_score(ok, -s), abs=1e-12)
    assert got["fpr95"] == brute_fpr95(s, ok)


@pytest.mark.parametrize("tied", [False, True])
def test_failure_counts_ood_as_failures(tied):
    rng = np.random.default_rng(5)
    id_s, ood_s = rng.normal(size=300), rng.normal(0.7, 1, size=150)
    if tied:
        id_s, ood_s = np.round(id_s), np.round(ood_s)
    ok = rng.random(300) < 0.85
    got = metrics.failure(id_s, ok, ood_s)
    s = np.r_[id_s, ood_s]
    pooled_ok = np.r_[ok, np.zeros(150, dtype=bool)]
    assert got["auroc"] == pytest.approx(roc_auc_score(~pooled_ok, s), abs=1e-12)
    assert got["aupr"] == pytest.approx(average_precision_score(pooled_ok, -s), abs=1e-12)
    assert got["fpr95"] == brute_fpr95(s, pooled_ok)
    assert got["aurc"] == pytest.approx(brute_aurc(s, (~pooled_ok).astype(float)), abs=1e-14)


def test_worked_example():
    # scores 1 < 2 = 2 < 3; wrong at 2 (one of the tied pair) and 3
    s = np.array([1.0, 2.0, 2.0, 3.0])
    ok = np.array([True, True, False, False])
    cov, risk = metrics.risk_coverage(s, ok)
    np.testing.assert_allclose(cov, [0.25, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 1 / 3, 0.5])
    assert metrics.aurc(s, ok) == pytest.approx((0 + 2 / 3 + 0.5) / 4)
    # optimal: 0, 0, 1/3, 1/2
    assert metrics.e_aurc(s, ok) == pytest.approx((2 / 3 + 0.5) / 4 - (1 / 3 + 0.5) / 4)
    assert metrics.selective_risk(s, ok, coverage=0.5) == pytest.approx(1 / 3)
    assert metrics.coverage_at_risk(s, ok, risk=0.4) == 0.75
    assert metrics.coverage_at_risk(s, ~np.ones(4, bool) | False, risk=0.0) == 0.0


def test_perfect_ordering_has_zero_excess_and_the_papers_optimal_aurc():
    n, wrong = 100_000, 20_000
    s = np.arange(n, dtype=float)
    ok = np.arange(n) < n - wrong
    assert metrics.e_aurc(s, ok) == pytest.approx(0.0, abs=1e-15)
    r = wrong / n  # Geifman et al. 2019: optimal AURC ~ r + (1 - r) ln(1 - r)
    assert metrics.aurc(s, ok) == pytest.approx(r + (1 - r) * math.log(1 - r), abs=1e-4)


def test_accepts_torch_tensors_and_01_numbers():
    s, ok = case("random", 0)
    ref = metrics.aurc(s, ok)
    assert metrics.aurc(torch.tensor(s, dtype=torch.float64), torch.tensor(ok)) == ref
    assert metrics.aurc(s, ok.astype(np.int64)) == ref
    assert metrics.misclassification(torch.tensor(s), ok.astype(float)) == metrics.misclassification(s, ok)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: metrics.aurc([0.1, np.nan], [True, False]), "NaN"),
        (lambda: metrics.aurc([], []), "empty"),
        (lambda: metrics.aurc([0.1, 0.2], [True]), "1 entries but scores has 2"),
        (lambda: metrics.aurc([0.1, 0.2], [1, 2]), "boolean or 0/1"),
        (lambda: metrics.aurc([0.1, 0.2], ["a", "b"]), "boolean"),
        (lambda: metrics.aurc([[0.1, 0.2]], [True, False]), "1-D"),
        (lambda: metrics.aurc([0.1, 0.2], None), "correct"),
        (lambda: metrics.aurc([0.1, 0.2], None, loss=[1.0, -1.0]), ">= 0"),
        (lambda: metrics.selective_risk([0.1, 0.2], [True, False], coverage=0), "coverage"),
        (lambda: metrics.coverage_at_risk([0.1, 0.2], [True, False], risk=-0.1), "risk"),
        (lambda: metrics.misclassification([0.1, 0.2], [True, True]), "no wrong"),
        (lambda: metrics.failure([0.1, 0.2], [False, False], [0.3]), "no correct"),
        (lambda: metrics.failure([0.1, 0.2], [True, False], [np.inf]), "ood_scores"),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()

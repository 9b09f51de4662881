"""ebood.selective.calibrate: the guarantee on simulated draws, and the procedures against a
straightforward re-implementation with scipy.stats."""

import math
import warnings

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom

from ebood.selective import calibrate

# Simulated task: score s ~ U(0, 1), P(wrong | s) = s^2, so the true selective risk of "accept
# s <= t" is E[s^2 | s <= t] = t^2 / 3, and a threshold meets risk r exactly when t^2 / 3 <= r.
RISK, DELTA, N, DRAWS = 0.1, 0.1, 1000, 1000


def draws(seed):
    rng = np.random.default_rng(seed)
    s = rng.random((DRAWS, N))
    return s, rng.random((DRAWS, N)) >= s**2


def naive_thresholds(s, ok):
    """The largest threshold whose *empirical* risk is <= RISK: no guarantee (vectorised)."""
    order = np.argsort(s, axis=1)
    ss = np.take_along_axis(s, order, axis=1)
    risk = np.cumsum(~np.take_along_axis(ok, order, axis=1), axis=1) / np.arange(1, N + 1)
    last = N - 1 - np.argmax((risk <= RISK)[:, ::-1], axis=1)
    return ss[np.arange(DRAWS), last]


@pytest.mark.parametrize("method", ["sgr", "ltt"])
def test_the_risk_guarantee_holds_on_fresh_draws(method):
    s, ok = draws(1 if method == "sgr" else 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = np.array([calibrate(s[i], ok[i], risk=RISK, delta=DELTA, method=method) for i in range(DRAWS)])
    violated = np.mean(t**2 / 3 > RISK)
    assert violated <= DELTA
    # not vacuous: the thresholds keep a useful share of the data (coverage = t)
    assert np.median(t) > 0.5 * math.sqrt(3 * RISK)
    # and the simulation can tell: picking by the empirical risk alone fails far more often than delta
    assert np.mean(naive_thresholds(s, ok) ** 2 / 3 > RISK) > 3 * DELTA


def reference_sgr(s, ok, risk, delta):
    """Geifman & El-Yaniv's Algorithm 1 on the distinct scores, bounds by root finding on binom.cdf."""
    values = np.unique(s)
    k = math.ceil(math.log2(len(values) + 1))

    def bound(t):
        acc = s <= t
        n, e = int(acc.sum()), int((~ok[acc]).sum())
        if e == n:
            return 1.0
        return brentq(lambda b: binom.cdf(e, n, b) - delta / k, 0.0, 1.0, xtol=1e-14)

    lo, hi, best = 0, len(values) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if bound(values[mid]) < risk:
            best, lo = values[mid], mid + 1
        else:
            hi = mid - 1
    return -math.inf if best is None else best


def reference_ltt(s, ok, risk, delta):
    """Every candidate's p-value (scipy.stats), then the fixed sequence scanned one by one."""
    values = np.unique(s)
    n = np.searchsorted(np.sort(s), values, side="right")
    e = np.array([np.sum(~ok[s <= t]) for t in values]) if len(values) <= 1000 else np.cumsum(
        np.bincount(np.searchsorted(values, s[~ok]), minlength=len(values)))
    p = binom.cdf(e, n, risk)
    best = -math.inf
    for t, size, pv in zip(values, n, p):
        if (1 - risk) ** size > delta:  # too few accepted for any p-value to reach delta: not tested yet
            continue
        if pv > delta:
            break
        best = t
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tied", [False, True])
def test_procedures_match_the_reference(seed, tied):
    rng = np.random.default_rng(seed)
    s = rng.random(800)
    if tied:
        s = np.round(s * 40) / 40
    ok = rng.random(800) >= 0.6 * s
    for risk in (0.05, 0.15):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert calibrate(s, ok, risk=risk, delta=0.05, method="sgr") == reference_sgr(s, ok, risk, 0.05)
            assert calibrate(s, ok, risk=risk, delta=0.05, method="ltt") == reference_ltt(s, ok, risk, 0.05)


def test_no_certifiable_threshold_rejects_everything_with_a_warning():
    with pytest.warns(RuntimeWarning, match="no threshold certifies"):
        assert calibrate([0.1, 0.2, 0.3], [True, True, False], risk=0.01, delta=0.05) == -math.inf


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(risk=0.0), "risk must be in"),
        (dict(risk=1.5), "risk must be in"),
        (dict(risk=0.1, delta=0.0), "delta must be in"),
        (dict(risk=0.1, method="bonferroni"), "method must be one of"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate([0.1, 0.2], [True, False], **kwargs)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="scores"):
        calibrate([0.1, float("nan")], [True, False], risk=0.1)
    with pytest.raises(ValueError, match="correct has 1 entries"):
        calibrate([0.1, 0.2], [True], risk=0.1)


@pytest.mark.parametrize("seed", range(3))
def test_ltt_over_many_blocks_matches_the_reference(seed):
    # several thousand candidates: the fixed sequence runs over many of the blocks that
    # calibrate skips whole, and must stop at the same first failure
    rng = np.random.default_rng(20 + seed)
    s = rng.random(6000)
    ok = rng.random(6000) >= 0.3 * s**2
    for risk in (0.03, 0.08):
        assert calibrate(s, ok, risk=risk, delta=0.05, method="ltt") == reference_ltt(s, ok, risk, 0.05)

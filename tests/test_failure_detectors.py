"""doctor, relu and softmax_centroid against float64 re-implementations of the papers' equations,
and risk-targeted calibrate / predict on detectors."""

import math

import numpy as np
import pytest
import torch
from scipy.special import softmax

import ebood
from ebood import detectors, metrics, selective
from ebood.detectors import MissingFieldError


def labelled(n=600, c=6, seed=0, margin=2.5):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    z[torch.arange(n), y] += margin
    return ebood.Outputs(logits=z, labels=y)


# ----- DOCTOR (Granese et al., NeurIPS 2021) --------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_doctor_matches_the_papers_discriminators(temperature):
    o = labelled()
    p = softmax(o.logits.numpy() / temperature, axis=1)
    g = (p**2).sum(axis=1)
    alpha = (1 - g) / g
    beta = (1 - p.max(axis=1)) / p.max(axis=1)
    got_a = detectors.create("doctor", variant="alpha", temperature=temperature).score(o).numpy()
    got_b = detectors.create("doctor", variant="beta", temperature=temperature).score(o).numpy()
    np.testing.assert_allclose(got_a, alpha, rtol=1e-10)
    np.testing.assert_allclose(got_b, beta, rtol=1e-10)


def test_doctor_keeps_precision_on_confident_predictions():
    # two classes, logit gap 40: p2 = e^-40 / (1 + e^-40); the naive 1 - p_max rounds to 0
    z = torch.tensor([[0.0, -40.0], [0.0, -30.0]], dtype=torch.float64)
    o = ebood.Outputs(logits=z)
    q = np.exp(-np.array([40.0, 30.0]))
    p1, p2 = 1 / (1 + q), q / (1 + q)
    np.testing.assert_allclose(detectors.create("doctor", variant="beta").score(o).numpy(), q, rtol=1e-12)
    np.testing.assert_allclose(detectors.create("doctor").score(o).numpy(), 2 * p1 * p2 / (p1**2 + p2**2), rtol=1e-12)
    assert detectors.create("doctor").score(o)[0] < detectors.create("doctor").score(o)[1]


def test_doctor_rejects_an_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        detectors.create("doctor", variant="gamma")


# ----- REL-U (Gomes et al., ICLR 2024) ----------------------------------------------------------


def relu_reference(z_fit, y_fit, z, lbd=0.5, temperature=1.0):
    p = softmax(z_fit / temperature, axis=1)
    right = p.argmax(axis=1) == y_fit
    pos = np.mean([np.outer(v, v) for v in p[right]], axis=0)
    neg = np.mean([np.outer(v, v) for v in p[~right]], axis=0)
    d = lbd * neg - (1 - lbd) * pos
    np.fill_diagonal(d, 0)
    d = np.maximum(d, 0)
    d /= np.sqrt((d**2).sum())
    q = softmax(z / temperature, axis=1)
    return d, np.array([v @ d @ v for v in q])


@pytest.mark.parametrize("lbd, temperature", [(0.5, 1.0), (0.8, 1.7)])
def test_relu_matches_the_closed_form(lbd, temperature):
    fit, test = labelled(seed=1), labelled(seed=2)
    det = detectors.create("relu", lbd=lbd, temperature=temperature).fit(fit)
    d, s = relu_reference(fit.logits.numpy(), fit.labels.numpy(), test.logits.numpy(), lbd, temperature)
    np.testing.assert_allclose(det.matrix_.numpy(), d, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(det.score(test).numpy(), s, rtol=1e-10)


def test_relu_falls_back_to_gini_without_wrong_predictions():
    o = labelled(margin=40.0)  # every prediction right: only the (clipped) negative term is left
    test = labelled(seed=3)
    with pytest.warns(RuntimeWarning, match="no wrong prediction"):
        det = detectors.create("relu").fit(o)
        det.score(test)
    c = test.logits.shape[1]
    p = softmax(test.logits.numpy(), axis=1)
    gini = (1 - (p**2).sum(axis=1)) / math.sqrt(c * (c - 1))
    np.testing.assert_allclose(det.score(test).numpy(), gini, rtol=1e-10)


def test_relu_streams_and_merges_like_one_fit():
    o = labelled(n=900)
    whole = detectors.create("relu").fit(o)
    parts = [detectors.create("relu").fit(b) for b in o.batches(300)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    streamed = detectors.create("relu").fit(o.batches(250))
    for other in (merged, streamed):
        torch.testing.assert_close(other.score(o), whole.score(o), rtol=1e-12, atol=1e-15)


def test_relu_beats_chance_on_misclassification():
    fit, test = labelled(n=3000, seed=4, margin=4.0), labelled(n=3000, seed=5, margin=4.0)
    s = detectors.create("relu").fit(fit).score(test)
    right = test.logits.argmax(1) == test.labels
    assert metrics.misclassification(s, right)["auroc"] > 0.7


# ----- softmax centroids (Sikar et al., 2024) ---------------------------------------------------


def test_softmax_centroid_matches_the_papers_definitions():
    fit, test = labelled(seed=6), labelled(seed=7)
    det = detectors.create("softmax_centroid").fit(fit)
    p = softmax(fit.logits.numpy(), axis=1)
    pred, y = p.argmax(axis=1), fit.labels.numpy()
    c = p.shape[1]
    centroids = np.stack([p[(pred == k) & (y == k)].mean(axis=0) for k in range(c)])
    dist = np.linalg.norm(p - centroids[pred], axis=1)
    thresholds = np.array([dist[(pred == k) & (y != k)].min() if ((pred == k) & (y != k)).any() else np.inf for k in range(c)])
    np.testing.assert_allclose(det.centroids_.numpy(), centroids, rtol=1e-12)
    np.testing.assert_allclose(det.safety_thresholds_.numpy(), thresholds, rtol=1e-12)
    q = softmax(test.logits.numpy(), axis=1)
    qd = np.linalg.norm(q - centroids[q.argmax(axis=1)], axis=1)
    np.testing.assert_allclose(det.score(test).numpy(), qd, rtol=1e-10)
    np.testing.assert_array_equal(det.defer(test).numpy(), qd >= thresholds[q.argmax(axis=1)])


def test_softmax_centroid_without_correct_predictions_of_a_class_warns():
    o = labelled(seed=8)
    z = o.logits.clone()
    z[:, 0] = -100.0  # class 0 is never predicted
    with pytest.warns(RuntimeWarning, match="no correct prediction of class"):
        det = detectors.create("softmax_centroid").fit(ebood.Outputs(logits=z, labels=o.labels))
    assert torch.equal(det.centroids_[0], torch.eye(z.shape[1], dtype=torch.float64)[0])


# ----- risk-targeted thresholds on detectors ------------------------------------------------------


@pytest.mark.parametrize("name, method", [("msp", "ltt"), ("doctor", "ltt"), ("relu", "sgr"), ("softmax_centroid", "sgr")])
def test_calibrate_with_a_risk_uses_the_guaranteed_threshold(name, method, tmp_path):
    fit, val = labelled(n=2000, seed=9, margin=6.0), labelled(n=3000, seed=10, margin=6.0)
    det = detectors.create(name).fit(fit)
    det.calibrate(val, risk=0.05, delta=0.1, method=method)
    s = det.score(val)
    right = (val.logits.argmax(1) == val.labels).numpy()
    assert det.threshold_ == selective.calibrate(s, right, risk=0.05, delta=0.1, method=method)
    # on the calibration data itself the accepted share is mostly right
    assert metrics.selective_risk(s, right, coverage=float(np.mean(s.numpy() <= det.threshold_))) <= 0.05
    flagged = det.predict(val, risk=0.1)  # a looser target is met by the same threshold
    assert torch.equal(flagged, s > det.threshold_)
    with pytest.raises(ValueError, match="calibrated for risk <= 0.05"):
        det.predict(val, risk=0.01)
    with pytest.raises(ValueError, match="not for tpr"):
        det.predict(val, tpr=0.9)
    loaded = detectors.load(det.save(tmp_path / "d.safetensors"))
    assert loaded.threshold_ == det.threshold_ and loaded.calibration_risk_ == 0.05
    assert loaded.calibration_method_ == method and loaded.calibration_delta_ == 0.1
    assert torch.equal(loaded.predict(val, risk=0.05), flagged)


def test_calibrate_with_a_risk_takes_explicit_correctness():
    o = labelled(n=2000, seed=11, margin=4.0)
    right = torch.ones(2000, dtype=torch.bool)
    right[:20] = False
    det = detectors.create("msp").calibrate(ebood.Outputs(logits=o.logits), risk=0.05, correct=right)
    assert det.threshold_ == selective.calibrate(det.score(o), right, risk=0.05)


def test_calibrate_errors_are_clear():
    o = labelled(n=200)
    det = detectors.create("msp")
    with pytest.raises(ValueError, match="either tpr= .* or risk="):
        det.calibrate(o, tpr=0.95, risk=0.1)
    with pytest.raises(MissingFieldError, match="labels"):
        det.calibrate(ebood.Outputs(logits=o.logits), risk=0.1)
    with pytest.raises(ValueError, match="no threshold certifies"):
        det.calibrate(o, risk=0.001)
    det.calibrate(o, tpr=0.9)
    assert det.calibration_tpr_ == 0.9 and not hasattr(det, "calibration_risk_")
    det.predict(o, tpr=0.85)
    with pytest.raises(ValueError, match="calibrated for tpr = 0.9"):
        det.predict(o, risk=0.1)

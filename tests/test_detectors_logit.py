"""GEN, KL matching and temperature scaling against float64 formulas written here from the papers."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import expit, logsumexp, softmax

import ebood
from ebood import detectors
from ebood.detectors import MissingFieldError


def outputs(logits, labels=None):
    return ebood.Outputs(logits=logits, labels=labels)


# ----- GEN ---------------------------------------------------------------------------------------


def gen_reference(z: np.ndarray, gamma: float, top_m: int) -> np.ndarray:
    p = softmax(z.astype(np.float64), axis=1)
    top = -np.sort(-p, axis=1)[:, :top_m]
    return np.sum(top**gamma * (1.0 - top) ** gamma, axis=1)


@pytest.mark.parametrize("gamma,top_m", [(0.1, 100), (0.5, 5), (1.0, 1), (2.0, 20), (0.01, 7)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gen_matches_formula(gamma, top_m, dtype):
    rng = np.random.default_rng(3)
    z = rng.normal(scale=2.0, size=(64, 20))
    got = detectors.create("gen", gamma=gamma, top_m=top_m).score(outputs(torch.tensor(z, dtype=dtype)))
    assert got.dtype == dtype and got.shape == (64,)
    ref = gen_reference(z, gamma, min(top_m, 20))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10 if dtype == torch.float64 else 2e-5)


def test_gen_top_m_is_clipped_to_the_number_of_classes():
    z = torch.randn(10, 6, dtype=torch.float64)
    a = detectors.create("gen", top_m=100).score(outputs(z))
    b = detectors.create("gen", top_m=6).score(outputs(z))
    assert torch.equal(a, b)
    c = detectors.create("gen", top_m=2).score(outputs(z))
    assert not torch.allclose(a, c)


def test_gen_worked_example_and_sign():
    # Uniform over two classes: p = (1/2, 1/2) -> G = 2 * (1/4)^gamma.
    uniform = detectors.create("gen").score(outputs(torch.zeros(1, 2, dtype=torch.float64)))
    assert uniform.item() == pytest.approx(2 * 0.25**0.1, rel=1e-12)
    # Logits (log 3, 0): p = (3/4, 1/4), G = 2 * (3/16)^gamma with gamma = 1.
    g = detectors.create("gen", gamma=1.0).score(outputs(torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)))
    assert g.item() == pytest.approx(2 * 3 / 16, rel=1e-12)
    # An uncertain (OOD-like) prediction scores higher than a confident (ID-like) one.
    s = detectors.create("gen").score(outputs(torch.tensor([[8.0, 0.0, 0.0], [0.1, 0.0, 0.0]])))
    assert s[1] > s[0]


def test_gen_keeps_the_tail_of_a_confident_float32_prediction():
    # p_max = 1 / (1 + 2 e^-40): 1 - p_max rounds to 0 in float32, but (1 - p_max)^0.1 ~ 0.02 matters.
    z = torch.tensor([[40.0, 0.0, 0.0]], dtype=torch.float32)
    got = detectors.create("gen").score(outputs(z)).item()
    tail = 2 * math.exp(-40) / (1 + 2 * math.exp(-40))  # 1 - p_max, exact in float64
    p_small = math.exp(-40) / (1 + 2 * math.exp(-40))
    ref = ((1 - tail) ** 0.1) * tail**0.1 + 2 * (p_small**0.1) * ((1 - p_small) ** 0.1)
    assert got == pytest.approx(ref, rel=1e-5)
    assert got > 0.01


def test_gen_degenerate_inputs():
    one_class = detectors.create("gen").score(outputs(torch.tensor([[3.0], [-1.0]])))
    assert torch.equal(one_class, torch.zeros(2))  # p = 1: nothing uncertain
    masked = detectors.create("gen", gamma=1.0).score(outputs(torch.tensor([[0.0, 0.0, -math.inf]], dtype=torch.float64)))
    assert masked.item() == pytest.approx(2 * 0.25, rel=1e-12)  # an impossible class adds 0
    empty = detectors.create("gen").score(outputs(torch.zeros(0, 4)))
    assert empty.shape == (0,)


@pytest.mark.parametrize("params", [{"gamma": 0}, {"gamma": -0.5}, {"gamma": math.nan}, {"top_m": 0}, {"top_m": 2.5}, {"top_m": True}])
def test_gen_rejects_bad_hyperparameters(params):
    with pytest.raises(ValueError, match="gamma|top_m"):
        detectors.create("gen", **params)


# ----- KL matching -------------------------------------------------------------------------------


def kl_matching_reference(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    p_train = softmax(train.astype(np.float64), axis=1)
    pred = p_train.argmax(axis=1)
    templates = [p_train[pred == c].mean(axis=0) for c in range(train.shape[1]) if np.any(pred == c)]
    p = softmax(test.astype(np.float64), axis=1)
    out = np.empty(len(p))
    for i, row in enumerate(p):
        out[i] = min(np.sum(row * (np.log(row) - np.log(d))) for d in templates)
    return out


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_kl_matching_matches_formula(dtype, rtol):
    rng = np.random.default_rng(0)
    train = rng.normal(scale=3.0, size=(400, 8))
    test = np.r_[rng.normal(scale=3.0, size=(50, 8)), rng.normal(scale=0.3, size=(50, 8))]
    train_t, test_t = torch.tensor(train, dtype=dtype), torch.tensor(test, dtype=dtype)
    det = detectors.create("kl_matching").fit(outputs(train_t))
    got = det.score(outputs(test_t))
    assert got.dtype == dtype
    ref = kl_matching_reference(train_t.double().numpy(), test_t.double().numpy())
    np.testing.assert_allclose(got.numpy(), ref, rtol=rtol, atol=1e-12)


def test_kl_matching_worked_example_direction_and_sign():
    # Templates d0 = (0.8, 0.2) (samples predicted 0) and d1 = (0.2, 0.8) (samples predicted 1).
    l4 = math.log(4.0)
    train = torch.tensor([[l4, 0.0], [l4, 0.0], [0.0, l4]], dtype=torch.float64)
    det = detectors.create("kl_matching").fit(outputs(train))
    s = det.score(outputs(torch.tensor([[l4, 0.0], [0.0, 0.0]], dtype=torch.float64)))
    assert s[0].item() == pytest.approx(0.0, abs=1e-15)  # matches a template exactly
    # KL((1/2, 1/2) || (0.8, 0.2)) = 0.5 log(0.5/0.8) + 0.5 log(0.5/0.2) = 0.5 log(1.5625);
    # the other direction, KL(d || p), would give 0.8 log 1.6 + 0.2 log 0.4 = 0.1927.
    assert s[1].item() == pytest.approx(0.5 * math.log(1.5625), rel=1e-12)
    assert s[1] > s[0]  # the uncertain (OOD-like) input scores higher


def test_kl_matching_class_never_predicted_gets_no_template():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(300, 5))
    train[:, 2] -= 50.0  # class 2 is never the argmax
    test = rng.normal(size=(40, 5))
    with pytest.warns(RuntimeWarning, match=r"class\(es\) \[2\]"):
        got = detectors.create("kl_matching").fit(outputs(torch.tensor(train))).score(outputs(torch.tensor(test)))
    np.testing.assert_allclose(got.numpy(), kl_matching_reference(train, test), rtol=1e-9)


def test_kl_matching_streams_and_refuses_bad_input():
    rng = np.random.default_rng(2)
    z = torch.tensor(rng.normal(size=(120, 6)))
    test = outputs(torch.tensor(rng.normal(size=(30, 6))))
    full = detectors.create("kl_matching").fit(outputs(z))
    streamed = detectors.create("kl_matching").fit(outputs(z).batches(17))
    torch.testing.assert_close(streamed.score(test), full.score(test), rtol=1e-12, atol=1e-14)
    bad = z.clone()
    bad[5, 1] = math.nan
    with pytest.raises(ValueError, match=r"non-finite.*row\(s\): 5"):
        detectors.create("kl_matching").fit(outputs(bad))
    with pytest.raises(ValueError, match="fitted on 6 classes"):
        full.score(outputs(torch.zeros(2, 7)))


# ----- temperature scaling -----------------------------------------------------------------------


def nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    return float(np.mean(logsumexp(z / t, axis=1) - z[np.arange(len(y)), y] / t))


def test_temperature_scaling_minimises_the_nll():
    rng = np.random.default_rng(4)
    z = rng.normal(scale=4.0, size=(600, 10))
    # Labels drawn from softmax(z / 2): the NLL-optimal temperature is near 2.
    p = softmax(z / 2.0, axis=1)
    y = np.array([rng.choice(10, p=row) for row in p])
    det = detectors.create("temperature_scaling").fit(outputs(torch.tensor(z, dtype=torch.float32), torch.tensor(y)))
    # Independent optimiser: Brent on T itself (not log T) over the exact float64 NLL.
    ref = minimize_scalar(lambda t: nll(z.astype(np.float32).astype(np.float64), y, t), bounds=(0.05, 50), method="bounded", options={"xatol": 1e-9}).x
    assert det.temperature_ == pytest.approx(ref, rel=1e-4)
    assert 1.5 < det.temperature_ < 2.7
    test = rng.normal(scale=4.0, size=(20, 10))
    got = det.score(outputs(torch.tensor(test)))
    np.testing.assert_allclose(got.numpy(), -softmax(test / det.temperature_, axis=1).max(axis=1), rtol=1e-12)


def test_temperature_scaling_worked_example():
    # Logits (2, 0) for four samples, three labelled 0 and one labelled 1: the NLL is minimal where
    # sigmoid(2 / T) = 3/4, i.e. T = 2 / log 3.
    z = torch.tensor([[2.0, 0.0]] * 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1])
    det = detectors.create("temperature_scaling").fit(outputs(z, y))
    assert det.temperature_ == pytest.approx(2 / math.log(3), rel=1e-5)
    s = det.score(outputs(torch.tensor([[2.0, 0.0], [0.5, 0.0]], dtype=torch.float64)))
    assert s[0].item() == pytest.approx(-0.75, rel=1e-5)
    assert s[1].item() == pytest.approx(-expit(0.5 * math.log(3) / 2), rel=1e-5)
    assert s[1] > s[0]  # the less confident input is more OOD


def test_temperature_scaling_bounds_and_bad_labels():
    z = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    with pytest.warns(RuntimeWarning, match="no interior minimum"):
        det = detectors.create("temperature_scaling").fit(outputs(z, torch.tensor([0, 1])))  # separable: T -> 0
    assert det.temperature_ < 0.1
    assert torch.isfinite(det.score(outputs(z))).all()
    with pytest.warns(RuntimeWarning, match="no interior minimum"):
        det = detectors.create("temperature_scaling").fit(outputs(z, torch.tensor([1, 0])))  # always wrong: T -> inf
    assert det.temperature_ > 100
    with pytest.raises(ValueError, match=r"labels must be in 0..1"):
        detectors.create("temperature_scaling").fit(outputs(z, torch.tensor([0, 2])))
    with pytest.raises(MissingFieldError, match="labels"):
        detectors.create("temperature_scaling").fit(outputs(z))


def test_temperature_scaling_fits_from_batches_like_all_data():
    rng = np.random.default_rng(5)
    z = torch.tensor(rng.normal(scale=3.0, size=(90, 4)))
    y = torch.tensor(rng.integers(0, 4, 90))
    y[:60] = z[:60].argmax(dim=1)
    whole = detectors.create("temperature_scaling").fit(outputs(z, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = detectors.create("temperature_scaling").fit(outputs(z, y).batches(25))
    assert batched.temperature_ == whole.temperature_

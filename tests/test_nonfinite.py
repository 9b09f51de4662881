"""One rule for non-finite input across every registered detector (issue 15, item 8; the rule is in
CONVENTIONS.md "Non-finite values" and ``ebood.detectors._finite``):

* NaN anywhere in an input row (features, logits, input images) -> NonFiniteError naming the rows;
* +/-inf features or input pixels -> the same error;
* +/-inf logits -> the limit of the score as the logit goes to +/-inf (checked against the score at
  a finite logit far enough out that float64 has saturated, and for GEN / KL matching against
  float64 formulas written here); where no limit exists (softmax of a row of only -inf), the error;
* non-finite training input -> an error naming the rows.
A detector never returns NaN.
"""

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import ebood
from ebood import detectors
from ebood.detectors import NonFiniteError

C, D = 4, 24
SMALL = {"dim": 6, "k": 5, "epochs": 3, "progress": False}  # (msma: a short training)
BAD_ROWS = [3, 7]


def is_model_level(name: str) -> bool:
    return "model" in detectors.get(name).requires


POST_HOC = [n for n in detectors.available() if not is_model_level(n)]
MODEL_LEVEL = [n for n in detectors.available() if is_model_level(n)]
READ_FEATURES = [n for n in POST_HOC if "features" in detectors.get(n).requires]
READ_LOGITS = [n for n in POST_HOC if "logits" in detectors.get(n).requires]
FIT_ON = [(n, f) for n in POST_HOC for f in ("features", "logits")
          if detectors.get(n).needs_fit and f in detectors.get(n).requires + detectors.get(n).fit_requires]


def outputs(seed: int, n: int, dtype=torch.float32) -> ebood.Outputs:
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(C, D, generator=torch.Generator().manual_seed(1)) * 2
    labels = torch.arange(n) % C
    features = torch.relu(centres[labels] + 0.5 * torch.randn(n, D, generator=g)).to(dtype)
    w = torch.randn(C, D, generator=torch.Generator().manual_seed(2)) / 5 + (centres - centres.mean(0))
    head = ebood.Head(w.to(dtype), torch.zeros(C, dtype=dtype))
    return ebood.Outputs(logits=head(features), features=features, labels=labels, head=head)


TRAIN, TEST = outputs(0, 160), outputs(1, 12)


def create(name: str):
    names = detectors.get(name).hyperparameter_names()
    return detectors.create(name, **{k: v for k, v in SMALL.items() if k in names})


@pytest.fixture(scope="module")
def fitted():
    return {name: create(name).fit(TRAIN) for name in POST_HOC}


def with_values(out: ebood.Outputs, field: str, rows, col: int, value: float) -> ebood.Outputs:
    kept = {f: getattr(out, f) for f in ("logits", "features", "labels", "head")}
    t = kept[field].clone()
    t[rows, col] = value
    kept[field] = t
    return ebood.Outputs(**kept)


def rows_named(message: str, rows) -> bool:
    found = re.search(r"(\d+) row\(s\): ([\d, ]+)", message)
    return bool(found) and int(found.group(1)) == len(rows) and [int(v) for v in found.group(2).split(",")] == list(rows)


# ----- NaN and infinite features / NaN logits: an error naming the rows ------------------------------


@pytest.mark.parametrize("name", READ_FEATURES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_features_are_an_error_naming_the_rows(name, value, fitted):
    det = fitted[name]
    bad = with_values(TEST, "features", BAD_ROWS, 5, value)
    with pytest.raises(NonFiniteError) as info:
        det.score(bad)
    assert "features" in str(info.value) and rows_named(str(info.value), BAD_ROWS), str(info.value)


@pytest.mark.parametrize("name", READ_LOGITS)
def test_nan_logits_are_an_error_naming_the_rows(name, fitted):
    det = fitted[name]
    with pytest.raises(NonFiniteError) as info:
        det.score(with_values(TEST, "logits", BAD_ROWS, 1, math.nan))
    assert "logits" in str(info.value) and rows_named(str(info.value), BAD_ROWS), str(info.value)
    # NaN beside +inf in the same row is still NaN (not the +inf limit)
    both = with_values(with_values(TEST, "logits", BAD_ROWS, 1, math.nan), "logits", BAD_ROWS, 2, math.inf)
    with pytest.raises(NonFiniteError):
        det.score(both)


def test_ash_no_longer_hides_a_nan_or_minus_inf_feature(fitted):
    """The issue's reproduction: ASH pruned the bad entry away and gave a finite score."""
    for value in (math.nan, -math.inf):
        bad = with_values(TEST, "features", [0], 0, value)
        with pytest.raises(NonFiniteError, match="features"):
            fitted["ash"].score(bad)
        with pytest.raises(NonFiniteError, match="features"):
            detectors.create("ash").score(bad)  # also unfitted, with the outputs' head


# ----- infinite logits: the limit ------------------------------------------------------------------


def far_out(logits: torch.Tensor, value: float) -> torch.Tensor:
    """The infinite entries replaced by finite ones far enough out that float64 softmax saturates."""
    z = logits.to(torch.float64)
    return torch.where(torch.isposinf(z), torch.full_like(z, 1e4), torch.where(torch.isneginf(z), torch.full_like(z, -1e4), z))


def as_float64(out: ebood.Outputs) -> ebood.Outputs:
    return ebood.Outputs(logits=out.logits.double(), features=out.features.double(), labels=out.labels,
                         head=ebood.Head(out.head.weight.double(), out.head.bias.double()))


@pytest.mark.parametrize("name", READ_LOGITS)
@pytest.mark.parametrize("pattern", ["one +inf", "two +inf", "one -inf", "half -inf"])
def test_infinite_logits_give_the_limit(name, pattern, fitted):
    det = fitted[name]
    base = as_float64(TEST)
    cols = {"one +inf": ([1], math.inf), "two +inf": ([0, 2], math.inf), "one -inf": ([3], -math.inf), "half -inf": ([0, 1], -math.inf)}[pattern]
    z = base.logits.clone()
    z[BAD_ROWS[0]][cols[0]] = cols[1]
    z[BAD_ROWS[1]][cols[0]] = cols[1]
    inf_out = ebood.Outputs(logits=z, features=base.features, labels=base.labels, head=base.head)
    far = ebood.Outputs(logits=far_out(z, cols[1]), features=base.features, labels=base.labels, head=base.head)
    got, limit = det.score(inf_out), det.score(far)
    assert not bool(torch.isnan(got).any())
    for r in range(len(got)):
        if math.isinf(float(got[r])):  # an infinite limit: the far-out score heads the same way
            assert r in BAD_ROWS and math.copysign(1, float(got[r])) == math.copysign(1, float(limit[r])) and abs(float(limit[r])) > 1e3
        else:
            assert float(got[r]) == pytest.approx(float(limit[r]), rel=1e-9, abs=1e-12), (r, got[r], limit[r])


@pytest.mark.parametrize("name", READ_LOGITS)
def test_a_row_of_only_minus_inf_logits_is_an_error_or_an_infinite_limit(name, fitted):
    det = fitted[name]
    z = TEST.logits.clone()
    z[BAD_ROWS] = -math.inf
    bad = ebood.Outputs(logits=z, features=TEST.features, labels=TEST.labels, head=TEST.head)
    try:
        s = det.score(bad)
    except NonFiniteError as exc:
        assert rows_named(str(exc), BAD_ROWS), str(exc)
    else:
        assert not bool(torch.isnan(s).any())
        assert bool(torch.isfinite(s[[i for i in range(len(s)) if i not in BAD_ROWS]]).all())


def gen_reference(z: np.ndarray, gamma: float, m: int) -> np.ndarray:
    """GEN in float64 from the softmax's limit: p uniform over the +inf entries of a row."""
    out = []
    for row in z:
        if np.isposinf(row).any():
            p = np.where(np.isposinf(row), 1.0, 0.0)
        else:
            p = np.exp(row - row.max())
        p = np.sort(p / p.sum())[::-1][:m]
        out.append(np.sum(p**gamma * (1 - p) ** gamma))
    return np.array(out)


def test_gen_with_plus_inf_logits_matches_the_formula():
    z = TEST.logits.double().numpy().copy()
    z[0, 1] = np.inf
    z[1, [0, 2]] = np.inf
    z[2, 3] = -np.inf
    got = detectors.create("gen", gamma=0.3, top_m=3).score(ebood.Outputs(logits=torch.from_numpy(z)))
    np.testing.assert_allclose(got.numpy(), gen_reference(z, 0.3, 3), rtol=1e-10, atol=1e-15)
    assert float(got[0]) == 0.0 and float(got[1]) == pytest.approx(2 * 0.25**0.3)


def test_kl_matching_with_infinite_logits_matches_the_formula(fitted):
    det = fitted["kl_matching"]
    train = TRAIN.logits.double().numpy()
    p_train = np.exp(train - train.max(1, keepdims=True))
    p_train /= p_train.sum(1, keepdims=True)
    pred = p_train.argmax(1)
    templates = np.stack([p_train[pred == c].mean(0) for c in range(C) if (pred == c).any()])
    z = TEST.logits.double().numpy().copy()
    z[0, 1] = -np.inf  # the reproduction: NaN before
    z[1, [0, 3]] = -np.inf
    z[2, 2] = np.inf
    ref = []
    for row in z:
        p = np.where(np.isposinf(row), 1.0, 0.0) if np.isposinf(row).any() else np.exp(row - row.max())
        p /= p.sum()
        nz = p > 0
        ref.append(min(np.sum(p[nz] * np.log(p[nz] / t[nz])) for t in templates))
    got = det.score(ebood.Outputs(logits=torch.from_numpy(z)))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)


# ----- training input -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "field"), FIT_ON)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_training_input_is_an_error_naming_the_rows(name, field, value):
    bad = with_values(TRAIN, field, BAD_ROWS, 2, value)
    with pytest.raises(ValueError) as info:
        create(name).fit(bad)
    message = str(info.value)
    assert field in message and "non-finite" in message and str(BAD_ROWS[0]) in message, message


# ----- detectors that run the model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("name", MODEL_LEVEL)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_model_level_detectors_name_the_non_finite_input_rows(name, value, net):
    x = torch.randn(10, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    det = detectors.create(name)
    if det.needs_fit:
        det.fit_inputs(net, torch.utils.data.TensorDataset(x, torch.arange(10) % 3))
    assert bool(torch.isfinite(det.score_inputs(net, x)).all())
    bad = x.clone()
    bad[BAD_ROWS, 0, 1, 1] = value
    with pytest.raises(NonFiniteError) as info:
        det.score_inputs(net, bad)
    assert "inputs" in str(info.value) and rows_named(str(info.value), BAD_ROWS), str(info.value)


def test_evaluation_gives_nan_metrics_for_a_refusing_detector_and_keeps_the_others(net):
    import warnings

    from ebood.evaluation import evaluate_detectors

    g = torch.Generator().manual_seed(1)
    x_id, x_ood = torch.randn(20, 3, 2, 2, generator=g), torch.randn(15, 3, 2, 2, generator=g) * 3
    ood = x_ood.clone()
    ood[4] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate_detectors(net, None, x_id, {"far": ood}, ["energy", "odin"], progress=False)
    assert all(math.isnan(v) for v in res.metrics["odin"]["far"].values())
    assert all(math.isnan(v) for v in res.metrics["energy"]["far"].values())  # NaN logits: energy refuses too
    assert any("row(s): 4" in str(w.message) for w in caught)

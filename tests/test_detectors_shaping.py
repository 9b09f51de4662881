"""ReAct, ASH, SCALE and DICE against float64 formulas written here from the papers."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import ebood
from ebood import detectors
from ebood.detectors import MissingFieldError


def energy(logits: np.ndarray) -> np.ndarray:
    return -logsumexp(logits, axis=1)


def make_data(seed=0, n=200, d=32, c=6, dtype=torch.float64):
    """Post-ReLU-like features (non-negative, continuous: no ties) and a random head."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(n, d))) * rng.uniform(0.5, 2.0, size=(1, d))
    w = rng.normal(size=(c, d)) / math.sqrt(d)
    b = rng.normal(scale=0.1, size=c)
    head = ebood.Head(torch.tensor(w, dtype=dtype), torch.tensor(b, dtype=dtype))
    out = ebood.Outputs(features=torch.tensor(x, dtype=dtype), head=head)
    return out, x, w, b


def as64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


# ----- float64 references, one sample at a time --------------------------------------------------


def react_ref(train, x, w, b, p):
    c = np.percentile(train, p)
    return energy(np.minimum(x, c) @ w.T + b)


def ash_row(row, p, variant):
    d = row.size
    k = d - int(np.round(d * p / 100.0))
    keep = np.argsort(-row, kind="stable")[:k]
    out = np.zeros(d)
    if variant == "p":
        out[keep] = row[keep]
    elif variant == "b":
        out[keep] = row.sum() / k if k else 0.0
    else:
        out[keep] = row[keep] * math.exp(row.sum() / row[keep].sum())
    return out


def ash_ref(x, w, b, p, variant):
    shaped = np.stack([ash_row(r, p, variant) for r in x])
    return energy(shaped @ w.T + b)


def scale_ref(x, w, b, p):
    rows = []
    for r in x:
        k = r.size - int(np.round(r.size * p / 100.0))
        top = np.sort(r)[::-1][:k]
        rows.append(r * math.exp(r.sum() / top.sum()))
    return energy(np.stack(rows) @ w.T + b)


def dice_ref(train, x, w, b, p):
    contribution = w * train.mean(axis=0)[None, :]
    keep = contribution > np.percentile(contribution, p)
    return energy(x @ (w * keep).T + b)


# ----- random data against the references --------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("p", [0, 37.5, 90, 100])
def test_react_matches_formula(dtype, rtol, p):
    train, *_ = make_data(0, dtype=dtype)
    test, _, w, b = make_data(1, n=50, dtype=dtype)
    w = as64(train.head.weight)
    b = as64(train.head.bias)
    det = detectors.create("react", percentile=p).fit(train)
    assert det.clip_ == pytest.approx(np.percentile(as64(train.features), p), rel=1e-12)
    got = det.score(ebood.Outputs(features=test.features))
    assert got.dtype == dtype
    np.testing.assert_allclose(got.numpy(), react_ref(as64(train.features), as64(test.features), w, b, p), rtol=rtol)


@pytest.mark.parametrize("variant", ["p", "b", "s"])
@pytest.mark.parametrize("p", [0, 65, 90, 95])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_ash_matches_formula(variant, p, dtype, rtol):
    out, *_ = make_data(2, n=60, d=40, dtype=dtype)
    got = detectors.create("ash", variant=variant, percentile=p).fit(out).score(out)
    ref = ash_ref(as64(out.features), as64(out.head.weight), as64(out.head.bias), p, variant)
    np.testing.assert_allclose(got.numpy(), ref, rtol=rtol)


@pytest.mark.parametrize("p", [0, 50, 85, 97])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_scale_matches_formula(p, dtype, rtol):
    out, *_ = make_data(3, n=60, d=40, dtype=dtype)
    got = detectors.create("scale", percentile=p).fit(out).score(out)
    ref = scale_ref(as64(out.features), as64(out.head.weight), as64(out.head.bias), p)
    np.testing.assert_allclose(got.numpy(), ref, rtol=rtol)


@pytest.mark.parametrize("p", [0, 50, 90, 100])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_dice_matches_formula(p, dtype, rtol):
    train, *_ = make_data(4, dtype=dtype)
    test, *_ = make_data(5, n=50, dtype=dtype)
    det = detectors.create("dice", percentile=p).fit(train)
    got = det.score(ebood.Outputs(features=test.features))
    ref = dice_ref(as64(train.features), as64(test.features), as64(train.head.weight), as64(train.head.bias), p)
    np.testing.assert_allclose(got.numpy(), ref, rtol=rtol)


# ----- hand-worked examples ----------------------------------------------------------------------

EYE = ebood.Head(torch.eye(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
X = torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)  # s1 = 10; top half: 4, 3 (s2 = 7)


def lse(*v):
    return math.log(sum(math.exp(t) for t in v))


@pytest.mark.parametrize(
    "name,params,shaped",
    [
        ("ash", {"variant": "p", "percentile": 50}, [4, 3, 0, 0]),
        ("ash", {"variant": "b", "percentile": 50}, [5, 5, 0, 0]),  # s1 / k = 10 / 2
        ("ash", {"variant": "s", "percentile": 50}, [4 * math.exp(10 / 7), 3 * math.exp(10 / 7), 0, 0]),
        ("scale", {"percentile": 50}, [v * math.exp(10 / 7) for v in (4, 3, 2, 1)]),
        ("ash", {"variant": "s", "percentile": 100}, [0, 0, 0, 0]),  # nothing kept: logits = bias
    ],
)
def test_ash_and_scale_worked_examples(name, params, shaped):
    got = detectors.create(name, **params).score(ebood.Outputs(features=X, head=EYE))
    assert got.item() == pytest.approx(-lse(*shaped), rel=1e-12)


def test_react_worked_example_and_sign():
    # ID activations 0..4 -> the 50th percentile is c = 2; a spike of 9 is clipped to 2.
    train = ebood.Outputs(features=torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]] * 2, dtype=torch.float64), head=ebood.Head(torch.eye(5, dtype=torch.float64)))
    det = detectors.create("react", percentile=50).fit(train)
    assert det.clip_ == 2.0
    id_like = torch.tensor([[2.0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    ood_spike = torch.tensor([[9.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    s_id, s_ood = (det.score(ebood.Outputs(features=f)).item() for f in (id_like, ood_spike))
    assert s_ood == pytest.approx(-lse(2, 0, 0, 0, 0), rel=1e-12)
    assert s_id == pytest.approx(-lse(2, 2, 2, 2, 2), rel=1e-12)
    # The spike looks confidently in-distribution to the plain energy; after clipping it is the more OOD one.
    assert -lse(9, 0, 0, 0, 0) < -lse(2, 2, 2, 2, 2)
    assert s_ood > s_id


def test_dice_worked_example():
    # W = [[1, 2], [3, -1]], mean feature (1, 1): contributions = W, their 50th percentile is 1.5,
    # so only W_01 = 2 and W_10 = 3 are kept; x = (1, 1) gives logits (2, 3).
    head = ebood.Head(torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64))
    train = ebood.Outputs(features=torch.tensor([[0.5, 1.5], [1.5, 0.5]], dtype=torch.float64), head=head)
    det = detectors.create("dice", percentile=50).fit(train)
    got = det.score(ebood.Outputs(features=torch.tensor([[1.0, 1.0]], dtype=torch.float64)))
    assert got.item() == pytest.approx(-lse(2, 3), rel=1e-12)


@pytest.mark.parametrize("name,params", [("react", {}), ("ash", {"variant": "p"}), ("ash", {"variant": "b"}), ("ash", {}), ("scale", {}), ("dice", {})])
def test_weak_activations_score_as_more_ood(name, params):
    # Features along the class directions (ID-like) against the same pattern 10x weaker (OOD-like).
    out, *_ = make_data(6)
    det = detectors.create(name, **params).fit(out)
    strong = out.features[:20] * 3
    s_id = det.score(ebood.Outputs(features=strong))
    s_ood = det.score(ebood.Outputs(features=strong / 10))
    assert bool((s_ood > s_id).all())


# ----- degenerate inputs and errors --------------------------------------------------------------


@pytest.mark.parametrize("name,params", [("ash", {"variant": "p"}), ("ash", {"variant": "b"}), ("ash", {"variant": "s"}), ("scale", {}), ("react", {}), ("dice", {})])
def test_all_zero_features_give_the_energy_of_the_bias(name, params):
    out, *_ = make_data(7, n=50)
    det = detectors.create(name, **params).fit(out)
    zeros = torch.zeros(3, out.features.shape[1], dtype=torch.float64)
    got = det.score(ebood.Outputs(features=zeros))
    expected = -logsumexp(as64(out.head.bias))
    np.testing.assert_allclose(got.numpy(), np.full(3, expected), rtol=1e-12)


def test_scale_that_keeps_nothing_is_an_error():
    out = ebood.Outputs(features=X, head=EYE)
    with pytest.raises(ValueError, match="keeps no activation"):
        detectors.create("scale", percentile=90).score(out)  # D = 4: round(3.6) = 4 pruned
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        detectors.create("scale", percentile=100)


def test_ash_s_overflow_is_a_clear_error_in_float32_and_finite_in_float64():
    rng = np.random.default_rng(8)
    x = np.abs(rng.normal(size=(4, 1000)))
    w = rng.normal(size=(3, 1000))
    det = detectors.create("ash", variant="s", percentile=99.9)  # k = 1: exp(s1 / s2) ~ e^300
    out64 = ebood.Outputs(features=torch.tensor(x), head=ebood.Head(torch.tensor(w)))
    got = det.score(out64)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), ash_ref(x, w, np.zeros(3), 99.9, "s"), rtol=1e-10)
    out32 = ebood.Outputs(features=torch.tensor(x, dtype=torch.float32), head=ebood.Head(torch.tensor(w, dtype=torch.float32)))
    with pytest.raises(ValueError, match="not finite.*overflow"):
        det.score(out32)


@pytest.mark.parametrize("name", ["react", "ash", "scale", "dice"])
@pytest.mark.parametrize("bad", [-1, 100.5, math.nan, "ninety", True, None])
def test_percentile_must_be_in_0_100(name, bad):
    with pytest.raises(ValueError, match="percentile"):
        detectors.create(name, percentile=bad)


def test_ash_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant 'x'.*'p'.*'b'.*'s'"):
        detectors.create("ash", variant="x")


def test_nan_training_features_are_refused():
    out, *_ = make_data(9, n=20)
    f = out.features.clone()
    f[3, 0] = math.nan
    bad = ebood.Outputs(features=f, head=out.head)
    for name in ("react", "dice"):
        with pytest.raises(ValueError, match=r"non-finite.*row\(s\): 3"):
            detectors.create(name).fit(bad)
    with pytest.raises(ValueError, match="non-finite"):
        detectors.create("react").fit(out).score(ebood.Outputs(features=f))


def test_the_head_is_kept_and_checked():
    out, *_ = make_data(10, n=40)
    for name in ("react", "ash", "scale", "dice"):
        det = detectors.create(name).fit(out)
        with_head = det.score(out)
        assert torch.equal(det.score(ebood.Outputs(features=out.features)), with_head)
        other = ebood.Head(out.head.weight + 1.0, out.head.bias)
        with pytest.raises(ValueError, match="different head"):
            det.score(ebood.Outputs(features=out.features, head=other))
        with pytest.raises(MissingFieldError, match="head"):
            detectors.create(name).fit(ebood.Outputs(features=out.features))
    # ASH and SCALE learn nothing from data: without fit they use the outputs' head.
    for name in ("ash", "scale"):
        assert torch.equal(detectors.create(name).score(out), detectors.create(name).fit(out).score(out))
        with pytest.raises(MissingFieldError, match="head"):
            detectors.create(name).score(ebood.Outputs(features=out.features))


def test_penultimate_layer_of_a_feature_dict_is_used():
    out, *_ = make_data(11, n=30)
    layered = ebood.Outputs(features={"block3": torch.randn(30, 5, dtype=torch.float64), "pool": out.features}, head=out.head)
    for name in ("react", "ash", "dice"):
        assert torch.equal(detectors.create(name).fit(layered).score(layered), detectors.create(name).fit(out).score(out))


def test_dice_streams_merges_and_refuses_mixed_heads():
    out, *_ = make_data(12, n=90)
    full = detectors.create("dice").fit(out)
    parts = list(out.batches(40))
    a = detectors.create("dice").partial_fit(parts[0])
    b = detectors.create("dice")
    for part in parts[1:]:
        b.partial_fit(part)
    merged = a.merge(b)
    torch.testing.assert_close(merged.score(out), full.score(out), rtol=1e-12, atol=0)
    other = ebood.Outputs(features=parts[1].features, head=ebood.Head(out.head.weight * 2, out.head.bias))
    with pytest.raises(ValueError, match="different head"):
        detectors.create("dice").partial_fit(parts[0]).partial_fit(other)
    with pytest.raises(ValueError, match="different heads"):
        detectors.create("dice").partial_fit(parts[0]).merge(detectors.create("dice").partial_fit(other))


@pytest.mark.parametrize("variant", ["p", "b", "s"])
def test_ash_ties_go_to_the_lower_index_whatever_the_batch(variant):
    # Rounded post-ReLU features: many ties (zeros especially) at the pruning boundary.
    rng = np.random.default_rng(13)
    x = np.maximum(rng.normal(size=(40, 24)), 0).round()
    x[:, 0] = 1.0  # no all-zero row
    w = rng.normal(size=(5, 24))
    out = ebood.Outputs(features=torch.tensor(x), head=ebood.Head(torch.tensor(w)))
    det = detectors.create("ash", variant=variant, percentile=75)
    got = det.score(out)
    np.testing.assert_allclose(got.numpy(), ash_ref(x, w, np.zeros(5), 75, variant), rtol=1e-10)
    one_by_one = torch.cat([det.score(out.select(slice(i, i + 1))) for i in range(len(out))])
    torch.testing.assert_close(one_by_one, got, rtol=1e-12, atol=0)  # same masks (BLAS may round differently)


@pytest.mark.parametrize("name", ["react", "ash", "scale", "dice"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_score_in_float32(name, dtype):
    out64, *_ = make_data(14, n=80)
    half = ebood.Outputs(features=out64.features.to(dtype), head=ebood.Head(out64.head.weight.to(dtype), out64.head.bias.to(dtype)))
    # the reference: the same (rounded) half-precision values, in float64
    exact = ebood.Outputs(features=half.features.double(), head=ebood.Head(half.head.weight.double(), half.head.bias.double()))
    got = detectors.create(name).fit(half).score(half)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), detectors.create(name).fit(exact).score(exact).numpy(), rtol=2e-5)

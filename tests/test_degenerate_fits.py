"""Degenerate fits and values that used to pass silently (issue 15, items 9 and 10): ViM / Residual
on identical rows or one row, Relative Mahalanobis on one class, energy margins with m_in > m_out,
non-numeric thresholds and TPRs. Each is refused with an error naming the cause."""

import math

import numpy as np
import pytest
import torch

import ebood
from ebood import detectors
from ebood.train import EnergyBoundedLoss

C, D = 3, 10


def head() -> ebood.Head:
    g = torch.Generator().manual_seed(0)
    return ebood.Head(torch.randn(C, D, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64))


def outputs(features: torch.Tensor, labels: torch.Tensor | None = None) -> ebood.Outputs:
    h = head()
    return ebood.Outputs(features=features, logits=h(features), head=h, labels=labels)


def rows(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 2.0


# ----- ViM / Residual ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 40])
def test_vim_on_identical_rows_or_one_row_is_an_error(n, tmp_path):
    """The issue's reproduction: the fit was accepted and scores came out around 1e16."""
    same, test = rows(1).repeat(n, 1), outputs(rows(5, seed=2))
    with pytest.raises(detectors.DegenerateFitError, match=r"span 1 dimension.*identical rows"):
        detectors.create("vim", dim=1).fit(outputs(same)).score(test)
    with pytest.raises(ValueError, match=r"span only 1 dimension.*identical rows"):
        detectors.create("vim", dim=3).fit(outputs(same)).save(tmp_path / "vim.safetensors")
    assert not (tmp_path / "vim.safetensors").exists()


def test_a_streamed_degenerate_vim_fails_at_its_first_score():
    """Streaming fits finalise at the first score or save, so that shards too small on their own
    can still be merged (fit(shard) then merge); the error comes then."""
    det = detectors.create("vim", dim=2)
    for _ in range(3):
        det.partial_fit(outputs(rows(1)))  # the same row three times
    with pytest.raises(ValueError, match="identical rows"):
        det.score(outputs(rows(5, seed=2)))


def test_vim_needs_more_distinct_rows_than_dim_and_residual_as_many():
    """Rows around the head's origin span N dimensions: ViM needs N > dim (a residual to scale
    alpha), Residual needs N >= dim (a principal space fixed by the data)."""
    dim = 4
    for n, vim_ok, residual_ok in [(dim - 1, False, False), (dim, False, True), (dim + 1, True, True)]:
        train = outputs(rows(n))
        for name, ok in (("vim", vim_ok), ("residual", residual_ok)):
            if ok:
                s = detectors.create(name, dim=dim).fit(train).score(outputs(rows(6, seed=3)))
                assert bool(torch.isfinite(s).all()) and float(s.abs().max()) < 1e6
            else:
                with pytest.raises(ValueError, match=f"dim={dim}"):
                    detectors.create(name, dim=dim).fit(train).score(outputs(rows(6, seed=3)))


def test_vim_alpha_on_a_just_sufficient_fit_matches_float64_numpy():
    """Independent reference (numpy, float64) at the smallest accepted fit (N = dim + 1)."""
    dim, x = 3, rows(4)
    det = detectors.create("vim", dim=dim).fit(outputs(x))
    w, b = head().weight.numpy(), head().bias.numpy()
    u = -np.linalg.pinv(w) @ b
    c = x.numpy() - u
    vals, vecs = np.linalg.eigh(c.T @ c / len(c))
    ns = vecs[:, : D - dim]
    logits = x.numpy() @ w.T + b
    alpha = logits.max(1).mean() / np.linalg.norm(c @ ns, axis=1).mean()
    test = rows(6, seed=4).numpy()
    tl = test @ w.T + b
    ref = alpha * np.linalg.norm((test - u) @ ns, axis=1) - np.log(np.exp(tl).sum(1))
    np.testing.assert_allclose(det.score(outputs(torch.from_numpy(test))).numpy(), ref, rtol=1e-6)


# ----- Relative Mahalanobis -----------------------------------------------------------------------


def test_relative_mahalanobis_on_one_class_is_an_error():
    """The issue's reproduction: every score was 0."""
    x = rows(30)
    with pytest.raises(detectors.DegenerateFitError, match="samples of 1 class.*every score is 0"):
        detectors.create("relative_mahalanobis").fit(outputs(x, torch.zeros(30, dtype=torch.long))).score(outputs(rows(5, seed=5)))
    two = detectors.create("relative_mahalanobis").fit(outputs(x, torch.arange(30) % 2))
    assert float(two.score(outputs(rows(5, seed=5))).abs().max()) > 0


# ----- energy margins, thresholds, TPRs ------------------------------------------------------------


def test_energy_margins_must_not_be_crossed():
    with pytest.raises(ValueError, match=r"m_in \(-5\) must not be above m_out \(-7\)"):
        EnergyBoundedLoss(m_in=-5.0, m_out=-7.0)
    EnergyBoundedLoss(m_in=-7.0, m_out=-7.0)  # equal margins: allowed
    for bad in ("-25", True, None):
        with pytest.raises((TypeError, ValueError), match="m_in"):
            EnergyBoundedLoss(m_in=bad)


@pytest.mark.parametrize("bad", ["0.5", True, None, [0.5], math.nan, math.inf])
def test_a_non_numeric_or_non_finite_threshold_is_refused(bad):
    out = ebood.Outputs(logits=torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))
    det = detectors.create("energy").calibrate(out)
    assert det.predict(out).dtype == torch.bool
    det.threshold_ = bad
    err = detectors.NotFittedError if bad is None else TypeError
    with pytest.raises(err, match="threshold"):
        det.predict(out)
    det.threshold_ = np.float32(-1.0)  # numpy scalars are numbers
    assert torch.equal(det.predict(out), det.score(out) > -1.0)


@pytest.mark.parametrize("bad", ["0.95", True, b"1"])
def test_a_non_numeric_tpr_is_refused(bad):
    out = ebood.Outputs(logits=torch.randn(8, 3))
    with pytest.raises(TypeError, match="tpr"):
        detectors.create("energy").calibrate(out, tpr=bad)


def test_a_degenerate_fit_does_not_sink_an_evaluation():
    """``evaluate_detectors`` (and ``ebood bench``) give the degenerate detector NaN metrics with a
    warning; the others keep their results."""
    import warnings

    from torch import nn

    from ebood.evaluation import evaluate_detectors

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(0)
    train = torch.utils.data.TensorDataset(torch.randn(3, 3, 2, 2, generator=g), torch.arange(3))  # 3 rows: rank 3 < dim 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate_detectors(model, train, torch.randn(20, 3, 2, 2, generator=g), {"far": 4 * torch.randn(15, 3, 2, 2, generator=g)},
                                 ["energy", "vim"], progress=False)
    assert all(math.isnan(v) for v in res.metrics["vim"]["far"].values())
    assert not any(math.isnan(v) for v in res.metrics["energy"]["far"].values())
    degenerate = {str(w.message) for w in caught if "vim" in str(w.message) and "dim=4" in str(w.message)}
    # one message for id_test and the OOD set alike, so `ebood bench` (which shows each message once) prints it once
    assert len(degenerate) == 1 and "NaN on every set" in degenerate.pop()
    with pytest.raises(detectors.DegenerateFitError):
        res.detectors["vim"].score(ebood.Outputs(features=torch.randn(2, 8)))

"""msma: the score-matching loss and the density step against independent references (float64 numpy,
scikit-learn), OOD separation on toy data, save/load, input-level variant, errors."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ebood import Outputs
from ebood.detectors import MSMA, MSMAInputs, create, load
from ebood.detectors._msma_fit import dsm_loss, fit_density
from ebood.detectors._score_networks import geometric_sigmas
from ebood.detectors.msma import gmm_log_density
from ebood.metrics import auroc


def test_noise_schedule_is_the_papers_geometric_sequence():
    s = geometric_sigmas(1.0, 0.01, 10).numpy()
    assert s[0] == pytest.approx(1.0) and s[-1] == pytest.approx(0.01)
    ratios = s[1:] / s[:-1]
    np.testing.assert_allclose(ratios, 0.01 ** (1 / 9), rtol=1e-12)
    det = create("msma")
    assert (det.num_scales, det.sigma_high, det.sigma_low) == (10, 1.0, 0.01)


def test_dsm_loss_matches_float64_reference():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(16, 3, 4, 4))
    sigma = rng.choice(geometric_sigmas(1.0, 0.01, 10).numpy(), size=16)
    noisy = clean + sigma[:, None, None, None] * rng.normal(size=clean.shape)
    score = rng.normal(size=clean.shape) * 5
    # Song & Ermon 2019 eq. 5-6 / MSMA eq. 2: 1/2 sigma^2 || s + (x~ - x) / sigma^2 ||^2, averaged
    ref = np.mean([0.5 * s**2 * np.sum((sc + (xn - xc) / s**2) ** 2) for sc, xn, xc, s in zip(score, noisy, clean, sigma)])
    got = dsm_loss(*(torch.tensor(a, dtype=torch.float32) for a in (score, noisy, clean, sigma)))
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_dsm_loss_is_minimised_by_the_true_denoising_score():
    # For x ~ N(0, I), the perturbed density is N(0, (1 + sigma^2) I): its score -x~ / (1 + sigma^2) beats others.
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    sigma = torch.full((20000,), 0.5, dtype=torch.float64)
    noisy = clean + 0.5 * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    best = dsm_loss(-noisy / 1.25, noisy, clean, sigma)
    for factor in (0.8, 0.9, 1.1, 1.25):
        assert dsm_loss(-factor * noisy / 1.25, noisy, clean, sigma) > best


def test_gmm_log_density_matches_scikit_learn():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(200, 4)), rng.normal(loc=3, scale=0.5, size=(150, 4))])
    gmm = GaussianMixture(3, covariance_type="full", random_state=0).fit(x)
    got = gmm_log_density(torch.tensor(x), *(torch.tensor(a) for a in (gmm.weights_, gmm.means_, gmm.precisions_cholesky_)))
    np.testing.assert_allclose(got.numpy(), gmm.score_samples(x), rtol=1e-10, atol=1e-10)


def test_density_step_matches_scikit_learn_pipeline():
    # The MSMA code: StandardScaler + full-covariance GaussianMixture on the (N, L) norms.
    rng = np.random.default_rng(2)
    train = np.abs(rng.normal(size=(300, 10))) * np.linspace(1, 5, 10)
    test = np.abs(rng.normal(size=(50, 10))) * 3
    d = fit_density(torch.tensor(train), torch.tensor(test), 4, seed=0)
    pipe = make_pipeline(StandardScaler(), GaussianMixture(4, covariance_type="full", random_state=0)).fit(train)
    z = (torch.tensor(test) - d["norm_mean"]) / d["norm_scale"]
    got = gmm_log_density(z, d["weights"], d["means"], d["precisions_cholesky"])
    np.testing.assert_allclose(got.numpy(), pipe.score_samples(test), rtol=1e-8, atol=1e-8)
    # a grid of counts picks the best held-out likelihood
    grid = fit_density(torch.tensor(train), torch.tensor(test), [1, 2, 4], seed=0)
    held = {k: GaussianMixture(k, covariance_type="full", random_state=0).fit(StandardScaler().fit_transform(train))
            for k in (1, 2, 4)}
    scaler = StandardScaler().fit(train)
    best = max(held, key=lambda k: held[k].score(scaler.transform(test)))
    assert grid["n_components"] == best


def _blobs(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0, 0, 0, 0, 0], [-2.0, 0, 0, 0, 0, 0]])
    x = centres[torch.arange(n) % 2] + 0.3 * torch.randn(n, 6, generator=g)
    return x + shift


FAST = dict(epochs=25, hidden=64, n_components=2, progress=False)


@pytest.fixture(scope="module")
def fitted_features():
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        det = create("msma", **FAST).fit(Outputs(features=_blobs(400, 0)))
    return det


def test_msma_features_separates_ood_and_is_deterministic(fitted_features, one_thread):
    det = fitted_features
    assert isinstance(det, MSMA) and not isinstance(det, MSMAInputs)
    id_s = det.score(Outputs(features=_blobs(200, 1)))
    far = det.score(Outputs(features=_blobs(200, 2, shift=torch.tensor([0.0, 3, 0, 0, 0, 0]))))
    assert id_s.shape == (200,) and id_s.dtype == torch.float32
    assert float(auroc(id_s, far)) > 0.95
    rec = det.training_
    assert rec["val_loss"] == min(rec["val_history"]) and 1 <= rec["epochs_run"] <= 25
    again = create("msma", **FAST).fit(Outputs(features=_blobs(400, 0)))
    torch.testing.assert_close(again.score(Outputs(features=_blobs(200, 1))), id_s, rtol=0, atol=0)


def test_msma_save_load_gives_identical_scores_without_training_code(fitted_features, tmp_path):
    path = fitted_features.save(tmp_path / "msma.safetensors")
    test = _blobs(50, 3)
    expected = fitted_features.score(Outputs(features=test))
    loaded = load(path)
    torch.testing.assert_close(loaded.score(Outputs(features=test)), expected, rtol=0, atol=0)
    np.save(tmp_path / "x.npy", test.numpy())
    np.save(tmp_path / "s.npy", expected.numpy())
    # A fresh process in which the training module and scikit-learn cannot be imported.
    code = textwrap.dedent(f"""
        import sys
        sys.modules["ebood.detectors._msma_fit"] = None
        sys.modules["sklearn"] = None
        import numpy as np, torch
        from ebood import Outputs
        from ebood.detectors import load
        s = load({str(path)!r}).score(Outputs(features=torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))))
        assert np.array_equal(s.numpy(), np.load({str(tmp_path / 's.npy')!r})), "scores differ"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def _images(n, seed, pattern):
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(1, 8, 8)
    if pattern == "bars":
        base[:, :, 2:6] = 1.0
    else:
        base[:, 2:6, :] = 1.0
    return (base + 0.1 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)


def test_msma_on_inputs_fits_scores_and_round_trips(tmp_path, one_thread):
    det = create("msma", on="inputs", epochs=15, hidden=8, n_components=2, progress=False)
    assert isinstance(det, MSMAInputs) and det.requires == ("model",)
    train = torch.utils.data.TensorDataset(_images(300, 0, "bars"), torch.zeros(300, dtype=torch.long))
    det.fit_inputs(None, train, batch_size=64)
    id_s = det.score_inputs(None, _images(100, 1, "bars"))
    ood_s = det.score_inputs(None, _images(100, 2, "rows"))
    assert float(auroc(id_s, ood_s)) > 0.95
    loaded = load(det.save(tmp_path / "msma-img.safetensors"))
    assert isinstance(loaded, MSMAInputs)
    torch.testing.assert_close(loaded.score_inputs(None, _images(100, 2, "rows")), ood_s, rtol=0, atol=0)
    with pytest.raises(TypeError, match="needs the model"):
        det.score(Outputs(features=torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="fitted on"):
        det.score_inputs(None, torch.zeros(3, 1, 4, 4))


def test_msma_on_inputs_in_evaluate_detectors(one_thread):
    from ebood import evaluate_detectors

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    ds = lambda n, s, p: torch.utils.data.TensorDataset(_images(n, s, p), torch.zeros(n, dtype=torch.long))
    res = evaluate_detectors(model, ds(200, 0, "bars"), ds(60, 1, "bars"), {"rows": ds(60, 2, "rows")},
                             [{"name": "msma", "on": "inputs", "epochs": 10, "hidden": 8, "n_components": 1, "progress": False}],
                             progress=False)
    assert res.metrics["msma"]["rows"]["auroc"] > 0.9


def test_msma_errors():
    with pytest.raises(ValueError, match="on must be"):
        create("msma", on="pixels")
    with pytest.raises(ValueError, match="sigma_low"):
        create("msma", sigma_low=2.0)
    with pytest.raises(ValueError, match="n_components"):
        create("msma", n_components=0)
    det = create("msma", **FAST)
    with pytest.raises(ValueError, match="one feature matrix"):
        det.fit(Outputs(features={"a": torch.zeros(10, 2), "b": torch.zeros(10, 2)}))
    with pytest.raises(ValueError, match="NaN"):
        det.fit(Outputs(features=torch.full((10, 2), float("nan"))))
    with pytest.raises(ValueError, match="at least 3"):
        det.fit(Outputs(features=torch.zeros(2, 2)))
    with pytest.raises(Exception, match="not fitted"):
        det.score(Outputs(features=torch.zeros(2, 2)))


def test_msma_rejects_a_feature_width_it_was_not_fitted_on(fitted_features):
    with pytest.raises(ValueError, match="fitted on"):
        fitted_features.score(Outputs(features=torch.zeros(3, 5)))


def test_msma_max_samples_fits_on_a_seeded_subset(one_thread):
    x = _blobs(300, 5)
    det = create("msma", max_samples=60, epochs=2, hidden=16, n_components=1, progress=False).fit(Outputs(features=x))
    keep = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:60].sort().values
    sub = create("msma", epochs=2, hidden=16, n_components=1, progress=False).fit(Outputs(features=x[keep]))
    torch.testing.assert_close(det.score(Outputs(features=x[:20])), sub.score(Outputs(features=x[:20])), rtol=0, atol=0)

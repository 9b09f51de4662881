"""Detectors that need the model (odin, gradnorm, mc_dropout, mahalanobis_ensemble), each against a
reference computed independently in float64 (autograd per sample, scikit-learn), plus the API."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.covariance import EmpiricalCovariance
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

import ebood
from ebood import detectors
from ebood.detectors.model import GradNorm, MahalanobisEnsemble, MCDropout, ModelDetector, ODIN
from ebood.extraction import PENULTIMATE

STD = [0.5, 0.25, 2.0]


class SmallNet(nn.Module):
    """block (conv-BN-ReLU) -> global average pool -> fc1-ReLU -> dropout -> head fc."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.fc1 = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(6, classes)
        with torch.no_grad():
            self.block[1].running_mean.uniform_(-0.3, 0.3)
            self.block[1].running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.fc1(self.block(x).mean(dim=(2, 3))))))


def features_by_hand(m: SmallNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval-mode features of the layers 'block' (pooled) and penultimate, written out."""
    conv, bn = m.block[0], m.block[1]
    h = F.conv2d(x, conv.weight, conv.bias, padding=1)
    h = (h - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var + bn.eps)[None, :, None, None]
    h = F.relu(h * bn.weight[None, :, None, None] + bn.bias[None, :, None, None])
    pooled = h.mean(dim=(2, 3))
    return {"block": pooled, PENULTIMATE: F.relu(pooled @ m.fc1.weight.T + m.fc1.bias)}


@pytest.fixture
def net():
    torch.manual_seed(0)
    return SmallNet().double().eval()


def inputs(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


# ----- API ---------------------------------------------------------------------------------------


def test_registered_with_the_model_marker():
    for name, cls in [("odin", ODIN), ("gradnorm", GradNorm), ("mc_dropout", MCDropout), ("mahalanobis_ensemble", MahalanobisEnsemble)]:
        assert detectors.get(name) is cls and issubclass(cls, ModelDetector)
        assert "model" in cls.requires and cls.paper
    assert detectors.create("odin", temperature=10, epsilon=0.01, std=STD).get_params() == {"temperature": 10, "epsilon": 0.01, "std": STD}
    assert detectors.create("mahalanobis_ensemble", epsilon=0.0, layers=["block"]).layers == ["block"]
    assert detectors.create("gradnorm", temperature=2).temperature == 2
    assert detectors.create("mc_dropout", passes=3).passes == 3


def test_outputs_api_points_to_the_input_methods(net):
    outs = ebood.Outputs(logits=torch.randn(4, 3))
    for name in ("odin", "gradnorm", "mc_dropout"):
        det = detectors.create(name)
        with pytest.raises(TypeError, match="score_inputs"):
            det.score(outs)
        with pytest.raises(TypeError, match="fit_inputs"):
            det.fit(outs)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("odin", {"temperature": 0}, "temperature"),
        ("odin", {"epsilon": -1}, "epsilon"),
        ("odin", {"std": [0.5, -1]}, "std"),
        ("gradnorm", {"temperature": float("nan")}, "temperature"),
        ("mc_dropout", {"passes": 0}, "passes"),
        ("mc_dropout", {"passes": 2.5}, "passes"),
        ("mahalanobis_ensemble", {"layers": []}, "layers"),
    ],
)
def test_bad_hyperparameters(name, params, message):
    with pytest.raises(ValueError, match=message):
        detectors.create(name, **params)


def test_bad_inputs_are_named(net):
    det = detectors.create("odin")
    with pytest.raises(ValueError, match="non-empty batch"):
        det.score_inputs(net, inputs(0, 1))
    with pytest.raises(TypeError, match="must be a tensor"):
        det.score_inputs(net, [1, 2, 3])
    with pytest.raises(ValueError, match="std has 2 entries"):
        detectors.create("odin", std=[1.0, 2.0]).score_inputs(net, inputs(2, 1))


# ----- ODIN --------------------------------------------------------------------------------------


def odin_reference(m, x, temperature, epsilon, std):
    """Liang et al. 2018: x' = x - eps * sign(-grad log S_yhat(x; T)) / std; score = -max S(x'; T)."""
    x = x.clone().requires_grad_(True)
    log_s = torch.log_softmax(m(x) / temperature, dim=1)
    yhat = log_s.argmax(dim=1)
    (g,) = torch.autograd.grad(log_s[torch.arange(len(x)), yhat].sum(), x)  # gradient of log S_yhat
    s = torch.ones(3, dtype=x.dtype) if std is None else torch.tensor(std, dtype=x.dtype).expand(3)
    x_new = x.detach() - epsilon * torch.sign(-g) / s[None, :, None, None]
    with torch.no_grad():
        return -torch.softmax(m(x_new) / temperature, dim=1).max(dim=1).values, x_new


@pytest.mark.parametrize("temperature, epsilon, std", [(1000.0, 0.0014, STD), (1.0, 0.05, None), (10.0, 0.02, 0.3)])
def test_odin_matches_the_reference(net, temperature, epsilon, std):
    x = inputs(16, 2)
    det = ODIN(temperature=temperature, epsilon=epsilon, std=std)
    expected, x_ref = odin_reference(net, x, temperature, epsilon, std)
    got = det.score_inputs(net, x)
    assert got.dtype == torch.float64 and got.shape == (16,)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(det.perturb(net, x), x_ref, atol=1e-15)


def test_odin_step_size_per_channel_and_direction(net):
    x = inputs(32, 3)
    det = ODIN(temperature=1.0, epsilon=0.01, std=STD)
    moved = (det.perturb(net, x) - x).abs()
    for c, s in enumerate(STD):  # every input value moves by epsilon / std of its channel (or not at all)
        vals = moved[:, c].unique()
        assert all(torch.isclose(v, torch.tensor(0.01 / s, dtype=v.dtype)) or v == 0 for v in vals)
    # the step makes the predicted class more likely for (nearly) every input
    assert (det.score_inputs(net, x) <= ODIN(temperature=1.0, epsilon=0.0).score_inputs(net, x) + 1e-12).float().mean() > 0.9


def test_odin_without_perturbation_is_tempered_msp(net):
    x = inputs(10, 4)
    with torch.no_grad():
        z = net(x).numpy()
    e = np.exp((z - z.max(1, keepdims=True)) / 100.0)
    expected = -(e / e.sum(1, keepdims=True)).max(1)
    assert np.allclose(ODIN(temperature=100.0, epsilon=0.0).score_inputs(net, x).numpy(), expected, atol=1e-12)


def test_odin_works_under_inference_mode_and_restores_modes(net):
    x = inputs(6, 5)
    expected = ODIN().score_inputs(net, x)
    net.train()
    with torch.inference_mode():
        got = ODIN().score_inputs(net, x)
    assert torch.allclose(got, expected, atol=1e-12)  # eval mode was used inside
    assert all(mod.training for mod in net.modules())


# ----- GradNorm ----------------------------------------------------------------------------------


def gradnorm_reference(m, x, temperature):
    """Per sample: L1 norm of d KL(u || softmax(f(x)/T)) / d W_fc, by autograd on a copy."""
    m = copy.deepcopy(m)
    out = []
    for i in range(len(x)):
        m.zero_grad()
        log_p = torch.log_softmax(m(x[i : i + 1]) / temperature, dim=1)
        c = log_p.shape[1]
        kl = (torch.full_like(log_p, 1.0 / c) * (np.log(1.0 / c) - log_p)).sum()
        kl.backward()
        out.append(-m.fc.weight.grad.abs().sum())
    return torch.stack(out)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_gradnorm_matches_per_sample_autograd(net, temperature):
    x = inputs(12, 6)
    got = GradNorm(temperature).score_inputs(net, x)
    assert torch.allclose(got, gradnorm_reference(net, x, temperature), rtol=1e-10, atol=1e-14)


def test_gradnorm_gradient_is_the_outer_product(net):
    x = inputs(5, 7)
    h = features_by_hand(net, x)[PENULTIMATE].detach()
    with torch.no_grad():
        p = torch.softmax(net(x), dim=1)
    expected = -torch.stack([torch.outer(p[i] - 1 / 3, h[i]).abs().sum() for i in range(5)])
    assert torch.allclose(GradNorm().score_inputs(net, x), expected, atol=1e-12)


def test_gradnorm_needs_the_logits_to_come_from_the_last_linear():
    class Scaled(SmallNet):
        def forward(self, x):
            return 2.0 * super().forward(x)

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="output of its last nn.Linear"):
        GradNorm().score_inputs(Scaled().eval(), torch.randn(3, 3, 4, 4))


# ----- MC-Dropout --------------------------------------------------------------------------------


def mc_dropout_reference(m, x, passes, seed):
    """Mean softmax of `passes` forward passes with only the dropout layers in training mode; entropy."""
    m = copy.deepcopy(m).eval()
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        probs = torch.stack([torch.softmax(m(x), dim=1) for _ in range(passes)]).mean(0).numpy()
    return torch.from_numpy(-(probs * np.log(probs)).sum(1))


def test_mc_dropout_matches_the_reference(net):
    x = inputs(20, 8)
    got = MCDropout(passes=7, seed=123).score_inputs(net, x)
    assert torch.allclose(got, mc_dropout_reference(net, x, 7, 123), atol=1e-12)


def test_mc_dropout_is_stochastic_only_through_dropout(net):
    x = inputs(20, 9)
    a = MCDropout(passes=1, seed=1).score_inputs(net, x)
    b = MCDropout(passes=1, seed=2).score_inputs(net, x)
    assert not torch.allclose(a, b)  # dropout is on
    net.drop.p = 0.0
    with torch.no_grad():
        p = torch.softmax(net(x), dim=1)
    deterministic = -(p * p.log()).sum(1)
    assert torch.allclose(MCDropout(passes=3, seed=1).score_inputs(net, x), deterministic, atol=1e-12)  # BN in eval mode


def test_mc_dropout_restores_modes_rng_and_statistics(net):
    x = inputs(8, 10)
    net.train()
    net.block.eval()
    stats = net.block[1].running_mean.clone()
    torch.manual_seed(77)
    state = torch.get_rng_state()
    MCDropout(passes=4, seed=5).score_inputs(net, x)
    assert torch.equal(torch.get_rng_state(), state)  # seeded passes leave the global generator alone
    assert torch.equal(net.block[1].running_mean, stats)
    assert net.training and net.drop.training and net.fc.training and not net.block.training and not net.block[1].training


def test_mc_dropout_needs_dropout_modules():
    with pytest.raises(ValueError, match="no dropout module"):
        MCDropout().score_inputs(nn.Sequential(nn.Flatten(), nn.Linear(48, 3)), torch.randn(2, 3, 4, 4))


# ----- Mahalanobis ensemble ----------------------------------------------------------------------


LAYERS = ["block", PENULTIMATE]


def gaussians_reference(m, x, y):
    """Class means and tied precision per layer, with scikit-learn (as in Lee et al.'s code)."""
    with torch.no_grad():
        feats = {k: v.numpy() for k, v in features_by_hand(m, x).items()}
    out = {}
    for name in LAYERS:
        f = feats[name]
        means = np.stack([f[y == c].mean(0) for c in range(3)])
        centred = np.concatenate([f[y == c] - means[c] for c in range(3)])
        out[name] = (means, EmpiricalCovariance(assume_centered=False).fit(centred).precision_)
    return out


def confidences_reference(m, x, gauss, epsilon, std):
    """M_l = -min_c d_{l,c}(x'_l), with x'_l = x - eps * sign(grad d_{l,c*}(x)) / std, layer by layer."""
    s = torch.tensor(std, dtype=x.dtype)[None, :, None, None]
    cols = []
    for name in LAYERS:
        means, prec = (torch.from_numpy(a) for a in gauss[name])

        def dist(f):
            return torch.stack([(((f - means[c]) @ prec) * (f - means[c])).sum(1) for c in range(3)], dim=1)

        xg = x.clone().requires_grad_(True)
        d = dist(features_by_hand(m, xg)[name])
        closest = d.argmin(dim=1)
        (g,) = torch.autograd.grad(d[torch.arange(len(x)), closest].sum(), xg)
        with torch.no_grad():
            cols.append(-dist(features_by_hand(m, x - epsilon * torch.sign(g) / s)[name]).min(dim=1).values)
    return torch.stack(cols, dim=1).numpy()


@pytest.fixture
def fitted_data():
    g = torch.Generator().manual_seed(11)
    y = torch.arange(90) % 3
    x = torch.randn(90, 3, 4, 4, generator=g, dtype=torch.float64) + y[:, None, None, None].double() * 0.7
    return x, y


def test_mahalanobis_gaussians_match_sklearn(net, fitted_data):
    x, y = fitted_data
    det = MahalanobisEnsemble(epsilon=0.0, layers=LAYERS).fit_inputs(net, (x, y))
    ref = gaussians_reference(net, x, y.numpy())
    assert det.layers_ == LAYERS and det.classes_.tolist() == [0, 1, 2]
    for name in LAYERS:
        assert np.allclose(det.means_[name].numpy(), ref[name][0], atol=1e-12)
        assert np.allclose(det.precisions_[name].numpy(), ref[name][1], rtol=1e-6, atol=1e-8)


def test_mahalanobis_ensemble_with_validation_matches_the_reference(net, fitted_data):
    x, y = fitted_data
    id_val, ood_val, test = inputs(40, 12) + 0.5, inputs(40, 13, shift=2.0), inputs(25, 14, shift=1.0)
    eps = 0.01
    det = MahalanobisEnsemble(epsilon=eps, layers=LAYERS, std=STD).fit_inputs(net, (x, y), validation=(id_val, ood_val), batch_size=32)
    gauss = gaussians_reference(net, x, y.numpy())
    m_id, m_ood, m_test = (confidences_reference(net, d, gauss, eps, STD) for d in (id_val, ood_val, test))
    assert np.allclose(det.layer_scores(net, test).numpy(), m_test, rtol=1e-6, atol=1e-8)
    lr = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    lr.fit(np.concatenate([m_id, m_ood]), np.r_[np.zeros(40), np.ones(40)])
    assert det.weighting_ == "logistic-regression"
    assert np.allclose(det.score_inputs(net, test).numpy(), lr.decision_function(m_test), rtol=1e-5, atol=1e-6)
    assert float(ebood.metrics.auroc(det.score_data(net, id_val), det.score_data(net, ood_val))) > 0.5


def test_mahalanobis_without_validation_standardises_and_averages(net, fitted_data):
    x, y = fitted_data
    test = inputs(15, 15)
    det = MahalanobisEnsemble(epsilon=0.0, layers=LAYERS).fit_inputs(net, (x, y))
    gauss = gaussians_reference(net, x, y.numpy())
    m_train = confidences_reference(net, x, gauss, 0.0, [1, 1, 1])
    m_test = confidences_reference(net, test, gauss, 0.0, [1, 1, 1])
    expected = -((m_test - m_train.mean(0)) / m_train.std(0, ddof=1)).mean(1)
    assert np.allclose(det.score_inputs(net, test).numpy(), expected, rtol=1e-6, atol=1e-8)


def test_mahalanobis_default_layers_and_fit_from_outputs(net, fitted_data):
    x, y = fitted_data
    net.ood_layers = ("block",)
    det = MahalanobisEnsemble(epsilon=0.0)
    assert det.fit_layers(net) == ["block"]
    outs = ebood.extract(net, (x, y), layers=det.fit_layers(net), progress=False)
    det.fit(outs)
    assert det.layers_ == ["block", PENULTIMATE]  # every extracted layer when layers is None
    direct = MahalanobisEnsemble(epsilon=0.0, layers=["block", PENULTIMATE]).fit_inputs(net, (x, y))
    t = inputs(7, 16)
    assert torch.allclose(det.score_inputs(net, t), direct.score_inputs(net, t), atol=1e-10)


def test_mahalanobis_errors(net, fitted_data):
    x, y = fitted_data
    with pytest.raises(ValueError, match="no submodule 'blok'"):
        MahalanobisEnsemble(layers=["blok"]).fit_inputs(net, (x, y))
    with pytest.raises(ValueError, match="needs class labels"):
        MahalanobisEnsemble(layers=LAYERS).fit_inputs(net, x)
    with pytest.raises(detectors.NotFittedError):
        MahalanobisEnsemble().score_inputs(net, x)
    with pytest.raises(ValueError, match="no features for layer 'block'"):
        MahalanobisEnsemble(layers=LAYERS).fit(ebood.extract(net, (x, y), layers=["fc1"], progress=False))
    with pytest.raises(TypeError, match="pair"):
        MahalanobisEnsemble(layers=LAYERS).fit_inputs(net, (x, y), validation=x)


def test_mahalanobis_save_and_load(net, fitted_data, tmp_path):
    x, y = fitted_data
    det = MahalanobisEnsemble(epsilon=0.005, layers=LAYERS, std=STD).fit_inputs(net, (x, y), validation=(inputs(20, 17), inputs(20, 18, 2.0)))
    det.calibrate_inputs(net, inputs(30, 19), tpr=0.9)
    path = det.save(tmp_path / "maha.safetensors")
    back = ebood.load(path)
    t = inputs(9, 20)
    assert isinstance(back, MahalanobisEnsemble) and back.get_params() == det.get_params()
    assert torch.equal(back.score_inputs(net, t), det.score_inputs(net, t))
    assert back.threshold_ == det.threshold_
    assert torch.equal(back.predict_inputs(net, t), det.score_inputs(net, t) > det.threshold_)


def test_model_detectors_without_state_save_and_load(net, tmp_path):
    x = inputs(6, 21)
    for det in (ODIN(temperature=5.0, epsilon=0.01, std=STD), GradNorm(2.0), MCDropout(passes=2, seed=3)):
        back = ebood.load(det.save(tmp_path / f"{det.name}.safetensors"))
        assert back.get_params() == det.get_params()
        assert torch.equal(back.score_inputs(net, x), det.score_inputs(net, x))


def test_score_data_equals_batched_score_inputs(net):
    x = inputs(23, 22)
    det = GradNorm()
    assert torch.allclose(det.score_data(net, x, batch_size=5), det.score_inputs(net, x), atol=1e-12)

"""ebood.evaluate_detectors: one pass of the model per dataset (counted), and metrics equal to
ebood.metrics.evaluate on scores computed separately, detector by detector."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import ebood
from ebood import detectors
from ebood.detectors.model import GradNorm, ODIN


class Net(nn.Module):
    """conv-ReLU-pool, fc1-ReLU, dropout, head fc; counts forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(6, 8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(self.drop(F.relu(self.fc1(F.relu(self.conv(x)).mean(dim=(2, 3))))))

    def penultimate(self, x):
        return F.relu(self.fc1(F.relu(self.conv(x)).mean(dim=(2, 3))))


class Counted(Dataset):
    """(input, label) items; counts item reads."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], int(self.y[i])


def make_set(n, seed, shift=0.0, labelled=True):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g) if labelled else torch.full((n,), -1)
    x = torch.randn(n, 3, 4, 4, generator=g) + shift + (y.clamp_min(0)[:, None, None, None] * 0.8 if labelled else 0)
    return Counted(x, y)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    data = {
        "train": make_set(70, 1),
        "test": make_set(45, 2),
        "oods": {"far": make_set(30, 3, shift=3.0, labelled=False), "near": make_set(25, 4, shift=0.7, labelled=False)},
    }
    return model, data


POST_HOC = ["msp", "energy", "max_logit", ("react", {"percentile": 80}), "entropy"]
BS = 16


def n_batches(ds):
    return math.ceil(len(ds) / BS)


def all_sets(data):
    return [data["train"], data["test"], *data["oods"].values()]


def test_each_dataset_runs_through_the_model_once(setup):
    model, data = setup
    res = ebood.evaluate_detectors(model, data["train"], data["test"], data["oods"], POST_HOC, batch_size=BS, progress=False)
    assert model.calls == sum(n_batches(d) for d in all_sets(data))  # one forward per batch, whatever the number of detectors
    assert all(d.reads == len(d) for d in all_sets(data))
    assert set(res.metrics) == {"msp", "energy", "max_logit", "react", "entropy"}
    assert set(res.scores["react"]) == {"id_test", "far", "near"}


def reference_outputs(model, ds):
    with torch.no_grad():
        h = model.penultimate(ds.x)
        logits = h @ model.fc.weight.T + model.fc.bias
    labels = None if bool((ds.y == -1).all()) else ds.y
    return ebood.Outputs(logits=logits, features=h, labels=labels, head=model.fc)


def test_metrics_equal_metrics_of_scores_computed_separately(setup):
    model, data = setup
    specs = POST_HOC + ["odin", ("gradnorm", {"temperature": 2.0})]
    res = ebood.evaluate_detectors(model, data["train"], data["test"], data["oods"], specs, batch_size=BS, progress=False)
    train = reference_outputs(model, data["train"])
    sets = {"id_test": data["test"], **data["oods"]}
    for label, det in res.detectors.items():
        fresh = detectors.create(det.name, **det.get_params())
        if "model" in fresh.requires:
            separate = {k: fresh.score_inputs(model, ds.x) for k, ds in sets.items()}
        else:
            if fresh.needs_fit:
                fresh.fit(train)
            separate = {k: fresh.score(reference_outputs(model, ds)) for k, ds in sets.items()}
        for k in sets:
            assert torch.allclose(res.scores[label][k].double(), separate[k].double(), rtol=1e-4, atol=1e-5), (label, k)
        for name in data["oods"]:
            expected = ebood.metrics.evaluate(separate["id_test"], separate[name])
            assert res.metrics[label][name] == pytest.approx(expected, abs=1e-9), (label, name)
    with torch.no_grad():
        acc = (model(data["test"].x).argmax(1) == data["test"].y).double().mean().item()
    assert res.id_accuracy == pytest.approx(acc)
    assert set(res.timings) == {"extraction", "fitting", "scoring", "total"} and all(v >= 0 for v in res.timings.values())
    rows = res.rows()
    assert len(rows) == len(res.detectors) * 2 and {"detector", "ood_set", "fpr95", "auroc", "aupr_in", "aupr_out"} <= set(rows[0])
    assert res.mean("msp")["auroc"] == pytest.approx((res.metrics["msp"]["far"]["auroc"] + res.metrics["msp"]["near"]["auroc"]) / 2)


def test_model_level_detectors_score_the_same_pass(setup):
    model, data = setup
    res = ebood.evaluate_detectors(model, data["train"], data["test"], data["oods"], ["msp", "odin", "gradnorm"], batch_size=BS, progress=False)
    test_sets = [data["test"], *data["oods"].values()]
    # msp needs no fit: id_train is not read at all; each test set is read exactly once
    assert data["train"].reads == 0 and all(d.reads == len(d) for d in test_sets)
    # per batch: 1 extraction forward + 2 for ODIN (gradient, perturbed input) + 1 for GradNorm
    assert model.calls == 4 * sum(n_batches(d) for d in test_sets)
    assert torch.allclose(res.scores["odin"]["far"], ODIN().score_inputs(model, data["oods"]["far"].x), atol=1e-6)
    assert torch.allclose(res.scores["gradnorm"]["near"], GradNorm().score_inputs(model, data["oods"]["near"].x), atol=1e-6)


def test_cache_makes_a_second_evaluation_model_free(setup, tmp_path):
    model, data = setup
    first = ebood.evaluate_detectors(model, data["train"], data["test"], data["oods"], POST_HOC, cache=tmp_path, batch_size=BS, progress=False)
    calls = model.calls
    second = ebood.evaluate_detectors(model, data["train"], data["test"], data["oods"], POST_HOC, cache=tmp_path, batch_size=BS, progress=False)
    assert model.calls == calls
    for label in first.scores:
        for k in first.scores[label]:
            assert torch.equal(first.scores[label][k], second.scores[label][k])
    assert first.metrics == second.metrics


def test_mahalanobis_ensemble_fits_from_the_single_training_pass(setup):
    model, data = setup
    id_val, ood_val = make_set(30, 5), {"v": make_set(30, 6, shift=3.0, labelled=False)}
    res = ebood.evaluate_detectors(
        model, data["train"], data["test"], data["oods"], [("react", {"percentile": 80}), ("mahalanobis_ensemble", {"epsilon": 0.0, "layers": ["conv"]})],
        id_val=id_val, ood_val=ood_val, batch_size=BS, progress=False,
    )
    assert data["train"].reads == len(data["train"])  # one pass gave both the post-hoc and the ensemble's features
    det = res.detectors["mahalanobis_ensemble"]
    assert det.weighting_ == "logistic-regression" and det.layers_ == ["conv"]
    assert list(res.outputs["id_train"].features) == ["conv", "penultimate"]
    # react was fitted on the penultimate features only, as if extracted alone
    alone = detectors.create("react", percentile=80).fit(reference_outputs(model, data["train"]))
    assert torch.allclose(res.scores["react"]["far"], alone.score(reference_outputs(model, data["oods"]["far"])), atol=1e-5)
    with pytest.raises(ValueError, match="both id_val and ood_val"):
        ebood.evaluate_detectors(model, data["train"], data["test"], data["oods"], ["mahalanobis_ensemble"], id_val=id_val, progress=False)


def test_detector_specs_and_labels(setup):
    model, data = setup
    inst = detectors.create("energy", temperature=2.0)
    res = ebood.evaluate_detectors(
        model, None, data["test"], data["oods"],
        ["msp", ("msp", {"temperature": 10.0}), {"name": "max_logit"}, {"name": "gen", "params": {"gamma": 0.5}}, inst], progress=False,
    )
    assert list(res.detectors) == ["msp(temperature=1.0)", "msp(temperature=10.0)", "max_logit", "gen", "energy"]
    assert res.detectors["energy"] is inst and res.detectors["gen"].gamma == 0.5


def test_errors_are_named(setup):
    model, data = setup
    args = (model, data["train"], data["test"])
    with pytest.raises(ValueError, match="non-empty dict"):
        ebood.evaluate_detectors(*args, {}, ["msp"], progress=False)
    with pytest.raises(ValueError, match="reserved"):
        ebood.evaluate_detectors(*args, {"id_test": data["test"]}, ["msp"], progress=False)
    with pytest.raises(KeyError, match="unknown detector 'enrgy'"):
        ebood.evaluate_detectors(*args, data["oods"], ["enrgy"], progress=False)
    with pytest.raises(ValueError, match="id_train is None.*react"):
        ebood.evaluate_detectors(model, None, data["test"], data["oods"], [("react", {"percentile": 80})], progress=False)
    with pytest.raises(ValueError, match="given twice"):
        ebood.evaluate_detectors(*args, data["oods"], ["msp", "msp"], progress=False)
    with pytest.raises(ValueError, match="far: data is empty"):
        ebood.evaluate_detectors(*args, {"far": make_set(0, 1)}, ["msp"], progress=False)


def test_ensemble_uses_only_its_layers_when_more_are_extracted(setup):
    model, data = setup
    model.ood_layers = ("conv",)
    res = ebood.evaluate_detectors(model, data["train"], data["test"], data["oods"], [{"name": "mahalanobis_ensemble", "epsilon": 0.0}],
                                   layers=["fc1"], progress=False)
    assert list(res.outputs["id_train"].features) == ["fc1", "conv", "penultimate"]
    assert res.detectors["mahalanobis_ensemble"].layers_ == ["conv"]


def test_a_detector_with_non_finite_scores_does_not_sink_the_others():
    import math
    import warnings

    import torch

    from ebood.detectors import Detector, register
    from ebood.evaluation import evaluate_detectors

    @register
    class _AlwaysNaN(Detector):
        name = "_test_always_nan"
        needs_fit = False

        def _score(self, outputs):
            return torch.full((len(outputs),), float("nan"))

    try:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        x_id, x_ood = torch.randn(20, 4), torch.randn(15, 4) * 5
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = evaluate_detectors(model, None, x_id, {"far": x_ood}, ["energy", "_test_always_nan"], progress=False)
        assert all(math.isnan(v) for v in res.metrics["_test_always_nan"]["far"].values())
        assert not any(math.isnan(v) for v in res.metrics["energy"]["far"].values())
        assert any("non-finite" in str(w.message) for w in caught)
    finally:
        from ebood.detectors import base

        base._REGISTRY.pop("_test_always_nan", None)

"""ebood.wrap and export: the wrapped module's scores against each detector's own ``score`` on
extracted outputs (an independent implementation: chunked, with its own exact fallbacks), exported
files against the eager module, and clear errors for what cannot be wrapped."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import ebood
from ebood.cli import app, load_commands
from ebood.deploy import ExportError, UnsupportedDetectorError, export, load_exported, supported, wrap
from ebood.detectors import NotFittedError, create

load_commands()
RUNNER = CliRunner()

#: small hyperparameters for a 16-d feature space and a few hundred training rows
PARAMS = {"knn": {"k": 5}, "nnguide": {"k": 5}, "vim": {"dim": 8}, "residual": {"dim": 8}, "ash": {"variant": "b", "percentile": 70}}
FORMATS = ["pt2", "pt", pytest.param("onnx", marks=pytest.mark.slow)]


class Tiny(nn.Module):
    """Linear-ReLU body (16-d post-ReLU features, many exact zeros) and a 4-class head ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Tiny().eval()
    gen = torch.Generator().manual_seed(1)
    x_train, x_val = torch.randn(300, 6, generator=gen), torch.randn(100, 6, generator=gen)
    x_test = torch.cat([torch.randn(30, 6, generator=gen), 3 * torch.randn(15, 6, generator=gen)])
    with torch.no_grad():
        y_train = model(x_train).argmax(1)
    train = ebood.extract(model, (x_train, y_train), progress=False)
    val = ebood.extract(model, x_val, progress=False)
    test = ebood.extract(model, x_test, progress=False)
    return model, train, val, test, x_test


def fitted(name, setup):
    _, train, val, _, _ = setup
    det = create(name, **PARAMS.get(name, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # degenerate-class warnings on tiny data
        det.fit(train)
    return det.calibrate(val, tpr=0.7)  # a threshold inside the bulk: both decisions occur on the test set


def assert_scores_close(got, ref):
    ref = ref.to(torch.float32)
    torch.testing.assert_close(got.to(torch.float32), ref, rtol=1e-5, atol=1e-5 * max(1.0, float(ref.abs().max())))


@pytest.mark.parametrize("name", supported())
def test_wrapped_module_matches_the_detector(name, setup):
    model, _, _, test, x_test = setup
    det = fitted(name, setup)
    wrapped = wrap(model, det, example=x_test[:2])
    with torch.no_grad():
        out = wrapped(x_test)
    assert set(out) == {"logits", "score", "is_ood"}
    torch.testing.assert_close(out["logits"], test.logits)
    assert_scores_close(out["score"], det.score(test))
    assert out["is_ood"].dtype == torch.bool
    assert torch.equal(out["is_ood"], det.predict(test))
    assert 0 < int(out["is_ood"].sum()) < len(x_test)  # the test set holds both decisions


@pytest.mark.parametrize("name", ["knn", "ash", "mahalanobis", "gen"])
def test_scores_do_not_depend_on_the_batch(name, setup):
    model, _, _, _, x_test = setup
    wrapped = wrap(model, fitted(name, setup))
    with torch.no_grad():
        whole = wrapped(x_test)["score"]
        one_by_one = torch.cat([wrapped(x_test[i : i + 1])["score"] for i in range(len(x_test))])
    assert_scores_close(one_by_one, whole)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", supported())
def test_export_reload_gives_the_eager_scores(name, fmt, setup, tmp_path):
    model, _, _, _, x_test = setup
    det = fitted(name, setup)
    wrapped = wrap(model, det)
    path = export(wrapped, x_test[:4], tmp_path / f"wrapped.{fmt}")
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p != path]  # no temporary file left
    loaded = load_exported(path)
    assert loaded.detector_name == name and loaded.input_shape == (6,) and loaded.threshold == pytest.approx(det.threshold_)
    with torch.no_grad():
        eager = wrapped(x_test)
    got = loaded(x_test)  # another batch size than the example's
    assert_scores_close(got["score"], eager["score"])
    torch.testing.assert_close(got["logits"], eager["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["is_ood"].to(torch.bool), eager["is_ood"])
    single = loaded(x_test[-1:])
    assert_scores_close(single["score"], eager["score"][-1:])


def test_threshold_comes_from_calibration_and_can_be_overridden(setup):
    model, _, val, _, x_test = setup
    det = fitted("energy", setup)
    scores = det.score(val)
    assert int((scores <= det.threshold_).sum()) >= 70  # calibrate's contract (tpr 0.7 of 100), checked here independently
    assert float(wrap(model, det).threshold) == det.threshold_
    wrapped = wrap(model, det, threshold=0.0)
    with torch.no_grad():
        out = wrapped(x_test)
    assert torch.equal(out["is_ood"], out["score"] > 0.0)


def test_a_float64_model_is_scored_in_float64(setup):
    model, *_ = setup
    model64 = Tiny().double().eval()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    gen = torch.Generator().manual_seed(5)
    x_train, x_val, x_test = (torch.randn(n, 6, generator=gen, dtype=torch.float64) for n in (300, 100, 20))
    with torch.no_grad():
        labels = model64(x_train).argmax(1)
    det = create("mahalanobis").fit(ebood.extract(model64, (x_train, labels), progress=False))
    det.calibrate(ebood.extract(model64, x_val, progress=False))
    wrapped = wrap(model64, det)
    with torch.no_grad():
        out = wrapped(x_test)
    assert out["score"].dtype == torch.float64 and wrapped.scorer.whiten.dtype == torch.float64
    ref = det.score(ebood.extract(model64, x_test, progress=False))
    torch.testing.assert_close(out["score"], ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["knn", "vim", "ash", "kl_matching"])
def test_runs_on_the_models_cuda_device(name, setup):
    model, _, _, _, x_test = setup
    det = fitted(name, setup)
    cpu = wrap(model, det)
    with torch.no_grad():
        ref = cpu(x_test)
        model_cuda = Tiny().eval()
        model_cuda.load_state_dict(model.state_dict())
        wrapped = wrap(model_cuda.cuda(), det)
        out = wrapped(x_test.cuda())
    assert out["score"].device.type == "cuda" and out["is_ood"].device.type == "cuda"
    assert_scores_close(out["score"].cpu(), ref["score"])
    assert torch.equal(out["is_ood"].cpu(), ref["is_ood"])


# ----- what cannot be wrapped -------------------------------------------------------------------


@pytest.mark.parametrize("name, reason", [("odin", "backpropagation"), ("gradnorm", "backpropagation"), ("mahalanobis_ensemble", "backpropagation"), ("mc_dropout", "random")])
def test_model_level_detectors_are_refused_with_the_reason(name, reason, setup):
    model = setup[0]
    with pytest.raises(UnsupportedDetectorError, match=rf"detector '{name}'.*{reason}"):
        wrap(model, create(name))


def test_approximate_knn_is_refused_with_the_fix(setup):
    model = setup[0]
    det = fitted("knn", setup)
    det.index = "hnsw"
    with pytest.raises(UnsupportedDetectorError, match="index='flat'"):
        wrap(model, det)


def test_missing_threshold_and_fit_are_errors(setup):
    model, train, *_ = setup
    with pytest.raises(NotFittedError, match="calibrate"):
        wrap(model, create("knn", k=5).fit(train))
    with pytest.raises(NotFittedError, match="not fitted"):
        wrap(model, create("knn", k=5), threshold=1.0)


def test_feature_detector_on_a_torchscript_model_is_refused(setup, tmp_path):
    model = setup[0]
    scripted = torch.jit.trace(model, torch.randn(2, 6))
    with pytest.raises(UnsupportedDetectorError, match="TorchScript"):
        wrap(scripted, fitted("knn", setup))
    out = wrap(scripted, fitted("energy", setup))(torch.randn(3, 6))  # logits are enough
    assert out["score"].shape == (3,)


def test_model_without_a_head_or_with_another_head_is_refused(setup):
    model, *_ = setup
    det = fitted("vim", setup)
    other = Tiny().eval()
    with pytest.raises(ValueError, match="different|differs"):
        wrap(other, det, example=torch.randn(2, 6))

    class Headless(nn.Module):
        def forward(self, x):
            return x[:, :4] * 2

    with pytest.raises(ValueError, match="nn.Linear"):
        wrap(Headless(), fitted("knn", setup), example=torch.randn(2, 6))

    class Rescaled(Tiny):
        def forward(self, x):
            return super().forward(x) * 3  # the head's output is not the logits

    rescaled = Rescaled().eval()
    rescaled.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="not the output of its last nn.Linear"):
        wrap(rescaled, fitted("knn", setup), example=torch.randn(2, 6))


def test_export_rejects_unknown_suffix_and_bad_files(setup, tmp_path):
    model = setup[0]
    wrapped = wrap(model, fitted("energy", setup))
    with pytest.raises(ExportError, match="unknown export format"):
        export(wrapped, torch.randn(2, 6), tmp_path / "w.bin")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ExportError, match="junk.pt2"):
        load_exported(tmp_path / "junk.pt2")
    plain = torch.jit.trace(model, torch.randn(2, 6))
    plain.save(str(tmp_path / "plain.pt"))
    with pytest.raises(ExportError, match="not a module exported by ebood"):
        load_exported(tmp_path / "plain.pt")


def test_wrap_is_exposed_lazily_at_the_package_top():
    assert ebood.wrap is ebood.deploy.wrap


# ----- ebood export -----------------------------------------------------------------------------


def test_cli_export_writes_a_module_that_matches_python(tmp_path):
    from ebood.models import load_model

    torch.manual_seed(0)
    net = load_model("digits_cnn")
    torch.save(net.state_dict(), tmp_path / "ck.pt")
    x = torch.rand(120, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    outs = ebood.extract(net, x[:80], progress=False)
    det = create("react").fit(outs).calibrate(ebood.extract(net, x[80:100], progress=False))
    det.save(tmp_path / "det.safetensors")
    res = RUNNER.invoke(app, ["export", "--model", "digits_cnn", "--checkpoint", str(tmp_path / "ck.pt"), "--detector", str(tmp_path / "det.safetensors"), "-o", str(tmp_path / "wrapped.pt2")])
    assert res.exit_code == 0, res.output
    loaded = load_exported(tmp_path / "wrapped.pt2")
    assert loaded.input_shape == (1, 8, 8)
    got = loaded(x[100:])
    test = ebood.extract(net, x[100:], progress=False)
    assert_scores_close(got["score"], det.score(test))
    assert torch.equal(got["is_ood"], det.predict(test))
    assert np.array_equal(got["logits"].argmax(1).numpy(), test.logits.argmax(1).numpy())


def _assert_one_line_error(res, *fragments):
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output
    assert res.output.startswith("ebood: error:") and res.output.count("\n") == 1, res.output
    for fragment in fragments:
        assert fragment in res.output, res.output


def test_cli_export_errors_are_one_line(tmp_path):
    create("odin").save(tmp_path / "odin.safetensors")
    base = ["export", "--model", "digits_cnn", "--detector"]
    _assert_one_line_error(RUNNER.invoke(app, base + [str(tmp_path / "odin.safetensors"), "-o", str(tmp_path / "w.pt2")]), "odin", "backpropagation")
    _assert_one_line_error(RUNNER.invoke(app, base + [str(tmp_path / "none.safetensors"), "-o", str(tmp_path / "w.pt2")]), "no such detector file")
    _assert_one_line_error(RUNNER.invoke(app, base + [str(tmp_path / "odin.safetensors"), "-o", str(tmp_path / "w.zip")]), "unknown export format")
    _assert_one_line_error(RUNNER.invoke(app, ["export", "--model", "pkg.mod:fn", "--detector", str(tmp_path / "odin.safetensors"), "-o", str(tmp_path / "w.pt")]), "input shape")


def test_cli_serve_refuses_bad_options_before_starting_ray(tmp_path):
    pytest.importorskip("ray.serve")
    create("gradnorm").save(tmp_path / "gn.safetensors")
    _assert_one_line_error(RUNNER.invoke(app, ["serve", "--model", "digits_cnn"]), "--detector")
    _assert_one_line_error(RUNNER.invoke(app, ["serve", "--model", "digits_cnn", "--detector", str(tmp_path / "gn.safetensors")]), "gradnorm", "backpropagation")
    _assert_one_line_error(RUNNER.invoke(app, ["serve", "--exported", str(tmp_path / "w.pt2"), "--model", "digits_cnn"]), "not both")
    _assert_one_line_error(RUNNER.invoke(app, ["serve", "--exported", str(tmp_path / "missing.pt2")]), "no such file")

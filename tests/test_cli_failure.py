"""`ebood evaluate --correct / --logits` and `ebood calibrate`: results against scikit-learn and
brute force, the saved threshold, and one-line errors."""

import json

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run
from sklearn.metrics import average_precision_score, roc_auc_score

from ebood import detectors, selective


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("failure")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 3000)
    z = (rng.normal(size=(3000, 10)) * 2).astype(np.float32)
    z[np.arange(3000), y] += 5
    np.savez(d / "val.npz", logits=z[:2000], labels=y[:2000])
    np.savez(d / "test.npz", logits=z[2000:], labels=y[2000:])
    np.save(d / "test_logits.npy", z[2000:])
    np.save(d / "test_labels.npy", y[2000:])
    s = -np.max(np.exp(z[2000:] - z[2000:].max(1, keepdims=True)) / np.exp(z[2000:] - z[2000:].max(1, keepdims=True)).sum(1, keepdims=True), axis=1)
    np.save(d / "id.npy", s)
    np.save(d / "ood.npy", rng.normal(-0.5, 0.2, 500))
    np.save(d / "correct.npy", z[2000:].argmax(1) == y[2000:])
    return d


def brute_aurc(s, wrong):
    return float(np.mean([wrong[s <= t].mean() for t in s]))


def test_evaluate_reports_misclassification_and_failure(files):
    d = files
    res = run("evaluate", "--id", d / "id.npy", "--ood", f"far={d / 'ood.npy'}", "--correct", d / "correct.npy", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    s, ok, o = np.load(d / "id.npy"), np.load(d / "correct.npy"), np.load(d / "ood.npy")
    mis = out["misclassification"]
    assert mis["auroc"] == pytest.approx(roc_auc_score(~ok, s), abs=1e-12)
    assert mis["aupr"] == pytest.approx(average_precision_score(ok, -s), abs=1e-12)
    assert mis["aurc"] == pytest.approx(brute_aurc(s, ~ok), abs=1e-12)
    assert mis["accuracy"] == pytest.approx(ok.mean())
    pooled, pooled_ok = np.r_[s, o], np.r_[ok, np.zeros(o.size, bool)]
    far = out["failure"]["far"]
    assert far["auroc"] == pytest.approx(roc_auc_score(~pooled_ok, pooled), abs=1e-12)
    assert far["aurc"] == pytest.approx(brute_aurc(pooled, ~pooled_ok), abs=1e-12)
    assert set(out["sets"]) == {"far"}  # the OOD metrics are still there


def test_evaluate_from_logits_and_labels_equals_correct(files):
    d = files
    by_flags = json.loads(run("evaluate", "--id", d / "id.npy", "--correct", d / "correct.npy", "--json").output)
    by_npz = json.loads(run("evaluate", "--id", d / "id.npy", "--logits", d / "test.npz", "--json").output)
    by_files = json.loads(run("evaluate", "--id", d / "id.npy", "--logits", d / "test_logits.npy", "--labels", d / "test_labels.npy", "--json").output)
    assert by_flags["misclassification"] == by_npz["misclassification"] == by_files["misclassification"]
    assert "sets" not in by_flags


def test_evaluate_table_shows_the_tasks(files):
    d = files
    res = run("evaluate", "--id", d / "id.npy", "--ood", f"far={d / 'ood.npy'}", "--correct", d / "correct.npy", env={"COLUMNS": "140"})
    assert res.exit_code == 0, res.output
    for text in ("misclassification (ID)", "failure (ID + far)", "AURC", "E-AURC", "ID accuracy"):
        assert text in res.output


@pytest.mark.parametrize(
    "extra, fragments",
    [
        ((), ("nothing to evaluate",)),
        (("--correct", "{d}/ood.npy"), ("500 entries", "1000", "--id")),
        (("--correct", "{d}/correct.npy", "--logits", "{d}/test.npz"), ("either --correct or --logits",)),
        (("--logits", "{d}/test_logits.npy"), ("no 'labels' array",)),
        (("--labels", "{d}/test_labels.npy"), ("--labels needs --logits",)),
        (("--logits", "{d}/val.npz"), ("N = 1000",)),
    ],
)
def test_evaluate_failure_errors_are_one_line(files, extra, fragments):
    d = files
    res = run("evaluate", "--id", d / "id.npy", *(e.format(d=d) for e in extra))
    assert_one_line_error(res, *fragments)


@pytest.mark.parametrize("method", ["sgr", "ltt"])
def test_calibrate_writes_the_guaranteed_threshold(files, tmp_path, method):
    d = files
    assert run("fit", "doctor", d / "val.npz", "-o", tmp_path / "d.safetensors").exit_code == 0
    res = run("calibrate", tmp_path / "d.safetensors", d / "val.npz", "--risk", "0.05", "--delta", "0.1", "--method", method)
    assert res.exit_code == 0, res.output
    det = detectors.load(tmp_path / "d.safetensors")
    val = np.load(d / "val.npz")
    s = detectors.create("doctor").score(__import__("ebood").Outputs(logits=val["logits"]))
    assert det.threshold_ == selective.calibrate(s, val["logits"].argmax(1) == val["labels"], risk=0.05, delta=0.1, method=method)
    assert det.calibration_risk_ == 0.05 and det.calibration_method_ == method
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, then renamed


def test_calibrate_to_another_file_and_by_tpr(files, tmp_path):
    d = files
    run("fit", "msp", d / "val.npz", "-o", tmp_path / "m.safetensors")
    res = run("calibrate", tmp_path / "m.safetensors", d / "val.npz", "--tpr", "0.9", "-o", tmp_path / "m90.safetensors")
    assert res.exit_code == 0, res.output
    assert detectors.load(tmp_path / "m.safetensors").threshold_ is None
    assert detectors.load(tmp_path / "m90.safetensors").calibration_tpr_ == 0.9


@pytest.mark.parametrize(
    "extra, fragments",
    [
        ((), ("exactly one of --risk",)),
        (("--risk", "0.1", "--tpr", "0.9"), ("exactly one of --risk",)),
        (("--risk", "0.00001"), ("no threshold certifies",)),
        (("--risk", "0.1", "--method", "magic"), ("method must be one of",)),
        (("--risk", "2"), ("risk must be in",)),
    ],
)
def test_calibrate_errors_are_one_line(files, tmp_path, extra, fragments):
    d = files
    run("fit", "msp", d / "val.npz", "-o", tmp_path / "m.safetensors")
    assert_one_line_error(run("calibrate", tmp_path / "m.safetensors", d / "val.npz", *extra), *fragments)
    assert_one_line_error(run("calibrate", tmp_path / "missing.safetensors", d / "val.npz", "--risk", "0.1"), "no such file")

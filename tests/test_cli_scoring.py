"""`ebood score` and `ebood evaluate`: results against scipy / scikit-learn, and one-line errors."""

import json

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run
from scipy.special import logsumexp, softmax
from sklearn.metrics import average_precision_score, roc_auc_score

import ebood


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(scale=3.0, size=(50, 7)).astype(np.float32)


# ----- ebood score -------------------------------------------------------------------------------


def test_score_energy_by_default(tmp_path, logits):
    np.save(tmp_path / "z.npy", logits)
    res = run("score", tmp_path / "z.npy", "-o", tmp_path / "s.npy")
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), -logsumexp(logits.astype(np.float64), axis=1), rtol=1e-6)


def test_score_all_with_temperature(tmp_path, logits):
    np.savez(tmp_path / "z.npz", logits=logits)
    res = run("score", tmp_path / "z.npz", "--score", "all", "-T", "2", "-o", tmp_path / "s.npz")
    assert res.exit_code == 0, res.output
    got = np.load(tmp_path / "s.npz")
    z = logits.astype(np.float64)
    p = softmax(z, axis=1)
    np.testing.assert_allclose(got["energy"], -2 * logsumexp(z / 2, axis=1), rtol=1e-6)
    np.testing.assert_allclose(got["msp"], -softmax(z / 2, axis=1).max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(got["max_logit"], -z.max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(got["entropy"], -(p * np.log(p)).sum(axis=1), rtol=1e-5, atol=1e-6)
    assert np.array_equal(got["prediction"], z.argmax(axis=1))


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".safetensors"])
def test_score_reads_other_formats(tmp_path, logits, suffix):
    path = tmp_path / f"z{suffix}"
    ebood.io.write_arrays(path, {"logits": logits})
    res = run("score", path, "--score", "msp", "-o", tmp_path / "s.npy")
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), -softmax(logits.astype(np.float64), axis=1).max(axis=1), rtol=1e-6)


def test_score_with_a_fitted_detector_and_predict(tmp_path):
    rng = np.random.default_rng(1)
    x = np.abs(rng.normal(size=(120, 10))).astype(np.float32)
    w = rng.normal(size=(3, 10)).astype(np.float32)
    np.savez(tmp_path / "train.npz", features=x[:80], head_weight=w, head_bias=np.zeros(3, np.float32))
    np.savez(tmp_path / "test.npz", features=x[80:])
    assert run("fit", "react", tmp_path / "train.npz", "-o", tmp_path / "react.st").exit_code == 0
    res = run("score", "--detector", tmp_path / "react.st", tmp_path / "test.npz", "-o", tmp_path / "s.npy")
    assert res.exit_code == 0, res.output
    clip = np.percentile(x[:80].astype(np.float64), 90)
    expected = -logsumexp(np.minimum(x[80:], clip).astype(np.float64) @ w.T.astype(np.float64), axis=1)
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), expected, rtol=1e-5)
    # --predict needs a calibrated detector
    res = run("score", "--detector", tmp_path / "react.st", tmp_path / "test.npz", "--predict", "-o", tmp_path / "p.npz")
    assert_one_line_error(res, "no threshold", "--calibrate")
    assert run("fit", "react", tmp_path / "train.npz", "--calibrate", tmp_path / "train.npz", "--tpr", "0.8", "-o", tmp_path / "r2.st").exit_code == 0
    res = run("score", "--detector", tmp_path / "r2.st", tmp_path / "test.npz", "--predict", "-o", tmp_path / "p.npz")
    assert res.exit_code == 0, res.output
    got = np.load(tmp_path / "p.npz")
    train_scores = -logsumexp(np.minimum(x[:80], clip).astype(np.float64) @ w.T.astype(np.float64), axis=1)
    threshold = np.sort(train_scores)[64 - 1]  # 80% of 80 ID samples kept
    assert np.array_equal(got["is_ood"].astype(bool), got["react"] > np.float32(threshold))
    assert 0 < got["is_ood"].sum() < 40


def test_score_errors_are_one_line(tmp_path, logits):
    np.save(tmp_path / "z.npy", logits)
    out = tmp_path / "s.npy"
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    np.save(tmp_path / "flat.npy", logits[:, 0])
    np.savez(tmp_path / "nofeatures.npz", logits=logits)
    det = ebood.detectors.create("ash").fit(ebood.Outputs(features=np.ones((3, 4), np.float32), head=ebood.Head(np.eye(4, dtype=np.float32))))
    det.save(tmp_path / "ash.st")
    cases = [
        (("score", tmp_path / "missing.npy", "-o", out), ("no such file",)),
        (("score", tmp_path / "corrupt.npz", "-o", out), ("corrupt.npz", "cannot read")),
        (("score", tmp_path / "flat.npy", "-o", out), ("at least 2 dimensions",)),
        (("score", tmp_path / "z.npy", "--score", "energyy", "-o", out), ("unknown score 'energyy'",)),
        (("score", tmp_path / "z.npy", "-T", "0", "-o", out), ("temperature must be",)),
        (("score", tmp_path / "z.npy", "--detector", tmp_path / "corrupt.safetensors", "-o", out), ("corrupt.safetensors",)),
        (("score", tmp_path / "z.npy", "--detector", tmp_path / "z.npy", "-o", out), ("z.npy",)),
        (("score", tmp_path / "nofeatures.npz", "--detector", tmp_path / "ash.st", "-o", out), ("Outputs.features",)),
        (("score", tmp_path / "z.npy", "--predict", "-o", out), ("need --detector",)),
        (("score", tmp_path / "z.npy", "-o", tmp_path / "s.unknown"), ("unsupported file type",)),
    ]
    for args, fragments in cases:
        assert_one_line_error(run(*args), *fragments)


# ----- ebood evaluate ----------------------------------------------------------------------------


@pytest.fixture()
def score_files(tmp_path):
    rng = np.random.default_rng(2)
    id_s = rng.normal(size=300)
    ood = {"near": rng.normal(0.5, 1, size=200), "far": rng.normal(2.0, 1, size=150)}
    np.save(tmp_path / "id.npy", id_s)
    for name, s in ood.items():
        np.save(tmp_path / f"{name}.npy", s)
    return tmp_path, id_s, ood


def test_evaluate_json_matches_sklearn(score_files):
    d, id_s, ood = score_files
    res = run("evaluate", "--id", d / "id.npy", "--ood", f"near={d / 'near.npy'}", "--ood", d / "far.npy", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert set(doc["sets"]) == {"near", "far"}
    for name, s in ood.items():
        y = np.r_[np.zeros(id_s.size), np.ones(s.size)]
        pooled = np.r_[id_s, s]
        row = doc["sets"][name]
        assert row["auroc"] == pytest.approx(roc_auc_score(y, pooled), abs=1e-12)
        assert row["aupr_out"] == pytest.approx(average_precision_score(y, pooled), abs=1e-12)
        assert row["aupr_in"] == pytest.approx(average_precision_score(1 - y, -pooled), abs=1e-12)
        threshold = np.sort(id_s)[int(np.ceil(0.95 * id_s.size)) - 1]
        assert row["fpr95"] == pytest.approx(np.mean(s <= threshold), abs=1e-12)
    assert doc["mean"]["auroc"] == pytest.approx((doc["sets"]["near"]["auroc"] + doc["sets"]["far"]["auroc"]) / 2)


def test_evaluate_table(score_files):
    d, *_ = score_files
    res = run("evaluate", "--id", d / "id.npy", "--ood", f"near={d / 'near.npy'}", env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    assert "near" in res.output and "mean" in res.output and "AUROC" in res.output


def test_evaluate_picks_an_array_by_key(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "id.npz", energy=rng.normal(size=50), msp=rng.normal(size=50))
    np.savez(tmp_path / "ood.npz", energy=rng.normal(1, 1, size=40), msp=rng.normal(size=40))
    res = run("evaluate", "--id", tmp_path / "id.npz", "--ood", tmp_path / "ood.npz", "--key", "energy", "--json")
    assert res.exit_code == 0, res.output
    id_e, ood_e = np.load(tmp_path / "id.npz")["energy"], np.load(tmp_path / "ood.npz")["energy"]
    expected = roc_auc_score(np.r_[np.zeros(50), np.ones(40)], np.r_[id_e, ood_e])
    assert json.loads(res.output)["sets"]["ood"]["auroc"] == pytest.approx(expected, abs=1e-12)


def test_evaluate_errors_are_one_line(score_files):
    d, id_s, _ = score_files
    nan = id_s.copy()
    nan[7] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "matrix.npy", np.zeros((5, 3)))
    np.save(d / "empty.npy", np.zeros(0))
    np.savez(d / "two.npz", energy=id_s, msp=id_s)
    (d / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    ood = ("--ood", d / "near.npy")
    cases = [
        (("evaluate", "--id", d / "missing.npy", *ood), ("no such file",)),
        (("evaluate", "--id", d / "corrupt.npy", *ood), ("corrupt.npy",)),
        (("evaluate", "--id", d / "nan.npy", *ood), ("nan.npy", "non-finite", "index 7")),
        (("evaluate", "--id", d / "matrix.npy", *ood), ("1-D",)),
        (("evaluate", "--id", d / "empty.npy", *ood), ("empty.npy", "empty")),
        (("evaluate", "--id", d / "id.npy", "--ood", d / "nan.npy"), ("nan.npy", "non-finite")),
        (("evaluate", "--id", d / "two.npz", *ood), ("several arrays", "--key")),
        (("evaluate", "--id", f"{d / 'two.npz'}:nope", *ood), ("two.npz: no array named 'nope'", "energy, msp")),
        (("evaluate", "--id", d / "two.npz", *ood, "--key", "nope"), ("two.npz: no array named 'nope'",)),
        (("evaluate", "--id", d / "id.npy", *ood, "--positive", "both"), ("--positive",)),
        (("evaluate", "--id", d / "id.npy", *ood, "--tpr", "1.5"), ("--tpr",)),
        (("evaluate", "--id", d / "id.npy", "--ood", f"a={d / 'near.npy'}", "--ood", f"a={d / 'far.npy'}"), ("given twice",)),
        (("evaluate", "--id", d / "id.npy", "--ood", "="), ("NAME=FILE",)),
    ]
    for args, fragments in cases:
        assert_one_line_error(run(*args), *fragments)


def test_missing_required_option_is_a_usage_error(tmp_path):
    res = run("evaluate", "--ood", tmp_path / "x.npy")
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_evaluate_mixes_npy_and_npz_with_a_key_per_file(score_files):
    from sklearn.metrics import roc_auc_score

    d, id_s, _ = score_files
    near = np.load(d / "near.npy")
    np.savez(d / "id_all.npz", energy=id_s, msp=-id_s)
    np.savez(d / "near_all.npz", energy=near, msp=-near)
    expected = roc_auc_score(np.r_[np.zeros(len(id_s)), np.ones(len(near))], np.r_[id_s, near])
    for args in (["--id", d / "id_all.npz", "--ood", f"near={d / 'near.npy'}", "--key", "energy"],  # --key skips the .npy
                 ["--id", f"{d / 'id_all.npz'}:energy", "--ood", f"near={d / 'near.npy'}"],
                 ["--id", d / "id.npy", "--ood", f"near={d / 'near_all.npz'}:energy", "--key", "msp"]):  # per file wins
        res = run("evaluate", *args, "--json")
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["sets"]["near"]["auroc"] == pytest.approx(expected, abs=1e-12)
    res = run("evaluate", "--id", f"{d / 'id_all.npz'}:msp", "--ood", f"near={d / 'near_all.npz'}:msp", "--json")
    assert json.loads(res.output)["sets"]["near"]["auroc"] == pytest.approx(1 - expected, abs=1e-12)


def test_score_says_how_many_rows_of_logits_are_not_finite(tmp_path):
    logits = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    logits[3, 1] = np.nan
    logits[7, 0] = np.inf
    logits[7, 2] = np.nan
    logits[11, 3] = -np.inf
    np.save(tmp_path / "l.npy", logits)
    res = run("score", tmp_path / "l.npy", "-o", tmp_path / "s.npy")
    assert res.exit_code == 0, res.output
    assert f"ebood: warning: {tmp_path / 'l.npy'}: 3 of 20 rows of logits hold NaN or infinite values" in res.output
    written = np.load(tmp_path / "s.npy")
    assert np.isfinite(written).sum() >= 17 and np.isnan(written[3])
    res = run("score", tmp_path / "l.npy", "-o", tmp_path / "t.npy", "--strict")
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [f"ebood: error: {tmp_path / 'l.npy'}: 3 of 20 rows of logits hold NaN or infinite values"]
    assert not (tmp_path / "t.npy").exists()
    np.save(tmp_path / "ok.npy", np.nan_to_num(logits, nan=0.0, posinf=1.0, neginf=-1.0))
    res = run("score", tmp_path / "ok.npy", "-o", tmp_path / "u.npy", "--strict")
    assert res.exit_code == 0 and "warning" not in res.output

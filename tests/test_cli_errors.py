"""The CLI error matrix: every subcommand x (missing file, wrong type, unknown name, bad
hyperparameter, unwritable output) ends with exit code 2, ONE line ``ebood: error: ...`` that
names the input, and no file left behind. Plus the ordinary mistakes of issue 15 (item 11)."""

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import ebood
from ebood.cli import app, load_commands

load_commands()
RUNNER = CliRunner()


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 4)).astype(np.float32)
    np.save(d / "z.npy", z)
    np.save(d / "ood.npy", z[:, 0])
    feats = rng.random((40, 6)).astype(np.float32)
    np.savez(d / "train.npz", features=feats, logits=z, labels=np.arange(40) % 4,
             head_weight=rng.normal(size=(4, 6)).astype(np.float32), head_bias=np.zeros(4, np.float32))
    np.savez(d / "gray.npz", inputs=rng.random((12, 1, 8, 8)).astype(np.float32), labels=np.arange(12) % 10)
    np.savez(d / "rgb.npz", inputs=rng.random((12, 3, 8, 8)).astype(np.float32), labels=np.arange(12) % 10)
    np.savez(d / "big.npz", inputs=rng.random((12, 1, 16, 16)).astype(np.float32))
    (d / "text.npy").write_text("1,2,3\n4,5,6\n")
    (d / "text.pt").write_text("not a checkpoint\n")
    (d / "text.toml").write_text("this is = = not toml\n")
    (d / "a_file").write_text("a file where a folder should be\n")
    (d / "outdir").mkdir()
    (d / "outdir.safetensors").mkdir()
    (d / "results").mkdir()
    (d / "results" / "report.html").mkdir()  # a directory where the report goes
    return d


# (subcommand, error kind) -> arguments (FILES is replaced by the inputs folder) and a fragment of the message.
# Not in the matrix: `detectors` takes no input and writes nothing; `evaluate` writes nothing;
# `report` takes no name or hyperparameter.
MATRIX = {
    ("score", "missing file"): (["score", "F/missing.npy", "-o", "F/out.npy"], "missing.npy: no such file"),
    ("score", "wrong type"): (["score", "F/text.npy", "-o", "F/out.npy"], "text.npy: not a .npy file"),
    ("score", "unknown name"): (["score", "F/z.npy", "--score", "energyy", "-o", "F/out.npy"], "unknown score 'energyy'"),
    ("score", "bad hyperparameter"): (["score", "F/z.npy", "-T", "0", "-o", "F/out.npy"], "temperature"),
    ("score", "unwritable output"): (["score", "F/z.npy", "-o", "F/outdir"], "outdir: cannot write: it is a directory"),
    ("evaluate", "missing file"): (["evaluate", "--id", "F/missing.npy", "--ood", "F/ood.npy"], "missing.npy: no such file"),
    ("evaluate", "wrong type"): (["evaluate", "--id", "F/text.npy", "--ood", "F/ood.npy"], "text.npy: not a .npy file"),
    ("evaluate", "unknown name"): (["evaluate", "--id", "F/train.npz", "--ood", "F/ood.npy", "--key", "nope"], "no array named 'nope'"),
    ("evaluate", "bad hyperparameter"): (["evaluate", "--id", "F/ood.npy", "--ood", "F/ood.npy", "--tpr", "1.5"], "--tpr must be"),
    ("fit", "missing file"): (["fit", "knn", "F/missing.npz", "-o", "F/k.safetensors"], "missing.npz: no such file"),
    ("fit", "wrong type"): (["fit", "knn", "F/text.npy", "-o", "F/k.safetensors"], "text.npy: not a .npy file"),
    ("fit", "unknown name"): (["fit", "knnn", "F/train.npz", "-o", "F/k.safetensors"], "unknown detector 'knnn'"),
    ("fit", "bad hyperparameter"): (["fit", "knn", "F/train.npz", "-p", "k=-1", "-o", "F/k.safetensors"], "k must be"),
    ("fit", "unwritable output"): (["fit", "knn", "F/train.npz", "-o", "F/outdir"], "outdir: cannot write: it is a directory"),
    ("extract", "missing file"): (["extract", "-m", "digits_cnn", "-d", "array:F/missing.npz", "-o", "F/o.safetensors"], "missing.npz"),
    ("extract", "wrong type"): (["extract", "-m", "digits_cnn", "-d", "F/text.npy", "-o", "F/o.safetensors"], "text.npy: not a .npy file"),
    ("extract", "unknown name"): (["extract", "-m", "no_such_model", "-d", "F/gray.npz", "-o", "F/o.safetensors"], "no_such_model"),
    ("extract", "bad hyperparameter"): (["extract", "-m", "digits_cnn", "-d", "F/gray.npz", "--pool", "median", "-o", "F/o.safetensors"], "pool must be"),
    ("extract", "unwritable output"): (["extract", "-m", "digits_cnn", "-d", "F/gray.npz", "-o", "F/a_file/o.safetensors"], "a part of the path is a file"),
    ("train", "missing file"): (["train", "-m", "digits_cnn", "--data", "array:F/missing.npz", "-o", "F/t.safetensors", "--epochs", "1"], "missing.npz"),
    ("train", "wrong type"): (["train", "-m", "digits_cnn", "--checkpoint", "F/text.pt", "--data", "array:F/gray.npz", "-o", "F/t.safetensors", "--epochs", "1"], "text.pt"),
    ("train", "unknown name"): (["train", "-m", "digits_cnn", "--data", "array:F/gray.npz", "--optimizer", "adamw", "-o", "F/t.safetensors", "--epochs", "1"], "adamw"),
    ("train", "bad hyperparameter"): (["train", "-m", "digits_cnn", "--data", "array:F/gray.npz", "--lr", "-1", "-o", "F/t.safetensors", "--epochs", "1"], "lr"),
    ("train", "unwritable output"): (["train", "-m", "digits_cnn", "--data", "array:F/gray.npz", "-o", "F/outdir.safetensors", "--epochs", "1"], "outdir.safetensors: cannot write: it is a directory"),
    ("finetune", "missing file"): (["finetune", "-m", "digits_cnn", "--data", "array:F/missing.npz", "--outliers", "array:F/big.npz", "-o", "F/f.safetensors"], "missing.npz"),
    ("finetune", "wrong type"): (["finetune", "-m", "digits_cnn", "--checkpoint", "F/text.pt", "--data", "array:F/gray.npz", "--outliers", "array:F/gray.npz", "-o", "F/f.safetensors"], "text.pt"),
    ("finetune", "unknown name"): (["finetune", "-m", "digits_cnn", "--data", "array:F/gray.npz", "--outliers", "array:F/gray.npz", "--loss", "focal", "-o", "F/f.safetensors"], "--loss must be"),
    ("finetune", "bad hyperparameter"): (["finetune", "-m", "digits_cnn", "--data", "array:F/gray.npz", "--outliers", "array:F/gray.npz", "--weight", "-1", "-o", "F/f.safetensors"], "weight"),
    ("finetune", "unwritable output"): (["finetune", "-m", "digits_cnn", "--data", "array:F/gray.npz", "--outliers", "array:F/gray.npz", "-o", "F/outdir.safetensors"], "outdir.safetensors: cannot write: it is a directory"),
    ("report", "missing file"): (["report", "F/missing_results"], "missing_results"),
    ("report", "wrong type"): (["report", "F/z.npy"], "z.npy"),
    ("report", "unwritable output"): (["report", "F/results"], "results"),
    ("bench", "missing file"): (["bench", "F/missing.toml"], "missing.toml"),
    ("bench", "wrong type"): (["bench", "F/text.toml"], "text.toml"),
    ("bench", "unknown name"): (["bench", "--detectors", "knnn"], "unknown detector 'knnn'"),
    ("bench", "bad hyperparameter"): (["bench", "--figures", "many"], "--figures must be"),
    ("bench", "unwritable output"): (["bench", "-o", "F/a_file", "--detectors", "energy"], "a_file: cannot write: it is a file"),
}


@pytest.mark.parametrize("case", sorted(MATRIX), ids=lambda c: f"{c[0]}-{c[1].replace(' ', '_')}")
def test_cli_error_matrix(files, case):
    args, fragment = MATRIX[case]
    before = listing(files)
    res = RUNNER.invoke(app, [a.replace("F/", f"{files}/") for a in args])
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), f"crashed: {res.exception!r}"
    errors = [line for line in res.output.splitlines() if line.startswith("ebood: error:")]
    assert len(errors) == 1 and res.output.rstrip().endswith(errors[0]), res.output
    assert "Traceback" not in res.output and fragment in errors[0], res.output
    assert listing(files) == before  # nothing written, nothing left behind


# ----- ordinary mistakes (issue 15, item 11) ------------------------------------------------------------


def one_error_line(res) -> str:
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("ebood: error:") and "Traceback" not in res.output, res.output
    return lines[-1]


def test_three_channels_into_a_one_channel_model(files, tmp_path):
    line = one_error_line(RUNNER.invoke(app, ["extract", "-m", "digits_cnn", "-d", f"array:{files}/rgb.npz", "-o", str(tmp_path / "o.safetensors"), "--no-progress"]))
    assert "array:" in line and "rgb.npz" in line and "takes 1-channel inputs" in line and "3 channel" in line
    assert list(tmp_path.iterdir()) == []


def test_mean_of_three_channels_on_a_one_channel_model(files, tmp_path):
    line = one_error_line(RUNNER.invoke(app, ["train", "-m", "digits_cnn", "--data", f"array:{files}/gray.npz", "--mean", "0.5,0.5,0.5",
                                              "--std", "0.2,0.2,0.2", "--epochs", "1", "-o", str(tmp_path / "t.safetensors"), "--no-progress"]))
    assert "gray.npz" in line and "takes 1-channel inputs" in line and "--mean" in line
    assert list(tmp_path.iterdir()) == []


def test_outliers_of_another_image_size(files, tmp_path):
    line = one_error_line(RUNNER.invoke(app, ["finetune", "-m", "digits_cnn", "--data", f"array:{files}/gray.npz", "--outliers", f"array:{files}/big.npz",
                                              "--epochs", "1", "-o", str(tmp_path / "f.safetensors"), "--no-progress"]))
    assert "big.npz" in line and "(1, 16, 16)" in line and "(1, 8, 8)" in line and "--image-size" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["extract", "train"])
def test_a_device_that_does_not_exist(files, tmp_path, command):
    data = ["-d", f"{files}/gray.npz"] if command == "extract" else ["--data", f"array:{files}/gray.npz", "--epochs", "1"]
    line = one_error_line(RUNNER.invoke(app, [command, "-m", "digits_cnn", *data, "--device", "gpu9", "-o", str(tmp_path / "o.safetensors"), "--no-progress"]))
    assert "device 'gpu9' is not a device name" in line and "cpu, cuda" in line


def test_parse_device_refuses_an_absent_cuda_index():
    import torch

    from ebood.runtime import DeviceError, parse_device

    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError):
        parse_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_write_errors_into_safetensors_and_pt_outputs(files, tmp_path, monkeypatch, suffix):
    import errno
    import os

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    line = one_error_line(RUNNER.invoke(app, ["score", f"{files}/train.npz", "--score", "all", "-o", str(tmp_path / f"s{suffix}")]))
    assert f"s{suffix}: cannot write: no space left on the device" in line
    assert list(tmp_path.iterdir()) == []


def test_fit_on_a_npy_says_how_to_give_features(files, tmp_path):
    np.save(tmp_path / "feat_only.npy", np.random.default_rng(0).random((10, 4)).astype(np.float32))
    line = one_error_line(RUNNER.invoke(app, ["fit", "knn", str(tmp_path / "feat_only.npy"), "-o", str(tmp_path / "k.safetensors")]))
    assert "feat_only.npy" in line and "'features'" in line and ".npz" in line
    assert not (tmp_path / "k.safetensors").exists()


def test_score_predict_and_csv_are_read_back_by_ebood(files, tmp_path):
    """Every format takes every result: the structured .npy of --predict is read back by name."""
    det = ebood.detectors.create("energy").calibrate(ebood.Outputs(logits=np.load(files / "z.npy")), tpr=0.9)
    det.save(tmp_path / "e.safetensors")
    res = RUNNER.invoke(app, ["score", "--detector", str(tmp_path / "e.safetensors"), str(files / "z.npy"), "--predict", "-o", str(tmp_path / "p.npy")])
    assert res.exit_code == 0, res.output
    back = ebood.io.read_arrays(tmp_path / "p.npy")
    assert set(back) == {"energy", "is_ood"}
    assert np.array_equal(back["is_ood"].astype(bool), back["energy"] > det.threshold_)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_writer_failing_in_its_own_words_is_one_line(files, tmp_path, monkeypatch, suffix):
    """safetensors and torch.save fail with SafetensorError / torch's inline_container.cc text."""
    import safetensors.numpy
    import torch

    if suffix == ".safetensors":
        from safetensors import SafetensorError

        def broken(*a, **k):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

        monkeypatch.setattr(safetensors.numpy, "save_file", broken)
        expected = "no space left on the device: free some space or write elsewhere"
    else:
        def broken(*a, **k):
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

        monkeypatch.setattr(torch, "save", broken)
        expected = "the write failed part-way: check the free space and that the folder is still there"
    line = one_error_line(RUNNER.invoke(app, ["score", f"{files}/z.npy", "-o", str(tmp_path / f"s{suffix}")]))
    assert line == f"ebood: error: {tmp_path / f's{suffix}'}: cannot write: {expected}"
    assert list(tmp_path.iterdir()) == []

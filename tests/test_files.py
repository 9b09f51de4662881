"""Files ebood writes: atomic (unique temporary name, then rename), nothing left on failure, the
usual mode, a cache that survives concurrent users and unwritable folders; reading inputs once."""

import errno
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run
from scipy.special import logsumexp

import ebood
from ebood import io

SUFFIXES = (".npy", ".npz", ".pt", ".safetensors", ".parquet", ".csv")


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# ----- the shared helper ---------------------------------------------------------------------------


def test_atomic_path_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(io.FileWriteError, match="no space left"):
        with io.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"old"
    assert listing(tmp_path) == {"out.bin"}


def test_atomic_path_gives_every_writer_its_own_temporary(tmp_path):
    target = tmp_path / "entry.bin"
    with io.atomic_path(target) as first, io.atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first"  # renamed last: the outer block finished last
    assert listing(tmp_path) == {"entry.bin"}


def test_atomic_path_onto_a_directory_is_a_write_error(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(io.FileWriteError, match="is a directory"):
        io.atomic_write_bytes(tmp_path / "d", b"x")
    assert listing(tmp_path) == {"d"}


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_write_arrays_uses_the_umask_mode(tmp_path, umask_022, suffix):
    path = io.write_arrays(tmp_path / f"s{suffix}", {"energy": np.arange(4, dtype=np.float32)})
    assert path.stat().st_mode & 0o777 == 0o644


def test_saved_state_bench_results_and_checkpoints_use_the_umask_mode(tmp_path, umask_022):
    from ebood.bench.results import BenchResult
    from ebood.train.checkpoint import save_checkpoint

    det = ebood.detectors.create("knn", k=1).fit(ebood.Outputs(features=np.eye(3, dtype=np.float32)))
    assert det.save(tmp_path / "knn.safetensors").stat().st_mode & 0o777 == 0o644
    out = BenchResult("b", rows=[], scores={"m/energy/id_test": torch.zeros(3)}).save(tmp_path / "res")
    for name in ("scores.safetensors", "results.csv", "results.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    folder = save_checkpoint(tmp_path / "ck", 1, model, opt, {}, {"cpu": torch.get_rng_state()}, {"epoch": 1, "step": 1})
    assert folder.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in folder.iterdir())
    assert listing(tmp_path / "ck") == {"epoch-001", *(f"epoch-001/{p.name}" for p in folder.iterdir())}


def test_extract_output_uses_the_umask_mode(tmp_path, umask_022):
    x = np.random.default_rng(0).random((6, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", inputs=x)
    res = run("extract", "-m", "digits_cnn", "-d", tmp_path / "x.npz", "-o", tmp_path / "o.safetensors", "--no-progress")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o.safetensors").stat().st_mode & 0o777 == 0o644


# ----- write_arrays --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_failed_write_keeps_the_existing_output(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"s{suffix}"
    io.write_arrays(path, {"energy": np.arange(5, dtype=np.float32)})
    before = path.read_bytes()
    real_replace = os.replace

    def full_disk(src, dst):  # the data went out, the final step fails as on a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(io.FileWriteError, match=r"s\.\w+: cannot write: no space left"):
        io.write_arrays(path, {"energy": np.zeros(1000, dtype=np.float32)})
    monkeypatch.setattr(os, "replace", real_replace)
    assert path.read_bytes() == before
    assert listing(tmp_path) == {path.name}


def test_a_writer_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    def truncated(file, arr, **kwargs):
        file.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", truncated)
    with pytest.raises(io.FileWriteError, match="no space left"):
        io.write_arrays(tmp_path / "s.npy", {"energy": np.zeros(3)})
    assert listing(tmp_path) == set()


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_every_format_takes_several_results(tmp_path, suffix):
    rng = np.random.default_rng(0)
    results = {"energy": rng.normal(size=7).astype(np.float32), "is_ood": (rng.random(7) > 0.5).astype(np.int8),
               "logits": rng.normal(size=(7, 3))}
    path = io.write_arrays(tmp_path / f"r{suffix}", results)
    back = io.read_arrays(path)
    assert set(back) == set(results)
    for k, v in results.items():
        np.testing.assert_allclose(np.asarray(back[k], dtype=np.float64), v.astype(np.float64), rtol=1e-7)


def test_csv_has_a_header(tmp_path):
    io.write_arrays(tmp_path / "s.csv", {"energy": np.array([1.5, -2.0])})
    assert (tmp_path / "s.csv").read_text().splitlines() == ["energy", "1.5", "-2"]
    io.write_arrays(tmp_path / "z.csv", {"logits": np.array([[1.0, 2.0], [3.0, 4.0]])})
    assert (tmp_path / "z.csv").read_text().splitlines()[0] == "logits[0],logits[1]"


def test_headerless_csv_is_still_read(tmp_path):
    (tmp_path / "z.csv").write_text("1,2,3\n4,5,6\n")
    np.testing.assert_array_equal(io.read_array(tmp_path / "z.csv"), [[1, 2, 3], [4, 5, 6]])


def test_several_arrays_of_different_lengths_in_a_table_format_are_refused_before_writing(tmp_path):
    with pytest.raises(io.ArrayFileError, match="one row per sample.*npz"):
        io.write_arrays(tmp_path / "s.csv", {"a": np.zeros(3), "b": np.zeros(4)})
    assert listing(tmp_path) == set()


# ----- reading -------------------------------------------------------------------------------------


def test_big_endian_npy_and_npz_are_converted(tmp_path):
    z = np.random.default_rng(1).normal(size=(20, 5)).astype(">f4")
    np.save(tmp_path / "z.npy", z)
    np.savez(tmp_path / "z.npz", logits=z)
    expected = -logsumexp(z.astype(np.float64), axis=1)
    for name in ("z.npy", "z.npz"):
        res = run("score", tmp_path / name, "-o", tmp_path / "s.npy")
        assert res.exit_code == 0, res.output
        np.testing.assert_allclose(np.load(tmp_path / "s.npy"), expected, rtol=1e-6)


def test_score_reads_its_input_once_memory_mapped(tmp_path, monkeypatch):
    z = np.random.default_rng(2).normal(size=(30, 4)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    reads, loads = [], []
    real_read, real_load = io.read_arrays, np.load
    monkeypatch.setattr(io, "read_arrays", lambda p: reads.append(p) or real_read(p))
    monkeypatch.setattr(np, "load", lambda *a, **kw: loads.append(kw.get("mmap_mode")) or real_load(*a, **kw))
    res = run("score", tmp_path / "z.npy", "-o", tmp_path / "s.npy")
    assert res.exit_code == 0, res.output
    assert len(reads) == 1 and loads == ["c"]
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), -logsumexp(z.astype(np.float64), axis=1), rtol=1e-6)


def test_a_text_file_named_npy_is_not_a_npy_file(tmp_path):
    (tmp_path / "z.npy").write_text("1,2,3\n")
    res = run("score", tmp_path / "z.npy", "-o", tmp_path / "s.npy")
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "z.npy: not a .npy file" in res.output and "allow_pickle" not in res.output


# ----- the CLI's outputs -----------------------------------------------------------------------------


def test_score_predict_to_npy_and_all_to_csv(tmp_path):
    rng = np.random.default_rng(3)
    z = rng.normal(scale=3, size=(40, 5)).astype(np.float32)
    np.savez(tmp_path / "train.npz", logits=z[:30])
    np.savez(tmp_path / "test.npz", logits=z[30:])
    assert run("fit", "energy", tmp_path / "train.npz", "--calibrate", tmp_path / "train.npz", "-o", tmp_path / "e.st").exit_code == 0
    res = run("score", "--detector", tmp_path / "e.st", tmp_path / "test.npz", "--predict", "-o", tmp_path / "p.npy")
    assert res.exit_code == 0, res.output
    got = np.load(tmp_path / "p.npy")
    energy = -logsumexp(z[30:].astype(np.float64), axis=1)
    np.testing.assert_allclose(got["energy"], energy, rtol=1e-6)
    threshold = ebood.detectors.load(tmp_path / "e.st").threshold_
    assert np.array_equal(got["is_ood"].astype(bool), got["energy"] > threshold)
    res = run("score", tmp_path / "test.npz", "--score", "all", "-o", tmp_path / "s.csv")
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "energy,msp,max_logit,entropy,prediction" and len(lines) == 11
    table = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(table[:, 0], energy, rtol=1e-6)
    np.testing.assert_array_equal(table[:, 4], z[30:].argmax(axis=1))
    res = run("evaluate", "--id", tmp_path / "s.csv", "--ood", tmp_path / "s.csv", "--key", "energy", "--json")
    assert res.exit_code == 0, res.output


def test_fit_into_an_existing_directory_leaves_nothing(tmp_path):
    np.savez(tmp_path / "train.npz", features=np.eye(4, dtype=np.float32))
    (tmp_path / "out").mkdir()
    before = listing(tmp_path)
    res = run("fit", "knn", tmp_path / "train.npz", "-o", tmp_path / "out")
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "out: cannot write: it is a directory" in res.output
    assert listing(tmp_path) == before


def test_failed_detector_save_leaves_the_previous_file(tmp_path, monkeypatch):
    det = ebood.detectors.create("knn", k=1).fit(ebood.Outputs(features=np.eye(3, dtype=np.float32)))
    path = det.save(tmp_path / "knn.safetensors")
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(io.FileWriteError, match="read-only"):
        det.save(path)
    assert path.read_bytes() == before and listing(tmp_path) == {"knn.safetensors"}


# ----- checkpoints -----------------------------------------------------------------------------------


def test_concurrent_checkpoint_saves_of_one_epoch_both_succeed(tmp_path):
    from ebood.train.checkpoint import load_checkpoint, save_checkpoint

    errors = []

    def save(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(64, 64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            for _ in range(10):
                save_checkpoint(tmp_path, 3, model, opt, {}, {"cpu": torch.get_rng_state()}, {"epoch": 3, "step": seed})
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert load_checkpoint(tmp_path).step in (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-003"]


# ----- the extraction cache --------------------------------------------------------------------------

_EXTRACT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np, torch
    import ebood

    cache, go, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10))
    x = torch.randn(1024, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    Path(out + ".ready").touch()
    while not go.exists():
        time.sleep(0.01)
    o = ebood.extract(model, x, layers=["2"], cache=cache, progress=False, batch_size=256)
    np.savez(out, logits=o.logits.numpy(), features=o.features["2"].numpy())
""")


@pytest.mark.slow
def test_processes_extracting_into_one_cache_at_once_all_succeed(tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(_EXTRACT)
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(Path(ebood.__file__).parents[1]), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(cache), str(go), str(tmp_path / f"o{i}.npz")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"o{i}.npz.ready").exists() for i in range(3)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # all three start their forward pass at once
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    first = np.load(tmp_path / "o0.npz")
    for i in (1, 2):
        other = np.load(tmp_path / f"o{i}.npz")
        np.testing.assert_array_equal(first["logits"], other["logits"])
        np.testing.assert_array_equal(first["features"], other["features"])
    entries = sorted(os.listdir(cache))
    assert len(entries) == 1 and entries[0].endswith(".safetensors"), entries  # no temporary left


def _small_extract(cache):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.randn(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return model, x, ebood.extract(model, x, cache=cache, progress=False)


def test_an_unwritable_cache_warns_once_and_returns_the_outputs(tmp_path):
    (tmp_path / "file").write_text("in the way")
    cache = tmp_path / "file" / "cache"
    with pytest.warns(RuntimeWarning, match="extraction cache not written") as caught:
        model, x, out = _small_extract(cache)
        again = ebood.extract(model, x, cache=cache, progress=False)
    assert sum("cache not written" in str(w.message) for w in caught) == 1
    reference = model(x).detach()
    torch.testing.assert_close(out.logits, reference)
    torch.testing.assert_close(again.logits, reference)


def test_a_cache_that_fails_to_rename_warns_and_returns_the_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.warns(RuntimeWarning, match="no space left"):
        model, x, out = _small_extract(tmp_path / "cache")
    torch.testing.assert_close(out.logits, model(x).detach())
    assert listing(tmp_path / "cache") == set()

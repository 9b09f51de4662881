"""ebood.distributed on a local Ray instance: fits, scores and metrics equal single-process ebood
on the same rows; bad partitions fail naming the file and rows; nothing partial is written.

References are single-process ebood (itself tested against independent formulas), numpy brute
force for the nearest-neighbour distances, and ebood.metrics for the metrics (sklearn-equal).
"""

import logging
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import ebood  # noqa: E402
from ebood import detectors, metrics  # noqa: E402

dist = pytest.importorskip("ebood.distributed")

STREAMING = ["dice", "fdbd", "kl_matching", "knn", "mahalanobis", "nnguide", "relative_mahalanobis", "relu", "residual", "she", "vim"]
SMALL = {"vim": {"dim": 4}, "residual": {"dim": 4}, "knn": {"k": 5}, "nnguide": {"k": 7}}
N_FILES, ROWS, D, C = 5, 120, 8, 4


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    yield
    ray.shutdown()


# ----- data ---------------------------------------------------------------------------------------


def make_outputs(seed: int, n: int, shift: float = 0.0, dtype=np.float64) -> ebood.Outputs:
    """Class-structured correlated Gaussian features, a fixed head, logits = head(features)."""
    rng = np.random.default_rng(seed)
    means = 1.5 * np.random.default_rng(100).normal(size=(C, D)) + 1.0
    mix = np.random.default_rng(101).normal(size=(D, D)) / math.sqrt(D) + 0.5 * np.eye(D)
    labels = np.arange(n) % C
    x = means[labels] + rng.normal(size=(n, D)) @ mix.T + shift
    w = np.random.default_rng(102).normal(size=(C, D)) / math.sqrt(D) + (means - means.mean(0)) / 3
    b = 0.3 * np.random.default_rng(103).normal(size=C)
    head = ebood.Head(w.astype(dtype), b.astype(dtype))
    x = x.astype(dtype)
    return ebood.Outputs(logits=head(torch.from_numpy(x)), features=x, labels=labels, head=head)


def list_column(a: np.ndarray, fixed: bool) -> pa.Array:
    values = pa.array(np.ascontiguousarray(a).reshape(-1))
    if fixed:
        return pa.FixedSizeListArray.from_arrays(values, a.shape[1])
    return pa.ListArray.from_arrays(pa.array(np.arange(0, a.size + 1, a.shape[1], dtype=np.int32)), values)


def write_parts(directory: Path, outputs: ebood.Outputs, parts: int, start_id: int = 0) -> list[str]:
    """``parts`` Parquet files (fixed-size and variable list columns alternate), with an id key."""
    directory.mkdir(parents=True, exist_ok=True)
    n = len(outputs)
    bounds = np.linspace(0, n, parts + 1).astype(int)
    files = []
    for i in range(parts):
        s = slice(bounds[i], bounds[i + 1])
        table = pa.table(
            {
                "id": np.arange(start_id, start_id + n)[s],
                "logits": list_column(outputs.logits.numpy()[s], fixed=i % 2 == 0),
                "features": list_column(outputs.features.numpy()[s], fixed=i % 2 == 1),
                "labels": outputs.labels.numpy()[s],
            }
        )
        path = directory / f"part-{i:02d}.parquet"
        pq.write_table(table, path, row_group_size=50)
        files.append(str(path))
    return files


TRAIN = make_outputs(0, N_FILES * ROWS)
HEAD = TRAIN.head
_X = np.concatenate([make_outputs(1, 60).features.numpy(), 0.5 * make_outputs(2, 60).features.numpy() + 2 * np.random.default_rng(3).normal(size=(60, D))])
TEST = ebood.Outputs(logits=HEAD(torch.from_numpy(_X)), features=_X, labels=np.arange(len(_X)) % C, head=HEAD)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train")
    write_parts(d, TRAIN, N_FILES)
    return d


@pytest.fixture(scope="module")
def test_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("test")
    write_parts(d, TEST, 3, start_id=1000)
    return d


def single(name: str) -> detectors.Detector:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return detectors.create(name, **SMALL.get(name, {})).fit(TRAIN)


def scores_of(det, outputs=TEST) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return det.score(outputs).numpy()


def read_dir(path: Path, key: str = "id") -> pa.Table:
    return pq.read_table(path).sort_by(key)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".ebood-tmp-" in p.name or ".ebood-old-" in p.name]


# ----- package --------------------------------------------------------------------------------------


def test_import_ebood_does_not_import_ray():
    code = "import sys, ebood, ebood.detectors, ebood.io; assert 'ray' not in sys.modules, 'ray imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_mergeable_lists_the_streaming_detectors():
    assert dist.mergeable() == sorted(STREAMING)


# ----- fit ------------------------------------------------------------------------------------------


def assert_same_state(got, ref) -> None:
    """Counts exactly, float statistics to 1e-9 relative (the bank's row order may differ)."""
    mine, theirs = got._learned(), ref._learned()
    assert set(mine) == set(theirs)
    for key, want in theirs.items():
        have = mine[key]
        if key == "bank_":
            order = lambda t: t[np.lexsort(t.numpy().T[::-1])]  # noqa: E731
            torch.testing.assert_close(order(have), order(want), rtol=1e-12, atol=0)
        elif isinstance(want, torch.Tensor):
            assert have.dtype == want.dtype and have.shape == want.shape, key
            if not want.is_floating_point() or "count" in key:
                assert torch.equal(have, want), key
            else:
                scale = float(want.abs().max()) if want.numel() else 1.0
                torch.testing.assert_close(have, want, rtol=1e-9, atol=1e-9 * scale, msg=key)
        elif isinstance(want, float):
            assert have == pytest.approx(want, rel=1e-9), key
        else:
            assert have == want, key


@pytest.mark.parametrize("name", STREAMING)
def test_fit_equals_single_process(name, train_dir):
    det = detectors.create(name, **SMALL.get(name, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = dist.fit(det, train_dir, head=HEAD, fanout=2, sharded_knn=False)  # 5 blocks: 3 merge rounds
    ref = single(name)
    assert type(got) is type(ref) and got.get_params() == ref.get_params()
    np.testing.assert_allclose(scores_of(got), scores_of(ref), rtol=1e-9, atol=1e-9)
    got._ensure_final(), ref._ensure_final()
    assert_same_state(got, ref)


def test_fit_ray_dataset_with_many_blocks():
    """A Ray Dataset (not Parquet paths): 7 blocks, merged two at a time."""
    table = pa.table({"features": list_column(TRAIN.features.numpy(), True), "labels": TRAIN.labels.numpy(), "logits": list_column(TRAIN.logits.numpy(), False)})
    ds = ray.data.from_arrow(table).repartition(7)
    got = dist.fit("mahalanobis", ds, fanout=2)
    ref = single("mahalanobis")
    assert torch.equal(got.class_counts_, ref.class_counts_)
    np.testing.assert_allclose(scores_of(got), scores_of(ref), rtol=1e-9)
    small = dist.fit("relative_mahalanobis", ds, batch_size=150, fanout=3)  # batches smaller than blocks
    assert_same_state(small, single("relative_mahalanobis"))
    with pytest.raises(ValueError, match="fanout must be >= 2"):
        dist.fit("mahalanobis", ds, fanout=1)


def test_fit_maps_fields_to_other_columns(tmp_path):
    x = TRAIN.features.numpy()
    table = pa.table({**{f"f{j}": x[:, j] for j in range(D)}, "y": TRAIN.labels.numpy()})
    pq.write_table(table, tmp_path / "wide.parquet")
    got = dist.fit("mahalanobis", tmp_path / "wide.parquet", columns={"features": [f"f{j}" for j in range(D)], "labels": "y"})
    ref = detectors.create("mahalanobis").fit(ebood.Outputs(features=x, labels=TRAIN.labels))
    np.testing.assert_allclose(scores_of(got), scores_of(ref), rtol=1e-9)


def test_parquet_paths_files_directories_globs(train_dir, tmp_path):
    files = sorted(str(p) for p in train_dir.glob("*.parquet"))
    (train_dir / "_SUCCESS").write_text("")  # markers and hidden files are not data
    assert dist.parquet_files(train_dir) == files
    assert dist.parquet_files(str(train_dir / "part-0[12].parquet")) == files[1:3]
    assert dist.parquet_files([files[3], train_dir / "part-00.parquet"]) == [files[3], files[0]]
    with pytest.raises(FileNotFoundError, match="no such file"):
        dist.parquet_files(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no file or directory matches"):
        dist.parquet_files(str(tmp_path / "nothing-*"))
    with pytest.raises(FileNotFoundError, match="holds no .parquet files"):
        dist.parquet_files(tmp_path)


def test_fit_refuses_detectors_that_are_not_sums():
    with pytest.raises(TypeError, match="cannot be fitted across a cluster.*mahalanobis"):
        dist.fit("react", "unused.parquet")
    energy = detectors.create("energy")
    assert dist.fit(energy, "unused.parquet") is energy  # nothing to fit


def test_fit_missing_column_is_a_clear_error(train_dir):
    with pytest.raises(ValueError, match="no column 'feats'.*its columns are: id, logits, features, labels"):
        dist.fit("mahalanobis", train_dir, columns={"features": "feats"})


# ----- KNN --------------------------------------------------------------------------------------------


def brute_kth(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    z = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    d = np.linalg.norm(q[:, None, :] - z[None, :, :], axis=2)
    return np.sort(d, axis=1)[:, k - 1]


def test_k_smallest_distances_against_brute_force():
    from ebood.distributed._knn import k_smallest_distances

    rng = np.random.default_rng(5)
    bank = rng.normal(size=(300, D))
    bank[100:110] = bank[0]  # exact duplicates: ties at rank k
    # near-duplicates of bank[1] closer than float64 similarities can tell apart: only exact
    # distances over every row within the rounding margin find the true k nearest
    steps = rng.normal(size=(30, D))
    bank[200:230] = bank[1] + np.arange(1, 31)[:, None] * 1e-9 * steps / np.linalg.norm(steps, axis=1, keepdims=True)
    q = np.concatenate([bank[:5] + 1e-9, bank[1:2], rng.normal(size=(20, D))])
    norm = lambda a: torch.from_numpy(a / np.linalg.norm(a, axis=1, keepdims=True))  # noqa: E731
    for k in (1, 5, 12, 300):
        got = k_smallest_distances(norm(q), norm(bank), k).numpy()
        want = np.sort(np.linalg.norm(norm(q).numpy()[:, None] - norm(bank).numpy()[None], axis=2), axis=1)[:, :k]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_sharded_knn_equals_single_process(train_dir, test_dir, tmp_path):
    knn = dist.fit(detectors.create("knn", k=5), train_dir)
    assert isinstance(knn, dist.ShardedKNN)
    assert len(knn.shards) == N_FILES and knn.bank_size == N_FILES * ROWS
    ref = single("knn")
    want = scores_of(ref)
    np.testing.assert_allclose(scores_of(knn), want, rtol=1e-12)
    np.testing.assert_allclose(want, brute_kth(TEST.features.numpy(), TRAIN.features.numpy(), 5), rtol=1e-9)
    out = read_dir(dist.score(knn, test_dir, output=tmp_path / "knn"))
    np.testing.assert_allclose(out["knn"].to_numpy(), want, rtol=1e-12)
    gathered = knn.gather()
    np.testing.assert_allclose(scores_of(gathered), want, rtol=1e-12)


def test_sharded_knn_ties_across_shards_and_float32(tmp_path):
    """The k nearest split over shards, with exact duplicates in different shards; float32."""
    rng = np.random.default_rng(7)
    bank = rng.normal(size=(90, D)).astype(np.float32)
    bank[30:33] = bank[0]
    bank[60:63] = bank[0]
    for i, s in enumerate((slice(0, 30), slice(30, 60), slice(60, 90))):
        pq.write_table(pa.table({"features": list_column(bank[s], False)}), tmp_path / f"b{i}.parquet")
    q = np.concatenate([bank[:3], rng.normal(size=(30, D)).astype(np.float32)])
    knn = dist.fit(detectors.create("knn", k=6), tmp_path)
    ref = detectors.create("knn", k=6).fit(ebood.Outputs(features=bank))
    got, want = scores_of(knn, ebood.Outputs(features=q)), scores_of(ref, ebood.Outputs(features=q))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, brute_kth(q.astype(np.float64), bank.astype(np.float64), 6), rtol=1e-5, atol=1e-6)


def test_knn_k_larger_than_bank(tmp_path):
    pq.write_table(pa.table({"features": list_column(np.ones((3, D)), True)}), tmp_path / "tiny.parquet")
    with pytest.raises(ValueError, match="k=5 is larger than the bank of 3"):
        dist.fit(detectors.create("knn", k=5), tmp_path)


# ----- score ------------------------------------------------------------------------------------------


def test_score_logits_keeps_keys(test_dir, tmp_path):
    out = dist.score("energy", test_dir, output=tmp_path / "scores", batch_size=7)  # several batches per block
    assert (out / "_SUCCESS").exists() and not leftovers(tmp_path)
    table = read_dir(out)
    assert table.column_names == ["id", "labels", "energy"]  # keys, no list columns, no decision
    assert table["id"].to_pylist() == list(range(1000, 1000 + len(TEST)))
    want = ebood.scores.energy(TEST.logits).numpy()
    np.testing.assert_allclose(table["energy"].to_numpy(), want, rtol=1e-12)


def test_score_calibrated_detector_writes_decision(train_dir, test_dir, tmp_path):
    det = dist.fit("mahalanobis", train_dir)
    det.calibrate(ebood.Outputs(features=make_outputs(9, 200).features), tpr=0.9)
    table = read_dir(dist.score(det, test_dir, output=tmp_path / "m", keys=["id"]))
    assert table.column_names == ["id", "mahalanobis", "is_ood"]
    want = scores_of(single("mahalanobis"))
    np.testing.assert_allclose(table["mahalanobis"].to_numpy(), want, rtol=1e-9)
    np.testing.assert_array_equal(table["is_ood"].to_numpy(), table["mahalanobis"].to_numpy() > det.threshold_)
    assert table["is_ood"].to_numpy().any() and not table["is_ood"].to_numpy().all()


def test_score_dataset_lazily(test_dir):
    ds = dist.score("msp", ray.data.read_parquet(str(test_dir)), keys=["id"])
    table = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("id")
    np.testing.assert_allclose(table["msp"].to_numpy(), ebood.scores.msp(TEST.logits).numpy(), rtol=1e-12)


def test_score_ray_tensor_column():
    """ray.data.from_numpy of a 2-D array gives a tensor column, mapped with columns=."""
    ds = ray.data.from_numpy(TEST.features.numpy())
    knn = single("knn")
    table = pa.concat_tables(ray.get(dist.score(knn, ds, columns={"features": "data"}).to_arrow_refs()))
    assert table.column_names == ["knn"]
    np.testing.assert_allclose(np.sort(table["knn"].to_numpy()), np.sort(scores_of(knn)), rtol=1e-12)


def test_score_refuses_existing_output(test_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        dist.score("energy", test_dir, output=tmp_path / "out")


# ----- bad partitions ---------------------------------------------------------------------------------


def corrupt_copy(src: Path, dst: Path, file_index: int, column: str, rows: slice, how: str) -> str:
    """Copy the Parquet files of ``src``; in one of them, give ``rows`` of ``column`` NaN or an extra value."""
    dst.mkdir()
    bad_name = ""
    for i, f in enumerate(sorted(src.glob("*.parquet"))):
        table = pq.read_table(f)
        if i == file_index:
            a = np.stack(table[column].to_numpy(zero_copy_only=False))
            values = [list(r) for r in a]
            for r in range(rows.start, rows.stop):
                values[r] = [math.nan] * a.shape[1] if how == "nan" else list(a[r]) + [0.0]
            table = table.set_column(table.column_names.index(column), column, pa.array(values))
            bad_name = str(dst / f.name)
        pq.write_table(table, dst / f.name, row_group_size=50)
    return bad_name


def test_nan_partition_fails_fit_naming_file_and_rows(train_dir, tmp_path):
    bad = corrupt_copy(train_dir, tmp_path / "nan", 3, "features", slice(57, 61), "nan")
    with pytest.raises(dist.PartitionError) as info:
        dist.fit("mahalanobis", tmp_path / "nan")
    msg = str(info.value)
    assert f"{bad}: rows 57..60 (4 rows)" in msg and "NaN" in msg
    assert "\n" not in msg and "Traceback" not in msg


def test_wrong_width_fails_score_and_writes_nothing(test_dir, tmp_path):
    bad = corrupt_copy(test_dir, tmp_path / "wide", 1, "logits", slice(10, 13), "width")
    with pytest.raises(dist.PartitionError) as info:
        dist.score("energy", tmp_path / "wide", output=tmp_path / "out")
    assert f"{bad}: rows 10..12 (3 rows)" in str(info.value)
    assert "length 5, expected length 4" in str(info.value)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_failed_overwrite_keeps_the_old_output(test_dir, tmp_path):
    old = dist.score("energy", test_dir, output=tmp_path / "out")
    before = read_dir(old)
    corrupt_copy(test_dir, tmp_path / "nan", 2, "logits", slice(0, 1), "nan")
    with pytest.raises(dist.PartitionError, match="rows 0..0"):
        dist.score("energy", tmp_path / "nan", output=tmp_path / "out", overwrite=True)
    assert read_dir(tmp_path / "out").equals(before) and not leftovers(tmp_path)


def test_detector_dimension_mismatch_names_the_file(test_dir, tmp_path):
    det = detectors.create("mahalanobis").fit(ebood.Outputs(features=np.random.default_rng(0).normal(size=(50, D + 1)), labels=np.arange(50) % 2))
    with pytest.raises(dist.PartitionError, match=r"part-00.parquet: rows 0\.\.39 .*dimension 8.*fitted on dimension 9"):
        dist.score(det, test_dir, output=tmp_path / "o")


class _DieOnce(detectors.Detector):
    """Energy, but the first call in the cluster kills its worker process (a lost task)."""

    name = ""
    needs_fit = False

    def __init__(self, marker: str = "") -> None:
        self.marker = marker

    def score(self, outputs):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text("died")
            os._exit(1)
        return ebood.scores.energy(outputs.logits)


def test_lost_task_is_retried(test_dir, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        det = _DieOnce(str(tmp_path / "marker"))
        det.name = "energy"
        table = read_dir(dist.score(det, test_dir, output=tmp_path / "out"))
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (tmp_path / "marker").read_text() == "died"
    np.testing.assert_allclose(table["energy"].to_numpy(), ebood.scores.energy(TEST.logits).numpy(), rtol=1e-12)


# ----- metrics ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_scores(tmp_path_factory):
    """ID and OOD scores rounded to one decimal (many ties, also across files), in Parquet parts."""
    rng = np.random.default_rng(11)
    id_s, ood_s = np.round(rng.normal(0, 1, 700), 1), np.round(rng.normal(0.8, 1, 500), 1)
    id_s[:5] = -0.0  # -0.0 ties with 0.0
    root = tmp_path_factory.mktemp("scores")
    for name, s in (("id", id_s), ("ood", ood_s)):
        (root / name).mkdir()
        for i, part in enumerate(np.array_split(s, 4)):
            pq.write_table(pa.table({"key": np.arange(part.size), "energy": part}), root / name / f"s{i}.parquet")
    return root, id_s, ood_s


@pytest.mark.parametrize("tpr,positive", [(0.95, "id"), (0.3, "ood")])
def test_evaluate_equals_metrics_with_ties(tied_scores, tpr, positive):
    root, id_s, ood_s = tied_scores
    got = dist.evaluate(root / "id", root / "ood", column="energy", tpr=tpr, positive=positive)
    want = metrics.evaluate(id_s, ood_s, tpr=tpr, positive=positive)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15), k


def test_metrics_from_sorted_blocks_with_values_cut_between_blocks():
    """The driver's merge of sorted blocks, without Ray: runs of equal scores cut at random places
    (a value spread over three blocks, empty blocks), against ebood.metrics."""
    from ebood.distributed._metrics import from_sorted_blocks

    rng = np.random.default_rng(1)
    for trial in range(120):
        a = np.round(rng.normal(size=rng.integers(1, 60)), int(rng.integers(0, 2)))
        b = np.round(rng.normal(size=rng.integers(1, 60)) + 0.5, int(rng.integers(0, 2)))
        v, o = np.concatenate([a, b]), np.r_[np.zeros(a.size), np.ones(b.size)].astype(np.int64)
        order = np.argsort(v, kind="stable")
        v, o = v[order], o[order]
        cuts = np.unique(np.r_[0, rng.integers(0, v.size + 1, size=rng.integers(0, 8)), v.size])
        blocks = [pa.table({"score": v[s:e], "n_id": 1 - o[s:e], "n_ood": o[s:e]}) for s, e in zip(cuts[:-1], cuts[1:])]
        blocks.insert(int(rng.integers(0, len(blocks) + 1)), blocks[0].slice(0, 0))
        for tpr, positive in ((0.95, "id"), (0.5, "ood"), (1.0, "id"), (0.3, "id")):
            got, want = from_sorted_blocks(blocks, tpr, positive), metrics.evaluate(a, b, tpr=tpr, positive=positive)
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15), (trial, k, tpr, positive)


def test_evaluate_ray_datasets_and_errors(tied_scores, tmp_path):
    _, id_s, ood_s = tied_scores
    id_ds = ray.data.from_numpy(id_s).rename_columns({"data": "s"}).repartition(3)
    ood_ds = ray.data.from_numpy(ood_s).rename_columns({"data": "s"})
    strategy = id_ds.context.shuffle_strategy
    got = dist.evaluate(id_ds, ood_ds)
    want = metrics.evaluate(id_s, ood_s)
    assert got == pytest.approx(want, rel=1e-12)
    assert id_ds.context.shuffle_strategy == strategy  # the caller's datasets are left as they were
    pq.write_table(pa.table({"energy": np.array([0.1, np.nan, 0.3])}), tmp_path / "nan.parquet")
    with pytest.raises(dist.PartitionError, match=r"nan.parquet: rows 1\.\.1 .*NaN"):
        dist.evaluate(tmp_path / "nan.parquet", ood_ds.rename_columns({"s": "energy"}))
    pq.write_table(pa.table({"energy": np.array([0.1, 0.2, 0.3, -np.inf])}), tmp_path / "inf.parquet")
    with pytest.raises(dist.PartitionError, match=r"inf.parquet: rows 3\.\.3 .*infinite"):
        dist.evaluate(id_ds.rename_columns({"s": "energy"}), tmp_path / "inf.parquet")


# ----- CLI -----------------------------------------------------------------------------------------------


def test_bare_ray_flag():
    from ebood.cli._app import bare_ray_flag

    assert bare_ray_flag(["score", "in", "-o", "o", "--ray"]) == ["score", "in", "-o", "o", "--ray", "local"]
    assert bare_ray_flag(["score", "--ray", "in", "-o", "o"]) == ["score", "--ray", "local", "in", "-o", "o"]
    assert bare_ray_flag(["score", "--ray", "auto", "in"]) == ["score", "--ray", "auto", "in"]
    assert bare_ray_flag(["fit", "--ray", "ray://head:10001"]) == ["fit", "--ray", "ray://head:10001"]
    assert bare_ray_flag(["fit", "--ray", "10.0.0.1:6379", "x"]) == ["fit", "--ray", "10.0.0.1:6379", "x"]


def run_cli(*args: str):
    from typer.testing import CliRunner

    from ebood.cli import app, load_commands

    load_commands()
    return CliRunner().invoke(app, list(args))


def test_cli_fit_and_score_on_ray(train_dir, test_dir, tmp_path):
    np.savez(tmp_path / "head.npz", head_weight=HEAD.weight.numpy(), head_bias=HEAD.bias.numpy())
    r = run_cli("fit", "vim", str(train_dir), "-o", str(tmp_path / "vim.safetensors"), "-p", "dim=4", "--head", str(tmp_path / "head.npz"), "--ray", "local")
    assert r.exit_code == 0, r.output
    det = ebood.load(tmp_path / "vim.safetensors")
    np.testing.assert_allclose(scores_of(det), scores_of(single("vim")), rtol=1e-9)
    r = run_cli("fit", "knn", str(train_dir), "-o", str(tmp_path / "knn.safetensors"), "-p", "k=5", "--ray", "local")
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(scores_of(ebood.load(tmp_path / "knn.safetensors")), scores_of(single("knn")), rtol=1e-12)
    r = run_cli("score", str(test_dir), "-o", str(tmp_path / "s"), "--detector", str(tmp_path / "vim.safetensors"), "--head", str(tmp_path / "head.npz"), "--ray", "local")
    assert r.exit_code == 0, r.output
    table = read_dir(tmp_path / "s")
    assert table.column_names == ["id", "labels", "vim"]
    np.testing.assert_allclose(table["vim"].to_numpy(), scores_of(single("vim")), rtol=1e-9)
    r = run_cli("score", str(test_dir), "-o", str(tmp_path / "e"), "--score", "energy", "-T", "2", "--ray", "local")
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(read_dir(tmp_path / "e")["energy"].to_numpy(), ebood.scores.energy(TEST.logits, 2.0).numpy(), rtol=1e-12)


def test_cli_bad_partition_is_one_line(test_dir, tmp_path):
    bad = corrupt_copy(test_dir, tmp_path / "nan", 0, "logits", slice(3, 5), "nan")
    r = run_cli("score", str(tmp_path / "nan"), "-o", str(tmp_path / "s"), "--ray", "local")
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [f"ebood: error: {bad}: rows 3..4 (2 rows): logits hold NaN or infinite values"]
    assert not (tmp_path / "s").exists()
    r = run_cli("fit", "conjnorm", str(tmp_path / "nan"), "-o", str(tmp_path / "a.safetensors"), "--ray", "local")
    assert r.exit_code == 2 and "cannot be fitted across a cluster" in r.output


def test_cli_corrupt_parquet_file_is_one_line_naming_it(test_dir, tmp_path):
    shutil.copytree(test_dir, tmp_path / "in")
    bad = sorted((tmp_path / "in").glob("*.parquet"))[-1]
    data = bytearray(bad.read_bytes())
    for i in range(4, min(400, len(data) - 8)):  # the first page header and data; the footer stays readable
        data[i] ^= 0x5A
    bad.write_bytes(bytes(data))
    with pytest.raises(Exception):  # the reference: pyarrow itself cannot read it
        pq.read_table(bad)
    r = run_cli("score", str(tmp_path / "in"), "-o", str(tmp_path / "s"), "--ray", "local")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ebood: error: {bad}: cannot read"), r.output[-3000:]
    assert not (tmp_path / "s").exists()

"""The benchmark's cache of detector scores (ebood.bench.score_cache): reused only when nothing that
decides the scores changed, and a damaged entry is recomputed, never trusted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from ebood.bench import runner
from ebood.bench.config import DetectorSpec
from ebood.bench.results import BenchResult
from ebood.bench.runner import OODSet, evaluate_model
from ebood.bench.score_cache import code_digest, scores_key
from ebood.data.datasets import ArrayDataset

DETECTORS = [DetectorSpec("energy"), DetectorSpec("mahalanobis"), DetectorSpec("mc_dropout", {"passes": 3})]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3)).eval()


def _data(name: str, n: int, shift: float, seed: int, labelled: bool = True) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(shift, 1.0, size=(n, 6)).astype(np.float32)
    return ArrayDataset(x, rng.integers(0, 3, n) if labelled else None, name=name)


@pytest.fixture()
def sets():
    return {"train": _data("train", 300, 0.0, 1), "test": _data("test", 120, 0.0, 2),
            "ood": {"far": OODSet(_data("far", 80, 3.0, 3, labelled=False), "far")}}


def _evaluate(model, sets, cache, detectors=DETECTORS):
    result = BenchResult(benchmark="t")
    cached = evaluate_model(result, "m", model, id_train=sets["train"], id_test=sets["test"], ood_sets=sets["ood"],
                            detectors=detectors, seed=0, progress=False, score_cache=cache)
    return result, cached


def test_a_warm_evaluation_reads_the_scores_and_recomputes_the_metrics(sets, tmp_path, monkeypatch):
    cold, cached = _evaluate(_model(), sets, tmp_path)
    assert not cached and len(list(tmp_path.glob("*.safetensors"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the detectors ran again although their scores are cached")

    monkeypatch.setattr(runner, "evaluate_detectors", fail)
    warm, cached = _evaluate(_model(), sets, tmp_path)
    assert cached
    assert warm.rows == cold.rows and warm.models == cold.models
    for key, value in cold.scores.items():
        assert torch.equal(value, warm.scores[key]), key
    # the metrics are recomputed from the cached scores: the AUROC is scikit-learn's on them (higher = more OOD)
    for row in warm.rows:
        id_s = warm.scores[f"m/{row['detector']}/id_test"].double().numpy()
        ood_s = warm.scores[f"m/{row['detector']}/far"].double().numpy()
        expected = roc_auc_score(np.r_[np.zeros(id_s.size), np.ones(ood_s.size)], np.r_[id_s, ood_s])
        assert row["auroc"] == pytest.approx(expected, abs=1e-9)


def test_a_changed_model_detector_or_dataset_is_evaluated_again(sets, tmp_path):
    _evaluate(_model(), sets, tmp_path)
    _, cached = _evaluate(_model(seed=1), sets, tmp_path)
    assert not cached
    _, cached = _evaluate(_model(), sets, tmp_path, [DetectorSpec("energy", {"temperature": 2.0})])
    assert not cached
    other = {**sets, "ood": {"far": OODSet(_data("far", 80, 4.0, 3, labelled=False), "far")}}
    _, cached = _evaluate(_model(), other, tmp_path)
    assert not cached
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


def test_the_key_covers_model_data_detectors_seeds_and_settings(sets):
    model = _model()
    data = {"id_train": sets["train"], "id_test": sets["test"]}
    det = [("energy", {"name": "energy"})]
    key = scores_key(model, data, det, positive="id")
    assert key == scores_key(_model(), dict(data), list(det), positive="id")
    assert key != scores_key(_model(seed=3), data, det, positive="id")
    assert key != scores_key(model, {**data, "id_test": _data("test", 121, 0.0, 2)}, det, positive="id")
    assert key != scores_key(model, data, [("energy", {"name": "energy", "temperature": 2.0})], positive="id")
    assert key != scores_key(model, data, [("mc_dropout", {"name": "mc_dropout", "seed": 1})], positive="id")
    assert key != scores_key(model, data, det, positive="ood")
    assert len(code_digest()) == 32


def test_data_that_cannot_be_identified_cheaply_is_not_cached(sets, tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from zip(sets["test"].inputs, sets["test"].labels)

    assert scores_key(_model(), {"id_test": Stream()}, [("energy", {"name": "energy"})]) is None


def _flip_last_byte(data: bytes) -> bytes:  # inside the last tensor: the file still parses, its checksum fails
    return data[:-1] + bytes([data[-1] ^ 0x40])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "flipped"])
def test_a_damaged_entry_is_recomputed_and_rewritten(sets, tmp_path, damage):
    cold, _ = _evaluate(_model(), sets, tmp_path)
    (entry,) = tmp_path.glob("*.safetensors")
    data = entry.read_bytes()
    entry.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00not a safetensors file" * 10, "empty": b"",
                       "flipped": _flip_last_byte(data)}[damage])
    again, cached = _evaluate(_model(), sets, tmp_path)
    assert not cached and again.rows == cold.rows
    _, cached = _evaluate(_model(), sets, tmp_path)
    assert cached


def test_the_cache_folder_is_created_and_an_unwritable_one_only_warns(sets, tmp_path):
    _, cached = _evaluate(_model(), sets, tmp_path / "new" / "scores")
    assert not cached and len(list((tmp_path / "new" / "scores").glob("*.safetensors"))) == 1
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    with pytest.warns(RuntimeWarning, match="not cached"):
        result, cached = _evaluate(_model(), sets, blocked / "scores")
    reference, _ = _evaluate(_model(), sets, None)
    assert not cached and result.rows == reference.rows

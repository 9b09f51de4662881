"""``ebood bench fashion-mnist`` on the real data: the claims of the README's Fashion-MNIST section.

The benchmark runs once per test session (a session fixture with a temporary cache: training included)
and once more with the trained models cached but the outputs extracted and the detectors scored again. The tests check what the
README says of the results -- not fixed numbers. Skipped without Debian's dataset-fashion-mnist
(``.ci/run`` installs it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ebood.detectors import available
from ebood.metrics import fpr_at_tpr

DATA = Path("/usr/share/datasets/fashion-mnist")
pytestmark = [
    pytest.mark.fashion_mnist, pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "train-images-idx3-ubyte.gz").is_file(),
                       reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist"),
]


def _run(cache: Path):
    from ebood.bench.fashion_mnist import run_fashion_mnist

    return run_fashion_mnist(seed=0, cache_dir=cache, progress=False)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """The cold run, then a second run with the models from the cache and every output extracted and
    every detector fitted and scored again (the scores' cache is tested in test_bench_score_cache.py)."""
    cache = tmp_path_factory.mktemp("fashion-mnist-cache")
    first = _run(cache)
    shutil.rmtree(cache / "outputs")
    shutil.rmtree(cache / "scores")
    second = _run(cache)
    return first, second


@pytest.fixture(scope="session")
def result(runs):
    return runs[0]


def _row(result, model: str, detector: str, ood_set: str) -> dict:
    (row,) = [r for r in result.rows if (r["model"], r["detector"], r["ood_set"]) == (model, detector, ood_set)]
    return row


def _mean_fpr(result, model: str, detector: str) -> float:
    rows = [r for r in result.rows if r["model"] == model and r["detector"] == detector and r["group"] in ("near", "far")]
    assert rows
    return float(np.mean([r["fpr95"] for r in rows]))


def test_cnn_reaches_the_accuracy_floor(result):
    assert result.models["pretrained"]["id_accuracy"] >= 0.90
    assert result.models["openset"]["id_accuracy"] >= 0.90


def test_every_registered_detector_on_every_set(result):
    for model in ("pretrained", "openset"):
        assert {r["detector"] for r in result.rows if r["model"] == model} == set(available())
    sets = {r["ood_set"] for r in result.rows if r["model"] == "pretrained"}
    assert sets == {"mnist-like", "notmnist-like", "photos", "gaussian", "uniform", "rademacher", "corrupt-1", "corrupt-2", "corrupt-3"}
    assert {r["group"] for r in result.rows if r["ood_set"].startswith("corrupt")} == {"covariate"}
    assert {r["ood_set"] for r in result.rows if r["model"] == "openset"} == {"open-set"}
    assert "flower.jpg" in result.auxiliary_outliers and "STIX" in result.auxiliary_outliers


def test_metrics_agree_with_scikit_learn(result):
    for detector, ood_set in (("energy", "mnist-like"), ("knn", "gaussian"), ("msp", "corrupt-3")):
        id_s = result.scores[f"pretrained/{detector}/id_test"].double().numpy()
        ood_s = result.scores[f"pretrained/{detector}/{ood_set}"].double().numpy()
        y = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
        row = _row(result, "pretrained", detector, ood_set)
        assert row["auroc"] == pytest.approx(roc_auc_score(y, np.r_[id_s, ood_s]), abs=1e-9)
        # FPR95 by brute force: the smallest threshold keeping 95% of ID, OOD at or below it accepted
        t = np.sort(id_s)[int(np.ceil(0.95 * len(id_s))) - 1]
        assert row["fpr95"] == pytest.approx(float(np.mean(ood_s <= t)), abs=1e-12)
        assert row["fpr95"] == pytest.approx(float(fpr_at_tpr(id_s, ood_s)), abs=1e-12)


def test_energy_beats_msp_on_mnist_like_digits(result):
    assert _row(result, "pretrained", "energy", "mnist-like")["fpr95"] < _row(result, "pretrained", "msp", "mnist-like")["fpr95"]


def test_energy_finetuning_lowers_energy_fpr_at_little_accuracy_cost(result):
    assert _mean_fpr(result, "energy_finetuned", "energy") < _mean_fpr(result, "pretrained", "energy")
    acc = result.models
    assert abs(acc["energy_finetuned"]["id_accuracy"] - acc["pretrained"]["id_accuracy"]) <= 0.015


def _nan_as_none(rows: list) -> list:
    """Rows with NaN metrics (a detector that refused a set) made comparable: NaN != NaN."""
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()} for row in rows]


def _without_timings(models: dict) -> dict:
    """The models' results less the seconds spent training and fitting (wall time, not a result)."""
    return {name: {k: v for k, v in entry.items() if k not in ("training_seconds", "fit_seconds")}
            for name, entry in models.items()}


def test_second_run_gives_the_same_results(runs):
    first, second = runs
    assert _nan_as_none(first.rows) == _nan_as_none(second.rows)
    assert _without_timings(first.models) == _without_timings(second.models)
    assert set(first.scores) == set(second.scores)
    for key, value in first.scores.items():
        assert np.array_equal(value.numpy(), second.scores[key].numpy(), equal_nan=value.is_floating_point()), key
    assert second.timings["training"] == 0.0  # every model came from the cache

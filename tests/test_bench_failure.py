"""Failure detection in `ebood bench` and the report: rows against the saved scores and correctness,
the terminal table and the HTML section (docs/failure.md)."""

import csv
import json
import re

import numpy as np
import pytest
from rich.console import Console
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from ebood.bench.builtin import run_builtin
from ebood.bench.config import DetectorSpec
from ebood.bench.runner import failure_metrics
from ebood.report import failure_results_table, load_results, write_report

DETECTORS = [DetectorSpec("msp"), DetectorSpec("energy"), DetectorSpec("doctor")]


def brute_aurc(s, wrong):
    return float(np.mean([wrong[s <= t].mean() for t in s]))


def test_failure_metrics_against_sklearn_and_brute_force():
    import torch

    rng = np.random.default_rng(0)
    id_s = torch.tensor(rng.normal(size=300))
    ok = torch.tensor(rng.random(300) < 0.8)
    ood = {"a": torch.tensor(rng.normal(1, 1, 100)), "b": torch.tensor(np.round(rng.normal(0.5, 1, 80)))}
    got = failure_metrics(id_s, ok, ood)
    s, c = id_s.numpy(), ok.numpy()
    for name, o in ood.items():
        assert got[name]["misclf_auroc"] == pytest.approx(roc_auc_score(~c, s), abs=1e-12)
        assert got[name]["aurc"] == pytest.approx(brute_aurc(s, ~c), abs=1e-12)
        pooled = np.r_[s, o.numpy()]
        assert got[name]["failure_aurc"] == pytest.approx(brute_aurc(pooled, np.r_[~c, np.ones(o.numel(), bool)]), abs=1e-12)
    assert failure_metrics(id_s, None, ood) == {}
    assert failure_metrics(id_s, torch.ones(300, dtype=torch.bool), ood) == {}


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = run_builtin(seed=0, cache_dir=tmp_path_factory.mktemp("cache"), detectors=DETECTORS, finetuned=False, other_losses=False, progress=False)
    result.save(out)
    return out


def test_rows_are_the_failure_metrics_of_the_saved_scores(bench_dir):
    scores = load_file(str(bench_dir / "scores.safetensors"))
    doc = json.loads((bench_dir / "results.json").read_text())
    for model in ("pretrained", "openset"):
        ok = scores[f"{model}/id_correct"].numpy() > 0.5
        assert ok.mean() == pytest.approx(doc["models"][model]["id_accuracy"], abs=1e-12)
        rows = [r for r in doc["rows"] if r["model"] == model]
        assert {r["detector"] for r in rows} == {"msp", "energy", "doctor"}
        for row in rows:
            s = scores[f"{model}/{row['detector']}/id_test"].double().numpy()
            o = scores[f"{model}/{row['detector']}/{row['ood_set']}"].double().numpy()
            assert row["misclf_auroc"] == pytest.approx(roc_auc_score(~ok, s), abs=1e-6)
            assert row["aurc"] == pytest.approx(brute_aurc(s, ~ok), abs=1e-6)
            assert row["failure_aurc"] == pytest.approx(brute_aurc(np.r_[s, o], np.r_[~ok, np.ones(o.size, bool)]), abs=1e-6)
    with open(bench_dir / "results.csv") as f:
        first = next(csv.DictReader(f))
    assert float(first["aurc"]) == pytest.approx(doc["rows"][0]["aurc"], rel=1e-12)
    assert float(first["misclf_auroc"]) == pytest.approx(doc["rows"][0]["misclf_auroc"], rel=1e-12)


def test_terminal_table_shows_the_failure_columns(bench_dir):
    res = load_results(bench_dir)
    console = Console(width=200, record=True)
    console.print(failure_results_table(res))
    text = console.export_text()
    doc = json.loads((bench_dir / "results.json").read_text())
    row = next(r for r in doc["rows"] if r["model"] == "pretrained" and r["detector"] == "doctor")
    line = next(ln for ln in text.splitlines() if "doctor" in ln)
    assert f"{100 * row['misclf_auroc']:.2f}" in line and f"{100 * row['aurc']:.2f}" in line
    sets = [r["failure_aurc"] for r in doc["rows"] if r["model"] == "pretrained" and r["detector"] == "doctor" and r["group"] in ("near", "far")]
    assert f"{100 * np.mean(sets):.2f}" in line


def test_report_has_the_failure_section_with_curves(bench_dir):
    page = write_report(bench_dir, figures="none").read_text()
    section = re.search(r"<section id='failure'>(.*?)</section>", page, re.S)
    assert section, "no failure section"
    body = section.group(1)
    doc = json.loads((bench_dir / "results.json").read_text())
    row = next(r for r in doc["rows"] if r["model"] == "pretrained" and r["detector"] == "msp")
    assert f">{100 * row['misclf_auroc']:.2f}<" in body and f">{100 * row['aurc']:.2f}<" in body
    assert body.count("<img src='data:image/png;base64,") == 2  # one risk-coverage figure per model with labels
    assert "href=\"#failure\"" in page


def test_results_without_failure_metrics_render_as_before(bench_dir, tmp_path):
    doc = json.loads((bench_dir / "results.json").read_text())
    for r in doc["rows"]:
        for k in ("misclf_auroc", "aurc", "failure_aurc"):
            r.pop(k)
    (tmp_path / "results.json").write_text(json.dumps(doc))
    page = write_report(tmp_path, figures="none").read_text()
    assert "id='failure'" not in page
    assert failure_results_table(load_results(tmp_path)) is None

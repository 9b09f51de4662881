"""The report's figures (issue 16, items 2-3): only the sets a model was evaluated on, a log or rank
histogram axis, an own overview for a model evaluated on other sets, threshold numbers off the lines,
and closed detector sections that a link opens."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from scipy import stats

from ebood import metrics
from ebood.report import figures as plots
from test_report import SETS, _parse, make_results_dir


def _canvas_of(sets):
    return plots._CANVASES[(tuple((s.name, s.group) for s in sets), 0.95, "id")]


def _set(name, group, id_scores, ood):
    return plots.SetScores(name, group, ood, metrics.evaluate(id_scores, ood))


def test_id_rank_is_the_percentile_of_score():
    rng = np.random.default_rng(0)
    id_scores = np.round(rng.normal(size=300), 1)  # ties
    x = np.r_[np.round(rng.normal(size=50), 1), -10.0, 10.0]
    want = [stats.percentileofscore(id_scores, v, kind="mean") / 100 for v in x]
    assert np.allclose(plots.id_rank(id_scores, x), want)


def test_log_heights():
    shares = np.array([0.0, 0.0005, plots.LOG_FLOOR, 0.03, 1.0])
    got = plots._heights(shares, log=True)
    floor = np.log10(plots.LOG_FLOOR)
    want = [0.0, 0.04, 0.04, (np.log10(0.03) - floor) / -floor, 1.0]  # 0.04: a sliver, still visible
    assert np.allclose(got, want)
    assert np.array_equal(plots._heights(shares, log=False), shares)


@pytest.mark.parametrize("axis", ["auto", "linear", "log", "rank"])
def test_histogram_axes_and_numbers_beside_the_rows(axis):
    """MSP-like scores (most of ID at exactly -1): ``auto`` turns to a log scale; every row's FPR and
    AUROC stand right of the axes, where no threshold line or bar can be."""
    rng = np.random.default_rng(1)
    id_scores = np.where(rng.random(400) < 0.7, -1.0, -rng.uniform(0.3, 1.0, 400))
    sets = [_set("letters", "near", id_scores, -rng.uniform(0.2, 1.0, 300)),
            _set("noise", "far", id_scores, -rng.uniform(0.1, 0.8, 300))]
    uri = plots.detector_figure(id_scores, sets, axis=axis)
    canvas = _canvas_of(sets)
    title = canvas.title.get_text()
    assert ("log scale" in title) == (axis in ("auto", "log"))
    ridge = canvas.ridge
    lo, hi = ridge.get_xlim()
    if axis == "rank":
        assert (lo, hi) == (0.0, 1.0)
    else:
        assert lo <= -1.0 < hi
    renderer = canvas.canvas.get_renderer()
    box = ridge.get_window_extent(renderer)
    numbers = [t for t in ridge.texts if t.get_text()[:1].isdigit()]
    assert [t.get_text() for t in numbers] == [f"{100 * s.metrics['fpr95']:.1f}  {100 * s.metrics['auroc']:.1f}" for s in sets]
    for t in numbers:
        assert t.get_window_extent(renderer).x0 >= box.x1  # off the plot: no threshold line under a number
    # the threshold of each row sits where the FPR column's threshold is (ID kept at 95%)
    t = plots.threshold(id_scores, sets[0].scores, 0.95, "id")
    from matplotlib.collections import LineCollection

    marks = [c for c in ridge.collections if isinstance(c, LineCollection)][-1]
    xs = {seg[0][0] for seg in marks.get_segments()}
    assert xs == {float(plots.id_rank(id_scores, np.array([t]))[0]) if axis == "rank" else t}
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert image.format == "PNG" and image.width > 600


def test_reused_canvas_draws_the_same_pixels_as_a_fresh_one():
    """Blitting the static parts must not change the picture: the same figure drawn after another
    detector equals it drawn first."""
    rng = np.random.default_rng(2)
    id_a, id_b = rng.normal(-10, 1, 300), rng.normal(5, 2, 300)
    sets_a = [_set("letters", "near", id_a, rng.normal(-8, 1, 200)), _set("noise", "far", id_a, rng.normal(-5, 1, 200))]
    sets_b = [_set("letters", "near", id_b, rng.normal(9, 2, 200)), _set("noise", "far", id_b, rng.normal(20, 3, 200))]
    plots._CANVASES.clear()
    first = plots.detector_figure(id_a, sets_a)
    plots.detector_figure(id_b, sets_b)
    again = plots.detector_figure(id_a, sets_a)
    assert first == again


@pytest.fixture(scope="module")
def with_openset(tmp_path_factory):
    """A pre-trained model on three sets and an open-set model on its own near-OOD set only."""
    from ebood.report import write_report

    root = tmp_path_factory.mktemp("openset")
    doc = make_results_dir(root, models=("pretrained",), detectors=("msp", "energy"), n_id=200, n_ood=150)
    other = make_results_dir(root / "o", models=("openset",), detectors=("msp", "energy"), sets=(("digits_6-9", "near", 1.5),),
                             n_id=200, n_ood=150, seed=1)
    doc["rows"] += other["rows"]
    doc["models"].update(other["models"])
    doc["ood_sets"].update(other["ood_sets"])
    doc["notes"] = ["openset: ID accuracy 18.0% is far below the 95.0% this benchmark expects"]
    from safetensors.numpy import load_file, save_file

    save_file({**load_file(str(root / "scores.safetensors")), **load_file(str(root / "o" / "scores.safetensors"))},
              str(root / "scores.safetensors"))
    (root / "results.json").write_text(json.dumps(doc))
    plots._CANVASES.clear()  # the layouts this report draws (in this process: workers=1) are then the only ones
    return doc, root, write_report(root, figures="all", workers=1)


def test_only_evaluated_sets_are_drawn_and_tabled(with_openset):
    doc, _, path = with_openset
    text = path.read_text(encoding="utf-8")
    # the detector tables of the open-set model have its set only (the per-set tables show every model)
    tables = re.findall(r"<table class='results compact' data-model='openset'.*?</table>", text)
    assert len(tables) == 2
    tabled = {s for t in tables for s in re.findall(r"data-set='([^']+)'", t) if not s.startswith("mean:")}
    assert tabled == {"digits_6-9"}
    # its figures were drawn on one row: the canvas for exactly its set exists, none with empty rows
    layouts = [tuple(name for name, _ in key[0]) for key in plots._CANVASES]
    assert ("digits_6-9",) in layouts
    assert all(set(layout) <= {s for s, _, _ in SETS} or layout == ("digits_6-9",) for layout in layouts)
    assert "no scores saved" not in text


def test_a_model_on_other_sets_gets_its_own_overview(with_openset):
    _, _, path = with_openset
    text = path.read_text(encoding="utf-8")
    overview = text[text.index("<section id=\"overview\">"):text.index("<section id=\"summary\">")]
    assert overview.count("<img") == 2
    first, second = overview.split("<img")[1:]
    assert "pre-trained" in first and "openset" not in first.split("figcaption")[0]
    assert "openset" in second and "Evaluated on other OOD sets" in second


def test_notes_and_closed_sections(with_openset):
    doc, _, path = with_openset
    text = path.read_text(encoding="utf-8")
    assert f"<p class='warning'>{doc['notes'][0]}</p>" in text
    page = _parse(path)
    assert page.detector_sections == ["msp", "energy"]
    assert text.count("<details>") == 2 and "<details open" not in text
    # every detector's closed section names its overall mean FPR per model
    for det in ("msp", "energy"):
        section = text[text.index(f"data-detector='{det}'><details>"):]
        summary = section[:section.index("</summary>")]
        mean = np.mean([r["fpr95"] for r in doc["rows"] if r["model"] == "pretrained" and r["detector"] == det
                        and r["group"] != "covariate"])
        assert f"pre-trained {100 * mean:.2f}" in summary


def test_bad_histogram_axis_is_refused(with_openset, tmp_path):
    from typer.testing import CliRunner

    from ebood.cli import app, load_commands
    from ebood.report import write_report

    _, root, _ = with_openset
    with pytest.raises(ValueError, match="histogram_axis must be one of auto, linear, log, rank"):
        write_report(root, histogram_axis="sqrt")
    load_commands()
    res = CliRunner().invoke(app, ["report", str(root), "--histogram-axis", "sqrt"])
    assert res.exit_code != 0 and "--histogram-axis must be" in res.output and "rank" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["report", str(root), "--histogram-axis", "rank"])
    assert res.exit_code == 0, res.output

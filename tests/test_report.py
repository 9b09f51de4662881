"""ebood.report: the HTML report (self-contained, numbers equal to the rows, visible in a real browser),
the terminal table and the ``ebood report`` command."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ebood import metrics

# (name, group, shift of the OOD scores above ID, in ID standard deviations)
SETS = (("letters", "near", 1.0), ("gaussian", "far", 3.0), ("font_digits", "covariate", 0.4))
MODELS = ("pretrained", "energy_finetuned")
DETECTORS = ("msp", "energy", "react")


def make_results_dir(
    root: Path,
    *,
    models=MODELS,
    detectors=DETECTORS,
    sets=SETS,
    n_id: int = 300,
    n_ood: int = 200,
    seed: int = 0,
) -> dict:
    """A results directory as the benchmark runner writes it (interfaces.md): random but realistic
    scores (ID near -10, OOD shifted up by a set-dependent amount), and rows computed from them."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays, rows = {}, []
    for mi, model in enumerate(models):
        for di, det in enumerate(detectors):
            id_scores = rng.normal(-10.0, 1.5, n_id).astype(np.float32)
            arrays[f"{model}/{det}/id_test"] = id_scores
            for name, group, shift in sets:
                ood = rng.normal(-10.0 + 1.5 * shift * (1 + 0.3 * mi + 0.1 * di), 1.5 + 0.5 * di, n_ood).astype(np.float32)
                arrays[f"{model}/{det}/{name}"] = ood
                rows.append({"model": model, "detector": det, "ood_set": name, "group": group,
                             **metrics.evaluate(id_scores, ood)})
    doc = {
        "ebood_version": "0.1.0",
        "benchmark": "builtin",
        "config": {"seed": seed, "positive": "id",
                   "reference": {"source": "Liu et al. 2020", "metric": "fpr95", "pretrained/energy": 33.01}},
        "versions": {"python": "3.11.7", "torch": "2.13.0", "numpy": np.__version__},
        "device": "cpu (2 threads)",
        "seed": seed,
        "created": "2025-01-02T03:04:05+00:00",
        "timings": {"training": 41.5, "extraction": 3.25, "fitting": 1.5, "scoring": 0.75, "total": 47.0},
        "models": {m: {"id_accuracy": 0.97 - 0.01 * i, "description": f"{m} <digits> CNN"} for i, m in enumerate(models)},
        "ood_sets": {name: {"group": group, "n": n_ood, "description": f"{name} set"} for name, group, _ in sets},
        "auxiliary_outliers": "cropped sample photographs and smoothed noise (disjoint from every test set)",
        "rows": rows,
    }
    (root / "results.json").write_text(json.dumps(doc, indent=1))
    save_file(arrays, str(root / "scores.safetensors"))
    return doc


class _Page(HTMLParser):
    """Collects the cells that carry data-* attributes, every src/href, the ids and the images."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[dict, str]] = []
        self.urls: list[str] = []
        self.ids: set[str] = set()
        self.images: list[str] = []
        self.detector_sections: list[str] = []
        self.hidden: list[tuple[str, dict]] = []
        self._cell: dict | None = None
        self._text: list[str] = []
        self._table: dict = {}
        self._row: dict = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href", "xlink:href", "srcset", "action") and v]
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if "hidden" in a or "display:none" in a.get("style", "").replace(" ", ""):
            self.hidden.append((tag, a))
        if tag == "section" and "data-detector" in a:
            self.detector_sections.append(a["data-detector"])
        # a cell's model, detector and metric may be said once by its row or table
        if tag == "table":
            self._table = {k: v for k, v in a.items() if k.startswith("data-")}
        if tag == "tr":
            self._row = {k: v for k, v in a.items() if k.startswith("data-")}
        if tag == "td":
            a = {**self._table, **self._row, **a}
            if "data-metric" in a or "data-reference" in a:
                self._cell, self._text = a, []

    def handle_data(self, data):
        if self._cell is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = {}
        if tag == "tr":
            self._row = {}
        if tag == "td" and self._cell is not None:
            self.cells.append((self._cell, "".join(self._text).strip()))
            self._cell = None


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _expected(doc: dict) -> dict[tuple[str, str, str, str], float]:
    """Every number the tables should show, as fractions: per set from the rows, group means in float64."""
    expected = {}
    for r in doc["rows"]:
        for m in metrics.METRIC_NAMES:
            expected[(r["model"], r["detector"], r["ood_set"], m)] = r[m]
    groups = {"near": ["near"], "far": ["far"], "all": ["near", "far"]}
    for model in {r["model"] for r in doc["rows"]}:
        for det in {r["detector"] for r in doc["rows"]}:
            for key, gs in groups.items():
                for m in metrics.METRIC_NAMES:
                    vals = [r[m] for r in doc["rows"] if r["model"] == model and r["detector"] == det and r["group"] in gs]
                    expected[(model, det, f"mean:{key}", m)] = math.fsum(vals) / len(vals)
    return expected


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    from ebood.report import write_report

    root = tmp_path_factory.mktemp("results")
    doc = make_results_dir(root)
    return doc, write_report(root)


def test_report_is_one_self_contained_file(rendered):
    doc, path = rendered
    assert path.name == "report.html" and path.parent.joinpath("results.json").exists()
    page = _parse(path)
    text = path.read_text(encoding="utf-8")
    # nothing fetched from anywhere: every src / href is a data: URI or an in-page anchor
    assert page.urls and all(u.startswith(("data:image/png;base64,", "#")) for u in page.urls), page.urls
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "@import" not in text and "url(" not in text
    # every in-page link points at an element of the page
    assert {u[1:] for u in page.urls if u.startswith("#")} <= page.ids


def test_report_names_every_detector_set_and_model(rendered):
    doc, path = rendered
    page = _parse(path)
    text = path.read_text(encoding="utf-8")
    assert page.detector_sections == list(DETECTORS)
    shown = {(c["data-model"], c["data-detector"], c["data-set"]) for c, _ in page.cells if "data-set" in c}
    for model in MODELS:
        for det in DETECTORS:
            for name, _, _ in SETS:
                assert (model, det, name) in shown
    for name, _, _ in SETS:
        assert f">{name}<" in text
    # header: ID accuracy per model, timings, device, seed, auxiliary outliers (HTML-escaped description)
    acc = {c["data-model"]: t for c, t in page.cells if c.get("data-metric") == "id_accuracy"}
    assert acc == {m: f"{100 * doc['models'][m]['id_accuracy']:.2f}%" for m in MODELS}
    for needle in ("cpu (2 threads)", "41.5 s", "47.0 s", doc["auxiliary_outliers"], "&lt;digits&gt;", "2025-01-02"):
        assert needle in text


def test_table_numbers_equal_the_rows(rendered):
    doc, path = rendered
    expected = _expected(doc)
    cells = [(c, t) for c, t in _parse(path).cells if "data-set" in c]
    assert len(cells) > 200
    seen = set()
    for c, text in cells:
        key = (c["data-model"], c["data-detector"], c["data-set"], c["data-metric"])
        assert text == "{:.2f}".format(100 * expected[key]), key
        seen.add(key)
    # every row of results.json and every near / far / overall mean appears somewhere
    assert seen == set(expected)


def test_published_numbers_sit_beside_the_means(rendered):
    _, path = rendered
    ref = {c["data-reference"]: t for c, t in _parse(path).cells if "data-reference" in c}
    assert ref == {f"{m}/{d}": ("33.01" if (m, d) == ("pretrained", "energy") else "\u2013") for m in MODELS for d in DETECTORS}
    assert "Liu et al. 2020" in path.read_text(encoding="utf-8")


def test_content_is_visible_without_javascript(rendered):
    _, path = rendered
    text = path.read_text(encoding="utf-8")
    assert not _parse(path).hidden  # nothing starts hidden: the script hides the inactive tabs itself
    # the only CSS that hides anything is the tab bar, shown once the script has run
    css = text[text.index("<style>") + 7 : text.index("</style>")]
    hidden_rules = re.findall(r"([^{}]+)\{[^}]*display:\s*none", css)
    assert [r.strip() for r in hidden_rules] == [".tabs"]
    assert text.count("class='tab' data-panel=") == len(metrics.METRIC_NAMES)


def test_missing_metrics_show_a_dash_and_are_never_best(tmp_path):
    from ebood.report import write_report

    doc = make_results_dir(tmp_path, models=("pretrained",), detectors=("msp", "energy"), sets=SETS[:2], n_id=30, n_ood=30)
    doc["rows"][0]["fpr95"] = None  # pretrained/msp/letters
    (tmp_path / "results.json").write_text(json.dumps(doc))
    cells = _parse(write_report(tmp_path, figures="none")).cells
    key = lambda c: (c.get("data-detector"), c.get("data-set"), c.get("data-metric"))  # noqa: E731
    shown = [(c, t) for c, t in cells if key(c) in {("msp", "letters", "fpr95"), ("msp", "mean:near", "fpr95"), ("msp", "mean:all", "fpr95")}]
    assert shown and all(t == "\u2013" and "best" not in c["class"] for c, t in shown)
    # the energy row is then the best of the letters FPR column (in the per-set table)
    assert any("best" in c["class"].split() for c, _ in cells if key(c) == ("energy", "letters", "fpr95"))


def test_covariate_set_is_not_in_the_means(rendered):
    doc, path = rendered
    cells = {(c["data-model"], c["data-detector"], c["data-set"], c["data-metric"]): t for c, t in _parse(path).cells if "data-set" in c}
    for model in MODELS:
        rows = [r for r in doc["rows"] if r["model"] == model and r["detector"] == "energy"]
        ood_only = np.mean([r["fpr95"] for r in rows if r["group"] != "covariate"])
        with_cov = np.mean([r["fpr95"] for r in rows])
        assert cells[(model, "energy", "mean:all", "fpr95")] == f"{100 * ood_only:.2f}"
        assert cells[(model, "energy", "mean:all", "fpr95")] != f"{100 * with_cov:.2f}"


def test_best_value_of_each_column_is_highlighted(rendered):
    doc, path = rendered
    expected = _expected(doc)
    # the summary and per-set tables: a column = (data-set, metric) across every (model, detector)
    columns: dict[tuple[str, str], list[tuple[float, bool]]] = {}
    for c, _ in _parse(path).cells:
        if "data-set" not in c:
            continue
        key = (c["data-model"], c["data-detector"], c["data-set"], c["data-metric"])
        columns.setdefault((c["data-set"], c["data-metric"]), []).append((expected[key], "best" in c["class"].split()))
    assert len(columns) == (len(SETS) + 3) * len(metrics.METRIC_NAMES)
    for (name, metric), cells in columns.items():
        if name == "font_digits":  # covariate shift: no best value
            assert not any(marked for _, marked in cells)
            continue
        pick = min if metric == "fpr95" else max
        best = round(100 * pick(v for v, _ in cells), 2)
        assert any(marked for _, marked in cells), (name, metric)
        for v, marked in cells:
            if marked:
                assert round(100 * v, 2) == best, (name, metric)


def test_every_figure_is_a_png(rendered):
    _, path = rendered
    from PIL import Image
    import base64
    import io

    images = _parse(path).images
    # an overview plus one figure per (model, detector): the fine-tuned model has only 3 detectors
    assert len(images) == 1 + len(MODELS) * len(DETECTORS)
    for src in images:
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "PNG" and image.width > 300 and image.height > 150
        pixels = np.asarray(image.convert("L"))
        assert (pixels < 200).mean() > 0.01  # something is drawn


@pytest.mark.parametrize("positive", ["id", "ood"])
def test_roc_points_and_threshold_against_sklearn(positive):
    from sklearn.metrics import roc_auc_score, roc_curve

    from ebood.report.figures import _roc_points, threshold

    rng = np.random.default_rng(3)
    id_s = np.round(rng.normal(0.0, 1.0, 400), 1)  # rounded: many ties
    ood_s = np.round(rng.normal(1.0, 1.5, 250), 1)
    fpr, tpr = _roc_points(id_s, ood_s, positive)
    labels = np.r_[np.zeros(id_s.size), np.ones(ood_s.size)]
    pooled = np.r_[id_s, ood_s]
    if positive == "ood":  # OOD flagged when score >= t
        ref_fpr, ref_tpr, _ = roc_curve(labels, pooled)
    else:  # ID accepted when score <= t
        ref_fpr, ref_tpr, _ = roc_curve(1 - labels, -pooled)
    assert sorted(zip(fpr.tolist(), tpr.tolist())) == sorted(zip(ref_fpr.tolist(), ref_tpr.tolist()))
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, pooled), abs=1e-12)

    t = threshold(id_s, ood_s, 0.95, positive)
    if positive == "ood":  # the largest t flagging at least 95% of OOD
        assert np.mean(ood_s >= t) >= 0.95 and np.mean(ood_s >= np.min(ood_s[ood_s > t])) < 0.95
    else:  # the smallest t accepting at least 95% of ID
        assert np.mean(id_s <= t) >= 0.95 and np.mean(id_s <= np.max(id_s[id_s < t])) < 0.95


def test_rendering_is_deterministic(tmp_path):
    from ebood.report import write_report

    make_results_dir(tmp_path, models=("pretrained",), detectors=("energy",), sets=SETS[:2])
    first = write_report(tmp_path).read_bytes()
    assert write_report(tmp_path).read_bytes() == first


def test_figures_follow_the_budget(tmp_path):
    from ebood.report import figure_pairs, load_results

    many = tuple(f"det{i}" for i in range(5)) + ("energy", "msp")
    make_results_dir(tmp_path, models=("pretrained", "energy_finetuned", "oe_finetuned"), detectors=many, sets=SETS[:1], n_id=20, n_ood=20)
    res = load_results(tmp_path)
    auto = figure_pairs(res)
    assert {d for m, d in auto if m == "pretrained"} == set(many)
    assert {d for m, d in auto if m != "pretrained"} == {"energy", "msp"}
    assert figure_pairs(res, "all") == set(res.pairs) and figure_pairs(res, "none") == set()


def test_missing_scores_file_still_renders_with_a_note(tmp_path):
    from ebood.report import write_report

    make_results_dir(tmp_path, models=("pretrained",), detectors=("energy",), sets=SETS[:2])
    (tmp_path / "scores.safetensors").unlink()
    page = _parse(write_report(tmp_path))
    assert len(page.images) == 1  # the overview only
    assert "scores.safetensors is missing" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("rows"), 'missing "rows"'),
        (lambda d: d.update(rows=[]), '"rows" is empty'),
        (lambda d: d["rows"][0].pop("auroc"), "rows[0]: missing metric auroc"),
        (lambda d: d["rows"][1].update(group="sideways"), "rows[1]: group must be one of near, far, covariate"),
        (lambda d: d["rows"][2].update(fpr95=12.5), "rows[2]: fpr95 = 12.5 is not a fraction"),
        (lambda d: d["rows"][0].update(model=None), "rows[0]: missing 'model'"),
        (lambda d: d["rows"].append(dict(d["rows"][0])), "two rows for model 'pretrained', detector 'msp', set 'letters'"),
    ],
)
def test_malformed_results_are_named(tmp_path, mutate, message):
    from ebood.report import ReportError, write_report

    doc = make_results_dir(tmp_path, detectors=("msp",), n_id=20, n_ood=20)
    mutate(doc)
    (tmp_path / "results.json").write_text(json.dumps(doc))
    with pytest.raises(ReportError, match=re.escape(message)):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_results_table_shows_sets_means_and_accuracy(rendered):
    from rich.console import Console

    from ebood.report import results_table

    doc, _ = rendered
    console = Console(width=250, record=True, color_system=None)
    console.print(results_table(doc))
    text = console.export_text()
    lines, model = {}, None
    for line in text.splitlines():
        if line.count("│") > 4:  # a data row: │ model │ detector │ ... │
            cells = line.split("│")
            model = cells[1].strip() or model  # the model is named on its first row only
            lines[(model, cells[2].strip())] = line
    rows = {(r["model"], r["detector"], r["ood_set"]): r for r in doc["rows"]}
    for m in MODELS:
        for det in DETECTORS:
            cells = [c.strip() for c in lines[(m, det)].split("│")[3:-1]]
            fprs = [rows[(m, det, s)]["fpr95"] for s in ("letters", "gaussian")]
            near, far = fprs
            aurocs = [rows[(m, det, s)]["auroc"] for s in ("letters", "gaussian")]
            want = [near, far, near, aurocs[0], far, aurocs[1], np.mean(fprs), np.mean(aurocs),
                    rows[(m, det, "font_digits")]["fpr95"]]
            assert cells[:-2] == [f"{100 * v:.2f}" for v in want]
            assert cells[-2] == ("33.01" if (m, det) == ("pretrained", "energy") else "–")  # the [reference]
            assert cells[-1] == (f"{100 * doc['models'][m]['id_accuracy']:.2f}" if det == DETECTORS[0] else "")


def test_results_table_without_per_set_columns_keeps_the_means(rendered):
    from rich.console import Console

    from ebood.report import results_table

    doc, _ = rendered
    console = Console(width=250, record=True, color_system=None)
    console.print(results_table(doc, per_set=False))
    text = console.export_text()
    assert "per OOD set" not in text.splitlines()[0]
    rows = {(r["model"], r["detector"], r["ood_set"]): r for r in doc["rows"]}
    m, det = MODELS[0], DETECTORS[0]
    line = next(ln for ln in text.splitlines() if ln.count("│") > 4 and ln.split("│")[1].strip() == m)
    cells = [c.strip() for c in line.split("│")[3:-1]]
    near, far = (rows[(m, det, s)] for s in ("letters", "gaussian"))
    want = [near["fpr95"], near["auroc"], far["fpr95"], far["auroc"], (near["fpr95"] + far["fpr95"]) / 2,
            (near["auroc"] + far["auroc"]) / 2, rows[(m, det, "font_digits")]["fpr95"]]
    assert cells[:-2] == [f"{100 * v:.2f}" for v in want]


def test_cli_report_rerenders_and_prints_the_path(tmp_path):
    from typer.testing import CliRunner

    from ebood.cli import app, load_commands

    load_commands()
    make_results_dir(tmp_path, models=("pretrained",), detectors=("energy",), sets=SETS[:2], n_id=50, n_ood=50)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(str(tmp_path / "report.html"))
    assert (tmp_path / "report.html").stat().st_size > 10_000


@pytest.mark.parametrize("case", ["no-dir", "no-json", "bad-json", "not-object"])
def test_cli_report_errors_are_one_line(tmp_path, case):
    from typer.testing import CliRunner

    from ebood.cli import app, load_commands

    load_commands()
    target = tmp_path / "results"
    if case != "no-dir":
        target.mkdir()
    if case == "bad-json":
        (target / "results.json").write_text("{not json")
    if case == "not-object":
        (target / "results.json").write_text("[1, 2]")
    result = CliRunner().invoke(app, ["report", str(target)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ebood: error: ") and str(target) in lines[0], result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# a real browser

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium") if p and os.path.exists(p)), None)

# Runs after the page has loaded: for the summary table, the visible per-set table and every image,
# its box on screen and whether it is shown; for images also whether they decoded and hold ink.
PROBE = """
<script>
window.addEventListener('load', function () {
  function shown(el) {
    var r = el.getBoundingClientRect(), s = getComputedStyle(el);
    return {w: r.width, h: r.height, visible: el.offsetParent !== null && s.visibility !== 'hidden' && s.display !== 'none'};
  }
  function ink(img) {
    var c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
    var g = c.getContext('2d'); g.drawImage(img, 0, 0);
    var d = g.getImageData(0, 0, c.width, c.height).data, dark = 0;
    for (var i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] < 600) dark++;
    return dark / (c.width * c.height);
  }
  var out = {summary: shown(document.getElementById('summary-table')), tables: [], images: []};
  document.querySelectorAll('table.per-set').forEach(function (t) {
    var o = shown(t); o.metric = t.getAttribute('data-metric-table'); o.rows = t.tBodies[0].rows.length; out.tables.push(o);
  });
  document.querySelectorAll('img').forEach(function (img) {
    var o = shown(img); o.complete = img.complete; o.natural = img.naturalWidth; o.ink = ink(img); out.images.push(o);
  });
  var pre = document.createElement('pre'); pre.id = 'ebood-probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (the CI script installs Debian's chromium)")
def test_report_in_headless_chromium(rendered, tmp_path):
    _, path = rendered
    probe_page = tmp_path / "probe.html"
    # detector sections open closed and their images load when opened: open them all for the probe
    page = path.read_text(encoding="utf-8")
    assert page.count("<details>") == len(DETECTORS) and "loading='lazy'" in page
    page = page.replace("<details>", "<details open>").replace(" loading='lazy'", "")
    probe_page.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--dump-dom", probe_page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="ebood-probe">(.*?)</pre>', done.stdout, re.S)
    assert match, f"chromium gave no probe output (exit {done.returncode}): {done.stderr[-2000:]}"
    out = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))

    summary = out["summary"]
    assert summary["visible"] and summary["w"] > 600 and summary["h"] > 150
    n_rows = len(MODELS) * (len(DETECTORS) + 1)  # a separator row per model
    visible_tables = [t for t in out["tables"] if t["visible"]]
    assert [t["metric"] for t in visible_tables] == ["fpr95"]  # the first tab; the others wait behind theirs
    assert all(t["rows"] == n_rows for t in out["tables"]) and visible_tables[0]["h"] > 150

    assert len(out["images"]) == 1 + len(MODELS) * len(DETECTORS)
    for img in out["images"]:
        assert img["complete"] and img["natural"] > 300, img
        assert img["visible"] and img["w"] > 300 and img["h"] > 100, img
        assert img["ink"] > 0.01, img


def test_a_constant_detector_gets_a_diagonal_roc(tmp_path):
    from sklearn.metrics import roc_curve

    from ebood.report import write_report
    from ebood.report.figures import _roc_points

    for positive in ("id", "ood"):
        fpr, tpr = _roc_points(np.full(50, 2.0), np.full(30, 2.0), positive)
        ref_fpr, ref_tpr, _ = roc_curve(np.r_[np.zeros(50), np.ones(30)], np.full(80, 2.0))
        assert fpr.tolist() == ref_fpr.tolist() == [0.0, 1.0] and tpr.tolist() == ref_tpr.tolist() == [0.0, 1.0]
    make_results_dir(tmp_path, models=("pretrained",), detectors=("energy",), sets=SETS[:2])
    scores = {k: np.full(v.shape, -3.0, np.float32) for k, v in load_file(str(tmp_path / "scores.safetensors")).items()}
    save_file(scores, str(tmp_path / "scores.safetensors"))
    page = _parse(write_report(tmp_path, figures="all"))
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)

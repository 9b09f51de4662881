"""`ebood bench`'s table in a real pseudo-terminal (tmux, or `script`) at 80, 120, 160 and 200 columns:
every number whole and present, nothing cut to `…` or left blank; and the layout chosen is the
richest that fits."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

WIDTHS = (80, 120, 160, 200)
SRC = str(Path(__file__).resolve().parents[1] / "src")
# The built-in benchmark's shape: 24 detectors on the pre-trained model, 4 on each fine-tuned one, an
# open-set model with its own near-OOD set only, a covariate-shift set outside the means.
DETECTORS = ("ash", "conjnorm", "dice", "energy", "entropy", "fdbd", "gen", "gradnorm", "kl_matching", "knn",
             "mahalanobis", "mahalanobis_ensemble", "max_logit", "mc_dropout", "msp", "nnguide", "odin", "react",
             "relative_mahalanobis", "residual", "scale", "she", "temperature_scaling", "vim")
SETS = (("letters", "near"), ("photos", "far"), ("gaussian", "far"), ("uniform", "far"), ("rademacher", "far"),
        ("blobs", "far"), ("font-digits", "covariate"))
MODELS = {"pretrained": DETECTORS, "energy_finetuned": ("msp", "energy", "max_logit", "entropy"),
          "oe_finetuned": ("msp", "energy", "max_logit", "entropy"), "openset": DETECTORS}


def results_doc(seed: int = 0, *, reference: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    for model, detectors in MODELS.items():
        sets = (("digits_6-9", "near"),) if model == "openset" else SETS
        for det in detectors:
            for name, group in sets:
                # values like 0.1234 (and 1.0, which prints as 100.00, the widest cell)
                m = {k: float(rng.integers(0, 10_001)) / 10_000 for k in ("fpr95", "auroc", "aupr_in", "aupr_out")}
                rows.append({"model": model, "detector": det, "ood_set": name, "group": group, **m})
    rows[0]["fpr95"] = 1.0
    doc = {"benchmark": "builtin", "config": {"positive": "id"}, "rows": rows,
           "models": {m: {"id_accuracy": 0.9 + 0.01 * i} for i, m in enumerate(MODELS)},
           "selected_hyperparameters": {"pretrained/react": {"percentile": 90}}}
    if reference:
        doc["reference"] = {"source": "a paper", "metric": "fpr95", "pretrained/energy": 33.01}
    return doc


def expected_numbers(doc: dict) -> Counter:
    """Numbers every layout shows: each pair's mean FPR per group and overall, covariate FPRs, ID
    accuracies and the published numbers, as printed (two decimals)."""
    from ebood.report.terminal import _as_results

    res = _as_results(doc)
    out: Counter = Counter()
    for model, det in res.pairs:
        for _, _, groups in res.mean_columns():
            mean = res.mean(model, det, groups, "fpr95")
            if not np.isnan(mean):  # the open-set model has no far-OOD set: printed "–"
                out[f"{100 * mean:.2f}"] += 1
        for s in res.sets_in(("covariate",)):
            if s in res.model_sets(model):
                out[f"{100 * res.value(model, det, s, 'fpr95'):.2f}"] += 1
    for model in res.models:
        out[f"{100 * res.id_accuracy(model):.2f}"] += 1
    for value in (res.reference() or (None, {}, None))[1].values():
        out[f"{value:.2f}"] += 1
    return out


SHOW = "import json, sys; from ebood.cli.benchmarking import _print_table; _print_table(json.load(open(sys.argv[1])))"


def _in_tmux(width: int, results: Path, done: Path):
    sock = f"ebood-test-{os.getpid()}-{width}"
    command = (f"PYTHONPATH={SRC} {sys.executable} -c '{SHOW}' {results} 2>&1; touch {done}; sleep 600")
    subprocess.run(["tmux", "-L", sock, "-f", "/dev/null", "new-session", "-d", "-x", str(width), "-y", "400",
                    "env", "-u", "NO_COLOR", "-u", "COLUMNS", "-u", "LINES", "TERM=xterm-256color", "sh", "-c", command], check=True)

    def capture() -> str:
        try:
            return subprocess.run(["tmux", "-L", sock, "capture-pane", "-p", "-S", "-"], check=True,
                                  capture_output=True, text=True).stdout
        finally:
            subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)

    return capture


def _in_script(width: int, results: Path, done: Path):
    command = (f"stty cols {width} rows 400; PYTHONPATH={SRC} {sys.executable} -c \"{SHOW}\" {results}; touch {done}")
    out = done.with_suffix(".log")
    proc = subprocess.Popen(["script", "-q", "-e", "-c", command, str(out)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | {"TERM": "xterm"})

    def capture() -> str:
        proc.wait(timeout=60)
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.read_text(errors="replace")).replace("\r", "")

    return capture


@pytest.fixture(scope="module")
def screens(tmp_path_factory):
    """The table as four real terminals show it (all four started at once), keyed by width."""
    use_tmux = shutil.which("tmux") is not None
    if not use_tmux and shutil.which("script") is None:
        pytest.skip("needs tmux or script for a pseudo-terminal")
    tmp = tmp_path_factory.mktemp("tty")
    doc = results_doc()
    (tmp / "results.json").write_text(json.dumps(doc))
    captures = {}
    for width in WIDTHS:
        start = _in_tmux if use_tmux else _in_script
        captures[width] = start(width, tmp / "results.json", tmp / f"done{width}")
    deadline = time.monotonic() + 120
    while not all((tmp / f"done{w}").exists() for w in WIDTHS) and time.monotonic() < deadline:
        time.sleep(0.2)
    return doc, {w: captures[w]() for w in WIDTHS}


@pytest.mark.parametrize("width", WIDTHS)
def test_every_number_is_whole_in_a_real_terminal(screens, width):
    doc, shown = screens
    screen = shown[width]
    assert "Traceback" not in screen, screen
    lines = [ln.rstrip() for ln in screen.splitlines()]
    assert max(len(ln) for ln in lines) <= width, "a line is wider than the terminal"
    assert "…" not in screen, f"a cell is cut at {width} columns:\n{screen}"
    numbers = Counter(re.findall(r"(?<![\d.])\d{1,3}\.\d\d(?![\d.])", screen))
    missing = expected_numbers(doc) - numbers
    assert not missing, f"numbers missing (blank or cut cells) at {width} columns: {dict(missing)}\n{screen}"
    # no blank cell in a table row (the model's name and ID accuracy are on its first row only)
    for ln in lines:
        cells = [c.strip() for c in ln.split("│")[1:-1]]
        named = [k for k, c in enumerate(cells) if c in DETECTORS]
        if ln.startswith("│") and named:
            after = cells[named[0] + 1:]
            assert all(after[:-1] if named[0] == 1 else after), f"blank cell at {width} columns: {ln!r}"
    assert "grid choices (on validation OOD sets): pretrained/react: percentile=90" in screen


def test_the_richest_layout_that_fits_is_chosen(screens):
    from ebood.report.terminal import LAYOUTS, _as_results, _layout, fit_results, natural_width

    doc, shown = screens
    res = _as_results(doc)
    widths = {name: natural_width(_layout(res, name, "fpr95")) for name in LAYOUTS}
    for width in WIDTHS:
        _, chosen = fit_results(doc, width)
        fitting = [name for name in LAYOUTS if widths[name] <= width]
        assert chosen == (fitting[0] if fitting else "lines")
        assert (chosen == "per-set") == ("per OOD set" in shown[width])
    # the built-in benchmark's shape: a different layout at each of the four widths
    assert [fit_results(doc, w)[1] for w in WIDTHS] == ["fpr-by-model", "by-model", "means", "per-set"]
    assert fit_results(doc, widths["per-set"])[1] == "per-set"
    assert fit_results(doc, widths["per-set"] - 1)[1] != "per-set"


def test_published_numbers_and_grid_choices_are_printed():
    from rich.console import Console

    from ebood.report.terminal import fit_results, summary_notes

    doc = results_doc(2, reference=True)
    for width in (250, 120, 80, 40):
        renderable, layout = fit_results(doc, width)
        console = Console(width=width, record=True, color_system=None)
        console.print(renderable)
        text = console.export_text()
        assert "published" in text and "33.01" in text, layout
        assert not expected_numbers(doc) - Counter(re.findall(r"(?<![\d.])\d{1,3}\.\d\d(?![\d.])", text)), layout
        if layout == "per-set":  # on the pre-trained model's energy row, in the column before ID accuracy
            row = next(ln for ln in text.splitlines() if [c.strip() for c in ln.split("│")[1:3]] == ["", "energy"])
            assert row.split("│")[-3].strip() == "33.01"
    assert summary_notes(doc) == ["published: a paper", "grid choices (on validation OOD sets): pretrained/react: percentile=90"]


def test_lines_layout_wraps_whole_numbers_at_any_width():
    from rich.console import Console

    from ebood.report.terminal import fit_results

    doc = results_doc(1, reference=True)
    renderable, layout = fit_results(doc, 40)
    assert layout == "lines"
    console = Console(width=40, record=True, color_system=None)
    console.print(renderable)
    text = console.export_text()
    assert "…" not in text and max(len(ln) for ln in text.splitlines()) <= 40
    assert not expected_numbers(doc) - Counter(re.findall(r"(?<![\d.])\d{1,3}\.\d\d(?![\d.])", text))

"""The report's figures (matplotlib, Agg), returned as base64 PNG data URIs.

* :func:`detector_figure`: for one model and detector, a ROC panel (all OOD sets) beside one histogram
  panel per OOD set: the densities of ID and OOD scores and the threshold that keeps ``tpr`` of the
  positive class, as in Figures 1 and 3 of Liu, Wang, Owens & Li, "Energy-based Out-of-distribution
  Detection" (NeurIPS 2020). Scores are ebood's OOD scores (higher = more OOD), so ID sits on the left.
* :func:`overview_figure`: every model / detector pair, ranked by its mean FPR, with the near- and
  far-OOD means of FPR and AUROC side by side.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot state), rendered at a
modest dpi and quantised to a 256-colour palette, which keeps a report of ~30 figures within a few MB.
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = ["SetScores", "detector_figure", "overview_figure", "risk_coverage_figure", "png_data_uri", "ID_COLOUR", "OOD_COLOUR", "SET_COLOURS"]

# Okabe & Ito's colour-blind-safe palette for the two classes ...
ID_COLOUR = "#0072B2"  # blue
OOD_COLOUR = "#D55E00"  # vermillion
# ... Paul Tol's "muted" scheme (colour-blind-safe, 9 colours) for OOD sets in ROC plots, and
# Okabe-Ito again for models in the overview.
SET_COLOURS = ("#332288", "#117733", "#CC6677", "#88CCEE", "#999933", "#AA4499", "#44AA99", "#882255", "#DDCC77")
MODEL_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
GROUP_LINESTYLES = {"near": "-", "far": "--", "covariate": ":"}
GROUP_MARKERS = {"near": "o", "far": "s", "all": "D"}

DPI = 88
HIST_W, HIST_H = 2.35, 1.8  # inches per histogram panel
BINS = 40

_STYLE = {
    "font.size": 9.5,
    "axes.titlesize": 10,
    "axes.titley": 1.0,  # a fixed title position skips matplotlib's per-draw search for overlaps
    "axes.titlepad": 4.0,
    "axes.labelsize": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#555555",
    "axes.linewidth": 0.7,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "xtick.color": "#444444",
    "ytick.color": "#444444",
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}


@dataclass(frozen=True)
class SetScores:
    """One OOD set's scores (None when the results directory has none) with the row's metrics."""

    name: str
    group: str
    scores: np.ndarray | None
    metrics: Mapping[str, float]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    # Fixed margins instead of a layout engine: constrained layout measures every tick label
    # twice per draw and made rendering ~2x slower.
    return Figure(figsize=(width, height), dpi=DPI)


def png_data_uri(fig, *, dpi: int = DPI) -> str:
    """``data:image/png;base64,...`` of ``fig``, palette-quantised (lossless-looking, ~3x smaller)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    image = Image.fromarray(rgba[..., :3]).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def threshold(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float, positive: str) -> float:
    """The operating point of the FPR column.

    ``positive="id"``: the smallest ``t`` accepting (``score <= t``) at least ``tpr`` of ID.
    ``positive="ood"``: the largest ``t`` flagging (``score >= t``) at least ``tpr`` of OOD, i.e.
    ``-t`` is the ID-style threshold of the negated OOD scores.
    """
    from ..metrics import id_threshold

    if positive == "ood":
        return -id_threshold(-ood_scores, tpr)
    return id_threshold(id_scores, tpr)


def _histogram_range(a: np.ndarray, b: np.ndarray, t: float) -> tuple[float, float]:
    # Robust range: extreme scores (e.g. noise images with huge energies) would squash the bulk.
    pooled = np.concatenate([a, b])
    lo, hi = np.percentile(pooled, [0.5, 99.5])
    lo, hi = min(lo, t), max(hi, t)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.03 * (hi - lo)
    return float(lo - pad), float(hi + pad)


def _densities(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(np.clip(x, edges[0], edges[-1]), bins=edges)
    return counts / (counts.sum() * np.diff(edges))


def _fpr_label(tpr: float, positive: str) -> str:
    from ..tables import metric_label

    return metric_label("fpr95", tpr=tpr, positive=positive)


def _histogram_panel(ax, id_scores: np.ndarray, s: SetScores, tpr: float, positive: str) -> None:
    from matplotlib.colors import to_rgba
    from matplotlib.ticker import MaxNLocator, NullLocator

    ax.set_title(f"{s.name}  ({s.group})", loc="left")
    if s.scores is None or s.scores.size == 0 or id_scores.size == 0:
        ax.text(0.5, 0.5, "no scores saved", ha="center", va="center", transform=ax.transAxes, color="#777777")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    t = threshold(id_scores, s.scores, tpr, positive)
    edges = np.linspace(*_histogram_range(id_scores, s.scores, t), BINS + 1)
    for x, colour in ((id_scores, ID_COLOUR), (s.scores, OOD_COLOUR)):
        ax.stairs(_densities(x, edges), edges, fill=True, facecolor=to_rgba(colour, 0.3), edgecolor=colour, linewidth=1.1)
    ax.axvline(t, color="#222222", linestyle=(0, (4, 2)), linewidth=1.0)
    fpr = s.metrics.get("fpr95", math.nan)
    if not math.isnan(fpr):
        ax.text(0.98, 0.96, f"{_fpr_label(tpr, positive)} {100 * fpr:.1f}%", transform=ax.transAxes,
                ha="right", va="top", fontsize=8.5, color="#222222",
                bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.8))
    ax.yaxis.set_major_locator(NullLocator())
    ax.spines["left"].set_visible(False)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))


def _roc_points(id_scores: np.ndarray, ood_scores: np.ndarray, positive: str) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, with the positive class of the FPR column.

    ``positive="id"``: a sample is accepted when ``score <= t``; TPR = ID accepted, FPR = OOD accepted.
    ``positive="ood"``: flagged when ``score >= t``, the same computation on negated scores with the
    roles swapped. Points on a straight segment are dropped (they draw nothing).
    """
    pos, neg = (ood_scores, id_scores) if positive == "ood" else (id_scores, ood_scores)
    sign = -1.0 if positive == "ood" else 1.0
    pooled = sign * np.r_[pos, neg]
    is_pos = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    order = np.argsort(pooled, kind="stable")
    ranked = pooled[order]
    last_of_tie = np.r_[ranked[1:] != ranked[:-1], True]  # ties are one operating point
    tp = np.cumsum(is_pos[order])[last_of_tie]
    fp = np.cumsum(1.0 - is_pos[order])[last_of_tie]
    # Bends are found on the integer counts, where "on a straight line" is exact. One distinct score
    # (a constant detector) is one operating point: the diagonal from (0, 0) to (1, 1).
    bend = np.r_[True, (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), True][-fp.size:]
    return np.r_[0.0, fp[bend] / neg.size], np.r_[0.0, tp[bend] / pos.size]


def _roc_panel(ax, id_scores: np.ndarray, sets: Sequence[SetScores], tpr: float, positive: str) -> None:
    ax.plot([0, 1], [0, 1], color="#BBBBBB", linewidth=0.8)
    ax.axhline(tpr, color="#222222", linestyle=(0, (4, 2)), linewidth=0.8)
    for i, s in enumerate(sets):
        if s.scores is None or s.scores.size == 0 or id_scores.size == 0:
            continue
        fpr, tp = _roc_points(id_scores, s.scores, positive)
        auroc = s.metrics.get("auroc", math.nan)
        label = s.name if math.isnan(auroc) else f"{s.name} ({100 * auroc:.1f})"
        ax.plot(fpr, tp, color=SET_COLOURS[i % len(SET_COLOURS)], linestyle=GROUP_LINESTYLES.get(s.group, "-"),
                linewidth=1.4, label=label)
    pos, neg = ("OOD", "ID") if positive == "ood" else ("ID", "OOD")
    ax.set_xlabel(f"{neg} samples taken as {pos} (FPR)")
    ax.set_ylabel(f"{pos} samples kept (TPR)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1], ["0", ".25", ".5", ".75", "1"])
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1], ["0", ".25", ".5", ".75", "1"])
    ax.set_aspect("equal", adjustable="box")
    ax.set_title("ROC  (AUROC %)", loc="left")
    ax.grid(color="#EEEEEE", linewidth=0.6)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", handlelength=2.2, borderaxespad=0.2)


def detector_figure(
    id_scores: np.ndarray | None,
    sets: Sequence[SetScores],
    *,
    tpr: float = 0.95,
    positive: str = "id",
    score_label: str = "score (higher = more OOD)",
) -> str:
    """ROC curves of every set beside the ID-vs-OOD score histograms; a PNG data URI.

    The key (ID / OOD colours, threshold, line style per group) is drawn by the page, once per figure
    in HTML: as a matplotlib legend it cost a fifth of the drawing time."""
    import matplotlib

    id_scores = np.empty(0) if id_scores is None else np.asarray(id_scores, dtype=np.float64)
    n = max(len(sets), 1)
    rows = 1 if n <= 3 else 2 if n <= 10 else 3
    cols = math.ceil(n / rows)
    # inches: a square ROC panel as tall as the grid of histograms, margins for labels and the legend
    hist_w, hist_h = HIST_W * cols, HIST_H * rows
    roc = max(hist_h - 0.35, 2.5)
    left, right, top, bottom, gap = 0.62, 0.12, 0.3, 0.5, 0.55
    width, height = left + roc + gap + hist_w + right, top + max(hist_h, roc) + bottom
    with matplotlib.rc_context(_STYLE):
        fig = _figure(width, height)
        outer = fig.add_gridspec(1, 2, left=left / width, right=1 - right / width, bottom=bottom / height,
                                 top=1 - top / height, width_ratios=[roc, hist_w], wspace=gap / ((roc + hist_w) / 2))
        _roc_panel(fig.add_subplot(outer[0, 0]), id_scores, sets, tpr, positive)
        grid = outer[0, 1].subgridspec(rows, cols, wspace=0.14, hspace=0.62)
        for i, s in enumerate(sets):
            ax = fig.add_subplot(grid[i // cols, i % cols])
            _histogram_panel(ax, id_scores, s, tpr, positive)
            if i + cols >= len(sets):  # the lowest panel of its column
                ax.set_xlabel(score_label)
        return png_data_uri(fig)


def overview_figure(
    detectors: Sequence[str],
    models: Sequence[str],
    panels: Sequence[tuple[str, str, Mapping[str, Sequence[float]]]],
    *,
    detector_labels: Mapping[str, str] | None = None,
) -> str:
    """A dot plot: one line per detector, one dot per model (colour), one panel per (title, metric)
    where ``metric`` is ``fpr95`` (lower is better) or another metric (higher is better); a panel's
    mapping gives each model's values in ``detectors`` order, as fractions (NaN: not evaluated)."""
    import matplotlib

    n = len(detectors)
    y = np.arange(n)[::-1]
    labels = [(detector_labels or {}).get(d, d) for d in detectors]
    with matplotlib.rc_context(_STYLE):
        fig = Figure_constrained(min(2.0 + 2.6 * len(panels), 13.0), 1.0 + 0.22 * n + 0.5)
        axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
        for ax, (title, metric, values) in zip(axes, panels):
            stacked = 100 * np.vstack([np.asarray(values[m], dtype=np.float64) for m in models])
            if len(models) > 1:
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # rows with no value at all
                    ax.hlines(y, np.nanmin(stacked, axis=0), np.nanmax(stacked, axis=0), colors="#CCCCCC", linewidth=1.2, zorder=2)
            for k, model in enumerate(models):
                ax.scatter(stacked[k], y, color=MODEL_COLOURS[k % len(MODEL_COLOURS)], s=26, zorder=3,
                           edgecolors="white", linewidths=0.5, label=model)
            arrow = "lower is better" if metric == "fpr95" else "higher is better"
            ax.set_title(f"{title}\n{arrow}", loc="left", fontsize=9.5)
            ax.grid(axis="x", color="#EEEEEE", linewidth=0.6)
            lo, hi = _percent_range(stacked, metric)
            ax.set_xlim(lo - 0.03 * (hi - lo), hi + 0.03 * (hi - lo))
            ax.set_ylim(-0.7, n - 0.3)
            ax.tick_params(axis="y", length=0)
        axes[0].set_yticks(y, labels)
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside upper center", ncols=min(len(models), 6), fontsize=10)
        return png_data_uri(fig)


def _percent_range(values: np.ndarray, metric: str) -> tuple[float, float]:
    """x range of a panel: from 0 for FPR (to the largest value, in steps of 10), up to 100 for the
    other metrics (from the smallest value, in steps of 10); the whole 0-100 when nothing is finite."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 100.0
    if metric == "fpr95":
        return 0.0, float(min(100.0, max(10.0, 10 * math.ceil(finite.max() / 10))))
    return float(max(0.0, min(90.0, 10 * math.floor(finite.min() / 10)))), 100.0


def Figure_constrained(width: float, height: float):  # noqa: N802 - a constructor
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def risk_coverage_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], correct: np.ndarray, *, title: str = "") -> str:
    """Risk-coverage curves (Geifman & El-Yaniv 2017) of several detectors on one model's ID test
    predictions: ``curves`` maps a label to ``(scores, aurc)``; the optimal ordering (every correct
    prediction first) is the dashed grey line. Risk in percent; lower is better."""
    import matplotlib

    from ..metrics import risk_coverage

    n, wrong = correct.size, int((~correct).sum())
    with matplotlib.rc_context(_STYLE):
        fig = Figure_constrained(6.4, 3.4)
        ax = fig.subplots()
        k = np.arange(1, n + 1)
        ax.plot(k / n, 100 * np.maximum(k - (n - wrong), 0) / k, color="#999999", linestyle="--", linewidth=1.0, label="optimal")
        for i, (label, (scores, aurc)) in enumerate(curves.items()):
            coverage, risk = risk_coverage(scores, correct)
            ax.step(np.r_[0.0, coverage], 100 * np.r_[risk[0], risk], where="post", linewidth=1.3,
                    color=SET_COLOURS[i % len(SET_COLOURS)], label=f"{label} (AURC {100 * aurc:.2f})")
        ax.set_xlabel("coverage (share of predictions accepted)")
        ax.set_ylabel("selective risk (% wrong)")
        ax.set_xlim(0, 1)
        ax.set_ylim(bottom=0)
        ax.grid(color="#EEEEEE", linewidth=0.6)
        if title:
            ax.set_title(title, loc="left")
        ax.legend(loc="upper left", fontsize=8)
        return png_data_uri(fig)

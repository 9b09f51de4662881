"""The report's figures (matplotlib, Agg), returned as base64 PNG data URIs.

* :func:`detector_figure`: for one model and detector, a ROC panel (all OOD sets) beside one panel of
  histograms, a row per OOD set the model was evaluated on: ID against the set's scores and the
  threshold that keeps ``tpr`` of the positive class, as in Figures 1 and 3 of Liu, Wang, Owens & Li,
  "Energy-based Out-of-distribution Detection" (NeurIPS 2020), with the set's FPR and AUROC beside
  the row. Scores are ebood's OOD scores (higher = more OOD), so ID sits on the left; a log bar
  scale or the score's rank among ID scores are options (:data:`HISTOGRAM_AXES`).
* :func:`overview_figure`: every model / detector pair, ranked by its mean FPR, with the near- and
  far-OOD means of FPR and AUROC side by side.

Figures are built on :class:`matplotlib.figure.Figure` directly (no pyplot state), rendered at a
modest dpi and quantised to a 64-colour palette, which keeps a report of ~30 figures near 1 MB.
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

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


def png_data_uri(fig, *, colors: int = 64) -> str:
    """``data:image/png;base64,...`` of ``fig``, quantised to a ``colors`` palette: a few flat colours
    and the grey ramp of anti-aliased text look the same with 64 as with 16 million, at 1/4 of the size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return _png_uri(np.asarray(canvas.buffer_rgba()), colors)


def _png_uri(rgba: np.ndarray, colors: int = 64) -> str:
    from PIL import Image

    # Octree is 3x faster than median cut here and keeps the set colours apart at 64
    image = Image.fromarray(rgba[..., :3]).quantize(colors=colors, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)  # 9 is 5x slower for 5% less
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


#: histogram x axes: raw scores with linear or log bar heights, or the scores' rank among ID scores
HISTOGRAM_AXES = ("auto", "linear", "log", "rank")
SPIKE = 0.5  # "auto" turns to a log scale when one bin holds more than this share of a set
LOG_FLOOR = 0.003  # log bar heights start here (a share of the set): smaller bins show as a sliver


def id_rank(id_scores: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The share of ID scores below each of ``x`` (ties count half): ID itself is uniform on [0, 1],
    and with ID as the positive class the threshold sits at ``tpr``; an OOD set's mass right of it is
    what the detector catches."""
    ordered = np.sort(id_scores)
    below = np.searchsorted(ordered, x, side="left")
    upto = np.searchsorted(ordered, x, side="right")
    return (below + upto) / (2.0 * ordered.size)


def _shares(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(np.clip(x, edges[0], edges[-1]), bins=edges)
    return counts / max(counts.sum(), 1)


def _heights(shares: np.ndarray, log: bool) -> np.ndarray:
    """Bar heights in [0, 1]: a share of the set, or its log10 from ``LOG_FLOOR`` (floor) to 100% (top)."""
    if not log:
        return shares
    with np.errstate(divide="ignore"):
        return np.where(shares > 0, np.clip((np.log10(np.maximum(shares, LOG_FLOOR)) - math.log10(LOG_FLOOR))
                                            / -math.log10(LOG_FLOOR), 0.04, 1.0), 0.0)


def _steps(edges: np.ndarray, heights: np.ndarray, base: float) -> np.ndarray:
    """The outline of a histogram as one closed polygon (what ``stairs`` draws, without a patch per call)."""
    x = np.repeat(edges, 2)
    y = np.r_[base, np.repeat(base + heights, 2), base]
    return np.column_stack([x, y])


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


def _set_colour(i: int) -> str:
    return SET_COLOURS[i % len(SET_COLOURS)]


class _DetectorCanvas:
    """One figure layout (the sets, their groups, the reading of FPR) drawn for many detectors.

    Building axes (their ticks, labels, spines) is most of matplotlib's time, and everything but the
    data and the score axis is the same for every detector of a model: the figure is built once per
    layout and process, and each detector only swaps its curves, bars, threshold marks and numbers in.
    """

    def __init__(self, sets: Sequence[tuple[str, str]], tpr: float, positive: str) -> None:
        n = max(len(sets), 1)
        roc = 2.5
        ridge_h = max(0.34 * n, roc - 0.2)
        left, right, top, bottom, gap, labels, ridge_w = 0.5, 0.95, 0.32, 0.5, 0.45, 1.45, 5.0
        width, height = left + roc + gap + labels + ridge_w + right, top + max(ridge_h, roc) + bottom
        self.fig = _figure(width, height)
        grid = self.fig.add_gridspec(1, 2, left=left / width, right=1 - right / width, bottom=bottom / height,
                                     top=1 - top / height, width_ratios=[roc, ridge_w],
                                     wspace=(gap + labels) / ((roc + ridge_w) / 2))
        self.roc = self.fig.add_subplot(grid[0, 0])
        self.ridge = self.fig.add_subplot(grid[0, 1])
        self.n, self.tpr, self.positive = len(sets), tpr, positive
        self._static_roc(tpr, positive)
        self._static_ridge(sets, tpr, positive)
        self.drawn: list[Any] = []
        self._background()

    def _background(self) -> None:
        """Draw the static parts once (axes, fixed ticks, set names): each detector is then drawn onto
        a copy of these pixels (matplotlib's blitting), which skips laying out the same text again."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        dynamic = (self.ridge.xaxis, self.title)  # the score axis and the bar-height note change per detector
        for artist in dynamic:
            artist.set_visible(False)
        self.canvas = FigureCanvasAgg(self.fig)
        self.canvas.draw()
        self.pixels = self.canvas.copy_from_bbox(self.fig.bbox)
        for artist in dynamic:
            artist.set_visible(True)

    def png(self) -> str:
        """The figure with the artists of the last :meth:`draw`, as a PNG data URI."""
        self.canvas.restore_region(self.pixels)
        renderer = self.canvas.get_renderer()
        for artist in (*self.drawn, self.ridge.xaxis, self.title):
            artist.draw(renderer)
        return _png_uri(np.asarray(self.canvas.buffer_rgba()))

    def _static_roc(self, tpr: float, positive: str) -> None:
        ax = self.roc
        ax.plot([0, 1], [0, 1], color="#BBBBBB", linewidth=0.8)
        ax.axhline(tpr, color="#222222", linestyle=(0, (4, 2)), linewidth=0.8)
        pos, neg = ("OOD", "ID") if positive == "ood" else ("ID", "OOD")
        ax.set_xlabel(f"{neg} samples taken as {pos} (FPR)")
        ax.set_ylabel(f"{pos} samples kept (TPR)")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ticks, names = [0, 0.25, 0.5, 0.75, 1], ["0", ".25", ".5", ".75", "1"]
        ax.set_xticks(ticks, names)
        ax.set_yticks(ticks, names)
        ax.set_title("ROC", loc="left")
        ax.grid(color="#EEEEEE", linewidth=0.6)

    def _static_ridge(self, sets: Sequence[tuple[str, str]], tpr: float, positive: str) -> None:
        from matplotlib.ticker import MaxNLocator

        ax, n = self.ridge, len(sets)
        # a row per set, top to bottom; its name in the colour (and line style) of its ROC curve
        ax.set_yticks(np.arange(n) + 0.4, [f"{name} ({group})" for name, group in sets][::-1])
        for label, i in zip(ax.get_yticklabels(), range(n - 1, -1, -1)):
            label.set_color(_set_colour(i))
        ax.tick_params(axis="y", length=0)
        ax.set_ylim(0, max(n, 1))
        ax.spines["left"].set_visible(False)
        ax.grid(axis="y", color="#DDDDDD", linewidth=0.6)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.text(1.015, n - 0.02, f"{_fpr_label(tpr, positive)}  AUROC", transform=ax.get_yaxis_transform(),
                ha="left", va="bottom", fontsize=8.5, color="#555555")
        self.title = ax.set_title("", loc="left")

    def draw(self, id_scores: np.ndarray, sets: Sequence[SetScores], axis: str) -> None:
        for artist in self.drawn:
            artist.remove()
        self.drawn = []
        self._draw_roc(id_scores, sets)
        self._draw_ridge(id_scores, sets, axis)

    def _draw_roc(self, id_scores: np.ndarray, sets: Sequence[SetScores]) -> None:
        for i, s in enumerate(sets):
            fpr, tp = _roc_points(id_scores, s.scores, self.positive)
            self.drawn += self.roc.plot(fpr, tp, color=_set_colour(i), linestyle=GROUP_LINESTYLES.get(s.group, "-"), linewidth=1.3)

    def _draw_ridge(self, id_scores: np.ndarray, sets: Sequence[SetScores], axis: str) -> None:
        from matplotlib.collections import PolyCollection
        from matplotlib.colors import to_rgba

        ax, n, tpr, positive = self.ridge, len(sets), self.tpr, self.positive
        rank = axis == "rank"
        thresholds = [threshold(id_scores, s.scores, tpr, positive) for s in sets]
        xs = [id_rank(id_scores, s.scores) if rank else s.scores for s in sets]
        ref = id_rank(id_scores, id_scores) if rank else id_scores
        ts = [float(id_rank(id_scores, np.array([t]))[0]) if rank else float(t) for t in thresholds]
        if rank:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = _histogram_range(np.concatenate([ref, *xs]), ref[:0], min(ts))
            lo, hi = min(lo, min(ts)), max(hi, max(ts))
        edges = np.linspace(lo, hi, BINS + 1)
        shares = [_shares(x, edges) for x in xs]
        ref_share = _shares(ref, edges)
        if axis == "auto":
            axis = "log" if max(float(ref_share.max()), *(float(sh.max()) for sh in shares)) > SPIKE else "linear"
        log = axis == "log"
        ref_h = _heights(ref_share, log)
        id_rows, ood_rows, marks = [], [], []
        for i, (s, share, t) in enumerate(zip(sets, shares, ts)):
            base = n - 1 - i
            h = _heights(share, log)
            scale = 0.92 / max(float(h.max()), float(ref_h.max()), 1e-12)
            id_rows.append(_steps(edges, ref_h * scale, base))
            ood_rows.append(_steps(edges, h * scale, base))
            marks.append([(t, base), (t, base + 0.96)])
            fpr, auroc = s.metrics.get("fpr95", math.nan), s.metrics.get("auroc", math.nan)
            numbers = "  ".join("–" if math.isnan(v) else f"{100 * v:.1f}" for v in (fpr, auroc))
            self.drawn.append(ax.text(1.015, base + 0.45, numbers, transform=ax.get_yaxis_transform(), ha="left",
                                      va="center", fontsize=8.5, color="#222222"))
        from matplotlib.collections import LineCollection

        for rows, colour, alpha in ((id_rows, ID_COLOUR, 0.22), (ood_rows, OOD_COLOUR, 0.35)):
            self.drawn.append(ax.add_collection(PolyCollection(rows, facecolors=to_rgba(colour, alpha), edgecolors=colour,
                                                               linewidths=0.9, closed=True), autolim=False))
        self.drawn.append(ax.add_collection(LineCollection(marks, colors="#222222", linestyles=[(0, (3, 2))], linewidths=1.0),
                                            autolim=False))
        ax.set_xlim(lo, hi)
        kept = "OOD" if positive == "ood" else "ID"
        ax.set_xlabel(f"rank among ID scores (0 = most ID-like; the threshold keeps {100 * tpr:g}% of {kept})" if rank
                      else "score (higher = more OOD)")
        heights = f"log scale, {100 * LOG_FLOOR:g}% to 100%" if log else "share of the set"
        self.title.set_text(f"ID (blue) vs each OOD set; bar height: {heights}")


_CANVASES: dict[tuple[Any, ...], _DetectorCanvas] = {}


def detector_figure(
    id_scores: np.ndarray | None,
    sets: Sequence[SetScores],
    *,
    tpr: float = 0.95,
    positive: str = "id",
    axis: str = "auto",
) -> str:
    """ROC curves of every set beside one panel of score histograms (a row per set, ID against the
    set, the set's FPR and AUROC on the right); a data URI. Sets without scores are left out (a model is
    only shown on what it was evaluated on). ``axis``: one of :data:`HISTOGRAM_AXES` (``auto``: ``log``
    bar heights when a set is one spike, e.g. MSP at -1, else ``linear``; ``rank``: the score's rank
    among ID scores). The key (ID / OOD colours, line style per group) is drawn by the page, once."""
    import matplotlib

    if axis not in HISTOGRAM_AXES:
        raise ValueError(f"axis must be one of {', '.join(HISTOGRAM_AXES)}, got {axis!r}")
    id_scores = np.empty(0) if id_scores is None else np.asarray(id_scores, dtype=np.float64)
    sets = [s for s in sets if s.scores is not None and s.scores.size > 0] if id_scores.size else []
    key = (tuple((s.name, s.group) for s in sets), float(tpr), positive)
    with matplotlib.rc_context(_STYLE):
        if key not in _CANVASES:
            if len(_CANVASES) > 16:  # a few layouts per report; bound the memory all the same
                _CANVASES.clear()
            _CANVASES[key] = _DetectorCanvas(key[0], tpr, positive)
        canvas = _CANVASES[key]
        canvas.draw(id_scores, sets, axis)
        return canvas.png()


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
        # fixed margins (room for the longest detector name), not a layout engine: constrained layout
        # measured every tick label again and took most of the report's time for two figures
        left = 0.25 + 0.068 * max((len(x) for x in labels), default=4)
        width, height = min(left + 0.2 + 2.45 * len(panels), 13.0), 1.0 + 0.22 * n + 0.45
        fig = _figure(width, height)
        fig.subplots_adjust(left=left / width, right=1 - 0.2 / width, top=1 - 1.0 / height, bottom=0.45 / height,
                            wspace=0.25 / (2.45 - 0.25))
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
        fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncols=min(len(models), 6), fontsize=10)
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

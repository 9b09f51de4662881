"""The benchmark's results for the terminal (rich), in the widest layout that fits without cutting a cell.

:func:`results_table` is one table, a row per (model, detector): the FPR of every OOD set
(covariate-shift sets last, outside the means), the near- / far-OOD means of FPR and AUROC, the
published number of the protocol (``[reference]``) where there is one, and the model's ID accuracy
on its first row. The best value of each column (covariate-shift sets aside) is bold, as in the HTML
report.

:func:`fit_results` picks the layout for a terminal width. Rich squeezes a table that is too wide
until its cells read ``5…`` or nothing at all, so a layout is only chosen when its *natural* width
(every cell whole) fits; from the richest to the most compact:

``per-set`` -> ``means`` (no per-set columns) -> ``by-model`` (one table per model, the model and its
ID accuracy in the title) -> ``fpr-means`` / ``fpr-by-model`` (FPR means only) -> ``lines`` (one
wrapped line per detector, which fits any width). Columns and sets come from the results, so other
metrics and benchmarks go through the same steps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from ..tables import best_mask, metric_label, percent
from .results import OOD_GROUPS, Results, _index, _parse_rows

__all__ = ["results_table", "fit_results", "LAYOUTS", "summary_notes", "failure_results_table"]

#: the layouts :func:`fit_results` tries, richest first
LAYOUTS = ("per-set", "means", "by-model", "fpr-means", "fpr-by-model", "lines")

#: a column: (header, metric for "best", value(model, detector) as a fraction, eligible for "best")
_Column = tuple[str, str, Callable[[str, str], float], bool]


def _as_results(results: Results | Mapping[str, Any]) -> Results:
    if isinstance(results, Results):
        return results
    where = Path("results")
    return _index(Path("."), dict(results), _parse_rows(results, where), where)


def _label(res: Results, metric: str) -> str:
    return metric_label(metric, tpr=res.tpr, positive=res.positive)


def _columns(res: Results, metric: str, per_set: bool, means: Sequence[str]) -> list[_Column]:
    """The number columns, headers broken at word boundaries so a column is as narrow as its numbers."""
    columns: list[_Column] = []
    if per_set:
        columns += [(s, metric, lambda mo, de, s=s: res.value(mo, de, s, metric), True) for s in res.sets_in(OOD_GROUPS)]
    for _, name, groups in res.mean_columns():
        for m in means:
            columns.append((f"{name.replace(' mean', '')}\n{_label(res, m)}", m,
                            lambda mo, de, g=groups, m=m: res.mean(mo, de, g, m), True))
    # No "best" among covariate-shift sets: whether a detector should flag them depends on the use.
    columns += [(f"{s}\n(covariate)", metric, lambda mo, de, s=s: res.value(mo, de, s, metric), False)
                for s in res.sets_in(("covariate",))]
    reference = res.reference()
    if reference is not None:
        ref_metric, values, _ = reference
        columns.append((f"published\n{_label(res, ref_metric)}", ref_metric,
                        lambda mo, de: values.get(f"{mo}/{de}", math.nan) / 100.0, False))
    return columns


def _title(res: Results, metric: str, per_set: bool, means: Sequence[str]) -> str:
    arrow = "↓" if metric == "fpr95" else "↑"
    shown = " and ".join(f"{_label(res, m)} {'↓' if m == 'fpr95' else '↑'}" for m in means)
    if per_set:
        return f"{res.benchmark}: {_label(res, metric)} (%) {arrow} per OOD set; means of {shown}"
    return f"{res.benchmark}: means of {shown} (%)"


def _cells(res: Results, columns: Sequence[_Column], pairs: Sequence[tuple[str, str]]) -> list[list[str]]:
    values = [[fn(m, d) for m, d in pairs] for _, _, fn, _ in columns]
    best = [best_mask(v, key) if eligible else [False] * len(v) for v, (_, key, _, eligible) in zip(values, columns)]
    return [[f"[bold]{percent(v[i])}[/]" if b[i] else percent(v[i]) for v, b in zip(values, best)] for i in range(len(pairs))]


def _caption(res: Results) -> str | None:
    return "covariate-shift sets are not in the means" if res.sets_in(("covariate",)) else None


def _accuracy(res: Results, model: str) -> str:
    acc = res.id_accuracy(model)
    return "–" if acc is None else f"{100 * acc:.2f}"


def results_table(results: Results | Mapping[str, Any], *, metric: str = "fpr95", per_set: bool = True,
                  means: Sequence[str] = ("fpr95", "auroc")) -> Table:
    """A rich table of a benchmark: ``metric`` per OOD set, group means of ``means``, ID accuracy.

    ``results`` is the ``results.json`` document (a dict with ``"rows"``, ``"models"`` ...) or a
    loaded :class:`~ebood.report.results.Results`. ``per_set=False`` leaves out the per-set columns
    (for narrow terminals; the means, covariate sets, published numbers and ID accuracy stay).
    Best values are ranked over every model, as in the report.
    """
    res = _as_results(results)
    columns = _columns(res, metric, per_set, means)
    table = Table(title=_title(res, metric, per_set, means), caption=_caption(res))
    table.add_column("model", no_wrap=True)
    table.add_column("detector", no_wrap=True, style="bold")
    for name, _, _, _ in columns:
        table.add_column(name, justify="right")
    table.add_column("ID acc.", justify="right")
    current = None
    for (model, det), cells in zip(res.pairs, _cells(res, columns, res.pairs)):
        first = model != current
        if first and current is not None:
            table.add_section()
        current = model
        table.add_row(model if first else "", det, *cells, _accuracy(res, model) if first else "")
    return table


def _by_model(res: Results, metric: str, means: Sequence[str]) -> Group:
    """One table per model (its name and ID accuracy in the title): no model or accuracy column."""
    columns = _columns(res, metric, False, means)
    cells = dict(zip(res.pairs, _cells(res, columns, res.pairs)))
    tables: list[RenderableType] = [Text(_title(res, metric, False, means), style="italic", justify="center")]
    name_width = max(len(d) for _, d in res.pairs)  # the same columns in every model's table
    for model in res.models:
        table = Table(title=f"[bold]{model}[/] · ID acc. {_accuracy(res, model)}", title_justify="left")
        table.add_column("detector", no_wrap=True, style="bold", min_width=name_width)
        for name, _, _, _ in columns:
            table.add_column(name, justify="right")
        for det in res.detectors_of(model):
            table.add_row(det, *cells[(model, det)])
        tables.append(table)
    if _caption(res):
        tables.append(Text(_caption(res), style="dim"))
    return Group(*tables)


def _lines(res: Results, metric: str) -> Group:
    """A line per detector, wrapped at spaces (so no number is ever cut): fits any width."""
    columns = _columns(res, metric, False, (metric,))
    cells = dict(zip(res.pairs, _cells(res, columns, res.pairs)))
    out: list[RenderableType] = [Text(_title(res, metric, False, (metric,)), style="italic")]
    for model in res.models:
        out.append(Text.from_markup(f"[bold]{model}[/] · ID acc. {_accuracy(res, model)}"))
        for det in res.detectors_of(model):
            pairs = " · ".join(f"{name.replace(chr(10), ' ')} {value}" for (name, _, _, _), value in zip(columns, cells[(model, det)]))
            out.append(Text.from_markup(f"  [bold]{det}[/]: {pairs}"))
    if _caption(res):
        out.append(Text(_caption(res), style="dim"))
    return Group(*out)


def _layout(res: Results, name: str, metric: str) -> RenderableType:
    if name == "per-set":
        return results_table(res, metric=metric)
    if name == "means":
        return results_table(res, metric=metric, per_set=False)
    if name == "by-model":
        return _by_model(res, metric, ("fpr95", "auroc"))
    if name == "fpr-means":
        return results_table(res, metric=metric, per_set=False, means=(metric,))
    if name == "fpr-by-model":
        return _by_model(res, metric, (metric,))
    if name == "lines":
        return _lines(res, metric)
    raise ValueError(f"unknown layout {name!r}; expected one of {', '.join(LAYOUTS)}")


def natural_width(renderable: RenderableType) -> int:
    """The width ``renderable`` takes when no cell is squeezed (rich's measured maximum)."""
    return Console(width=100_000).measure(renderable).maximum


def fit_results(results: Results | Mapping[str, Any], width: int, *, metric: str = "fpr95") -> tuple[RenderableType, str]:
    """The richest layout of :data:`LAYOUTS` whose every cell is whole at ``width`` columns, and its name."""
    res = _as_results(results)
    for name in LAYOUTS[:-1]:
        renderable = _layout(res, name, metric)
        if natural_width(renderable) <= width:
            return renderable, name
    return _layout(res, "lines", metric), "lines"


def summary_notes(results: Results | Mapping[str, Any]) -> list[str]:
    """Lines to print under the table: where the published numbers come from, the hyperparameters a
    grid chose, and the run's notes (e.g. an ID accuracy far below what the benchmark expects)."""
    res = _as_results(results)
    notes = []
    reference = res.reference()
    if reference is not None and reference[2]:
        notes.append(f"published: {reference[2]}")
    selected = res.raw.get("selected_hyperparameters")
    if isinstance(selected, Mapping) and selected:
        chosen = "; ".join(f"{key}: " + ", ".join(f"{k}={v}" for k, v in params.items())
                           for key, params in selected.items() if isinstance(params, Mapping))
        notes.append(f"grid choices (on validation OOD sets): {chosen}")
    raw_notes = res.raw.get("notes")
    if isinstance(raw_notes, list):
        notes += [f"note: {n}" for n in raw_notes]
    return notes


def failure_results_table(results: Results | Mapping[str, Any]) -> Table | None:
    """Failure detection per (model, detector): misclassification AUROC and AURC on the ID test
    predictions, failure AURC over ID + OOD (mean over the OOD sets); None when not measured."""
    res = _as_results(results)
    if not res.has_failure_metrics():
        return None
    every = OOD_GROUPS + ("covariate",)
    # headers broken at words, so the table fits 80 columns with whole numbers (see fit_results)
    columns = [("misclf.\nAUROC ↑", "misclf_auroc", every), ("AURC ↓\n(ID)", "aurc", every),
               ("failure\nAURC ↓\n(ID + OOD)", "failure_aurc", OOD_GROUPS)]
    table = Table(title=f"{res.benchmark}: failure detection (%), correct predictions kept; OOD counted as failures")
    table.add_column("model", no_wrap=True)
    table.add_column("detector", no_wrap=True, style="bold")
    for name, _, _ in columns:
        table.add_column(name, justify="right")
    values = [[res.mean(m, d, groups, key) for m, d in res.pairs] for _, key, groups in columns]
    best = [best_mask(v, key) for v, (_, key, _) in zip(values, columns)]
    current = None
    for i, (model, det) in enumerate(res.pairs):
        if model != current and current is not None:
            table.add_section()
        cells = [f"[bold]{percent(v[i])}[/]" if b[i] else percent(v[i]) for v, b in zip(values, best)]
        table.add_row(model if model != current else "", det, *cells)
        current = model
    return table

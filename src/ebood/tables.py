"""Terminal tables of metrics (rich), percentages with two decimals as CONVENTIONS.md asks."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from rich.console import Console
from rich.table import Table

__all__ = ["metrics_table", "failure_table", "print_table", "percent", "metric_label", "best_mask", "LOWER_IS_BETTER", "FAILURE_COLUMNS"]

COLUMNS = (("fpr95", "FPR{tpr}"), ("auroc", "AUROC"), ("aupr_in", "AUPR-In"), ("aupr_out", "AUPR-Out"))

#: metrics where a lower value is better (the others: higher is better)
LOWER_IS_BETTER = frozenset({"fpr95", "aurc", "e_aurc", "failure_aurc"})

#: failure detection / selective prediction columns (ebood.metrics.misclassification, aurc, e_aurc)
FAILURE_COLUMNS = (("auroc", "AUROC ↑"), ("fpr95", "FPR95 ↓"), ("aupr", "AUPR ↑"), ("aurc", "AURC ↓"), ("e_aurc", "E-AURC ↓"))


def percent(x: float) -> str:
    """A fraction as a percentage with two decimals; a missing value (NaN) as an en dash."""
    return "\u2013" if math.isnan(x) else f"{100.0 * x:.2f}"


def metric_label(key: str, *, tpr: float = 0.95, positive: str = "id") -> str:
    """Column name of a metric: ``FPR95`` (``FPR95 (OOD+)`` in the OpenOOD reading), ``AUROC``, ..."""
    if key == "fpr95":
        return f"FPR{round(100 * tpr):g}" + ("" if positive == "id" else " (OOD+)")
    return dict(COLUMNS)[key]


def best_mask(values: Sequence[float], metric: str) -> list[bool]:
    """Which values are the best of the column as printed (ties at two decimals all count; NaN never)."""
    shown = [round(100.0 * v, 2) for v in values]
    finite = [v for v in shown if not math.isnan(v)]
    if not finite:
        return [False] * len(shown)
    best = min(finite) if metric in LOWER_IS_BETTER else max(finite)
    return [v == best for v in shown]


def metrics_table(
    rows: Mapping[str, Mapping[str, float]],
    mean: Mapping[str, float] | None = None,
    *,
    tpr: float = 0.95,
    positive: str = "id",
    title: str | None = None,
    first_column: str = "OOD set",
) -> Table:
    """One row per OOD set (and a bold mean row): FPR at ``tpr``, AUROC, AUPR-In, AUPR-Out in percent."""
    fpr_name = metric_label("fpr95", tpr=tpr, positive=positive)
    table = Table(title=title, show_lines=False)
    table.add_column(first_column)
    for key, label in COLUMNS:
        table.add_column(fpr_name + " ↓" if key == "fpr95" else label + " ↑", justify="right")
    for name, row in rows.items():
        table.add_row(name, *(percent(row[k]) for k, _ in COLUMNS))
    if mean is not None:
        table.add_section()
        table.add_row("mean", *(percent(mean[k]) for k, _ in COLUMNS), style="bold")
    return table


def failure_table(rows: Mapping[str, Mapping[str, float]], *, title: str | None = None, first_column: str = "task") -> Table:
    """One row per task (misclassification on ID, failure on ID + an OOD set): AUROC / FPR95 / AUPR
    with the correct predictions as the positive class, AURC and E-AURC, in percent (missing: a dash)."""
    table = Table(title=title, show_lines=False)
    table.add_column(first_column)
    for _, label in FAILURE_COLUMNS:
        table.add_column(label, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(percent(row.get(k, math.nan)) for k, _ in FAILURE_COLUMNS))
    return table


def print_table(table: Table, console: Console | None = None) -> None:
    (console or Console()).print(table)

"""Terminal tables of metrics (rich), percentages with two decimals as CONVENTIONS.md asks."""

from __future__ import annotations

from typing import Mapping

from rich.console import Console
from rich.table import Table

__all__ = ["metrics_table", "print_table", "percent"]

COLUMNS = (("fpr95", "FPR{tpr}"), ("auroc", "AUROC"), ("aupr_in", "AUPR-In"), ("aupr_out", "AUPR-Out"))


def percent(x: float) -> str:
    return f"{100.0 * x:.2f}"


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
    fpr_name = f"FPR{round(100 * tpr):g}" + ("" if positive == "id" else " (OOD+)")
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


def print_table(table: Table, console: Console | None = None) -> None:
    (console or Console()).print(table)

"""The benchmark's table for the terminal (rich): one row per (model, detector).

Columns: the FPR of every OOD set (covariate-shift sets last, outside the means), the near- / far-OOD
means of FPR and AUROC, and the model's ID accuracy on its first row. The best value of each column
(covariate-shift sets aside) is bold, as in the HTML report.
"""

from __future__ import annotations

from typing import Any, Mapping

from rich.table import Table

from ..tables import best_mask, metric_label, percent
from .results import OOD_GROUPS, Results, _index, _parse_rows

__all__ = ["results_table", "failure_results_table"]


def _as_results(results: Results | Mapping[str, Any]) -> Results:
    if isinstance(results, Results):
        return results
    from pathlib import Path

    where = Path("results")
    return _index(Path("."), dict(results), _parse_rows(results, where), where)


def results_table(results: Results | Mapping[str, Any], *, metric: str = "fpr95", per_set: bool = True) -> Table:
    """A rich table of a benchmark: ``metric`` per OOD set, group means of FPR and AUROC, ID accuracy.

    ``results`` is the ``results.json`` document (a dict with ``"rows"``, ``"models"`` ...) or a
    loaded :class:`~ebood.report.results.Results`. ``per_set=False`` leaves out the per-set columns
    (for narrow terminals; the means, covariate sets and ID accuracy stay).
    """
    res = _as_results(results)
    label = lambda m: metric_label(m, tpr=res.tpr, positive=res.positive)  # noqa: E731
    ood_sets = res.sets_in(OOD_GROUPS)
    covariate = res.sets_in(("covariate",))
    columns: list[tuple[str, str, Any]] = [(s, metric, lambda mo, de, s=s: res.value(mo, de, s, metric)) for s in ood_sets] if per_set else []
    for key, name, groups in res.mean_columns():
        for m in ("fpr95", "auroc"):
            columns.append((f"{name.replace(' mean', '')}\n{label(m)}", m, lambda mo, de, g=groups, m=m: res.mean(mo, de, g, m)))
    columns += [(f"{s}\n(covariate)", metric, lambda mo, de, s=s: res.value(mo, de, s, metric)) for s in covariate]

    arrow = "↓" if metric == "fpr95" else "↑"
    means = f"means of {label('fpr95')} ↓ and AUROC ↑"
    title = f"{res.benchmark}: {label(metric)} (%) {arrow} per OOD set; {means}" if per_set else f"{res.benchmark}: {means} (%)"
    table = Table(title=title,
                  caption="covariate-shift sets are not in the means" if covariate else None)
    table.add_column("model", no_wrap=True)
    table.add_column("detector", no_wrap=True, style="bold")
    for name, _, _ in columns:
        table.add_column(name, justify="right")
    table.add_column("ID acc.", justify="right")

    values = [[fn(m, d) for m, d in res.pairs] for _, _, fn in columns]
    n_cov = len(covariate)  # the last columns; no "best" among covariate-shift sets
    best = [best_mask(v, key) if i < len(columns) - n_cov else [False] * len(v)
            for i, (v, (_, key, _)) in enumerate(zip(values, columns))]
    current = None
    for i, (model, det) in enumerate(res.pairs):
        first = model != current
        if first and current is not None:
            table.add_section()
        current = model
        acc = res.id_accuracy(model)
        cells = [f"[bold]{percent(v[i])}[/]" if b[i] else percent(v[i]) for v, b in zip(values, best)]
        acc_text = ("–" if acc is None else f"{100 * acc:.2f}") if first else ""
        table.add_row(model if first else "", det, *cells, acc_text)
    return table


def failure_results_table(results: Results | Mapping[str, Any]) -> Table | None:
    """Failure detection per (model, detector): misclassification AUROC and AURC on the ID test
    predictions, failure AURC over ID + OOD (mean over the OOD sets); None when not measured."""
    res = _as_results(results)
    if not res.has_failure_metrics():
        return None
    every = OOD_GROUPS + ("covariate",)
    columns = [("misclf. AUROC ↑", "misclf_auroc", every), ("AURC ↓\n(ID)", "aurc", every), ("failure AURC ↓\n(ID + OOD)", "failure_aurc", OOD_GROUPS)]
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

"""Benchmark commands: ``ebood report`` (re-render a results directory's report.html).

``ebood bench`` (run a benchmark, print :func:`ebood.report.results_table`, write the results
directory and its report) registers here as well.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app, command, fail  # noqa: F401


@command("report")
def report_command(
    results_dir: Path = typer.Argument(..., help="A results directory written by `ebood bench` (results.json, scores.safetensors)."),
    all_figures: bool = typer.Option(False, "--all-figures", help="Draw histograms and ROC curves for every model and detector (default: every detector of the pre-trained model, the main scores of the fine-tuned ones)."),
) -> None:
    """Render RESULTS_DIR/report.html again from results.json and scores.safetensors; print its path."""
    from ..report import write_report

    path = write_report(results_dir, figures="all" if all_figures else "auto")
    typer.echo(str(path))

"""Benchmark commands: ``ebood report`` (re-render a results directory's report.html).

``ebood bench`` (run a benchmark, print :func:`ebood.report.results_table`, write the results
directory and its report) registers here as well.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Callable

import typer

from ..bench.presets import available_presets
from ..detectors import available as available_detectors
from ..report import write_report
from ..report.figures import HISTOGRAM_AXES
from ._app import app, command, fail  # noqa: F401
from ._help import check_choice, one_of

#: The report's figure modes, read from write_report's signature so the help cannot drift from it.
FIGURE_MODES: tuple[str, ...] = typing.get_args(typing.get_type_hints(write_report)["figures"])
_FIGURES_HELP = ("Report figures (histograms and ROC curves): " + one_of(FIGURE_MODES) + ". auto: every detector of "
                 "the pre-trained model, the main scores of the fine-tuned ones; all: every model and detector.")


@command("report", renamed={"--all-figures": ["--figures", "all"]})
def report_command(
    results_dir: Path = typer.Argument(..., help="A results directory written by `ebood bench` (results.json, scores.safetensors)."),
    figures: str = typer.Option("auto", "--figures", help=_FIGURES_HELP),
    histogram_axis: str = typer.Option("auto", "--histogram-axis", help="Score histograms: " + one_of(HISTOGRAM_AXES) + ". auto: a log scale for a set that is one spike (as MSP's at -1); rank: the score's rank among ID scores."),
) -> None:
    """Render RESULTS_DIR/report.html again from results.json and scores.safetensors; print its path."""
    path = write_report(results_dir, figures=check_choice(figures, FIGURE_MODES, "--figures"),  # type: ignore[arg-type]
                        histogram_axis=check_choice(histogram_axis, HISTOGRAM_AXES, "--histogram-axis"))
    typer.echo(str(path))


def _detector_specs(names: str | None) -> list | None:
    from ..bench.config import DetectorSpec
    from ..detectors import get

    if not names:
        return None
    specs = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        get(name)  # unknown names fail here, listing the known ones
        specs.append(DetectorSpec(name))
    return specs


@command("bench", renamed={"--out": ["--output"]})
def bench_command(
    benchmark: str = typer.Argument(None, help="fashion-mnist (real images, see docs/benchmarks.md), a preset (" + ", ".join(available_presets()) + ") or a benchmark TOML file. Omit it for the built-in offline benchmark."),
    out: Path = typer.Option(None, "--output", "-o", help="Results directory (default: ebood-results/, or the config's output)."),
    root: Path = typer.Option(None, "--root", help="Folder holding the real data sets in their official formats (default: $EBOOD_DATA)."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Trained weights for the config's model (.safetensors or .pt)."),
    outliers: str = typer.Option(None, "--outliers", help="Dataset spec of auxiliary outliers for the fine-tuned models."),
    detectors: str = typer.Option(None, "--detectors", help="Comma-separated detector names among " + ", ".join(available_detectors()) + " (default: the benchmark's, or every registered one)."),
    seed: int = typer.Option(None, "--seed", help="Seed (default: 0, or the config's)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Where trained models and extracted outputs are cached (default: $EBOOD_CACHE or ~/.cache/ebood)."),
    figures: str = typer.Option("auto", "--figures", help=_FIGURES_HELP),
    no_report: bool = typer.Option(False, "--no-report", help="Write results.json/csv and scores only, no report.html."),
    list_presets: bool = typer.Option(False, "--list-presets", help="List the shipped presets and exit."),
    show_preset: str = typer.Option(None, "--show-preset", help="Print a preset's TOML (a starting point for your own) and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output, only the table."),
) -> None:
    """Run a benchmark: the built-in one (no argument), fashion-mnist, a preset, or a TOML file; print the table, write results and report."""
    import json
    import time
    import warnings

    from rich.console import Console

    from ..bench.presets import available_presets, preset_path

    if list_presets:
        typer.echo("\n".join(available_presets()))
        return
    if show_preset:
        typer.echo(preset_path(show_preset).read_text(), nl=False)
        return
    check_choice(figures, FIGURE_MODES, "--figures")
    if out is not None:
        from ..io import check_writable

        check_writable(out, directory=True)  # before the run, not after it
    err = Console(stderr=True, soft_wrap=True)
    log = (lambda msg: None) if quiet else (lambda msg: err.print(f"[dim]ebood bench:[/] {msg}"))
    progress = not quiet
    chosen = _detector_specs(detectors)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, out_dir = _run(benchmark, out, root, checkpoint, outliers, chosen, seed, cache_dir, progress, log)
    for message in dict.fromkeys(str(w.message) for w in caught):
        log(f"[yellow]warning:[/] {message}")
    result.save(out_dir)
    _print_table(json.loads((out_dir / "results.json").read_text()))
    if not no_report:
        t = time.perf_counter()
        report = write_report(out_dir, figures=figures)  # type: ignore[arg-type]
        log(f"report rendered in {time.perf_counter() - t:.1f} s")
        typer.echo(f"report: {report}")
    typer.echo(f"results: {out_dir / 'results.json'} ({time.perf_counter() - start:.1f} s)")


def _print_table(results: dict) -> None:
    """The widest layout whose every cell is whole at the terminal's width (240 columns when output is
    not a terminal), then the published numbers' source, the grid's choices and the run's notes."""
    from rich.console import Console

    from ..report.terminal import failure_results_table, fit_results, natural_width, summary_notes

    console = Console()
    if not console.is_terminal:
        console = Console(width=240)
    renderable, layout = fit_results(results, console.width)
    console.print(renderable)
    if layout != "per-set":
        console.print(f"[dim]{console.width} columns: the {layout} layout; report.html and results.csv have every set[/]")
    failure = failure_results_table(results)
    if failure is not None and natural_width(failure) <= console.width:  # never a cut number
        console.print(failure)
    elif failure is not None:
        console.print(f"[dim]failure-detection table left out at {console.width} columns: see report.html[/]")
    for note in summary_notes(results):
        console.print(note, markup=False, highlight=False)


def _run(benchmark: str | None, out: Path | None, root: Path | None, checkpoint: Path | None, outliers: str | None,
         chosen: list | None, seed: int | None, cache_dir: Path | None, progress: bool, log: Callable[[str], None]) -> tuple[Any, Path]:
    """Run the built-in benchmark (``benchmark`` None), a preset or a TOML file; returns (result, out_dir)."""
    import dataclasses

    if benchmark is None:
        from ..bench.builtin import run_builtin

        if checkpoint or outliers or root:
            fail("--root, --checkpoint and --outliers apply to presets and TOML benchmarks, not to the built-in one")
        result = run_builtin(seed=seed or 0, cache_dir=cache_dir, detectors=chosen, progress=progress, log=log)
        return result, out or Path("ebood-results")
    if benchmark == "fashion-mnist":
        from ..bench.fashion_mnist import run_fashion_mnist

        if checkpoint or outliers:
            fail("--checkpoint and --outliers apply to presets and TOML benchmarks, not to fashion-mnist (ebood trains its models)")
        result = run_fashion_mnist(seed=seed or 0, root=root, cache_dir=cache_dir, detectors=chosen, progress=progress, log=log)
        return result, out or Path("ebood-results") / "fashion-mnist"
    from ..bench.config import load_config
    from ..bench.presets import preset_path
    from ..bench.protocol import run_config

    path = Path(benchmark)
    config = load_config(path) if path.suffix == ".toml" or path.exists() else load_config(preset_path(benchmark))
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    if chosen:
        config = dataclasses.replace(config, detectors=tuple(chosen))
    result = run_config(config, root=root, checkpoint=checkpoint, outliers=outliers, cache_dir=cache_dir,
                        progress=progress, log=log)
    return result, out or Path(config.output)

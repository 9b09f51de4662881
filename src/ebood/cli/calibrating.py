"""``ebood calibrate``: set the threshold of a saved detector, by ID coverage or by a guaranteed risk."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._app import command, fail


@command("calibrate")
def calibrate_command(
    detector: Path = typer.Argument(..., help="A saved detector (from `ebood fit`)."),
    val_file: Path = typer.Argument(..., help="Labelled ID validation outputs: logits and labels (plus what the detector reads)."),
    risk: Optional[float] = typer.Option(None, "--risk", help="Target selective risk: the share of wrong predictions among the accepted."),
    delta: float = typer.Option(0.05, "--delta", help="With --risk: the guarantee holds with probability at least 1 - delta."),
    method: str = typer.Option("sgr", "--method", help="With --risk: sgr (Geifman & El-Yaniv 2017) or ltt (Learn-then-Test)."),
    tpr: Optional[float] = typer.Option(None, "--tpr", help="Instead of --risk: the share of validation samples kept."),
    correct: Optional[Path] = typer.Option(None, "--correct", help="Whether each validation prediction was right (bool or 0/1), instead of argmax(logits) == labels."),
    head: Optional[Path] = typer.Option(None, "--head", help="The classifier head (.npz/.safetensors with head_weight, head_bias) for files that cannot hold it."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write the calibrated detector (default: replace DETECTOR, atomically)."),
) -> None:
    """Write a rejection threshold into a saved detector: `--risk R` guarantees a selective risk <= R
    with probability >= 1 - delta (accept where score <= threshold); `--tpr` keeps a share of ID."""
    from .. import io
    from .._arrays import as_correct
    from ..detectors import load
    from .detecting import read_outputs_with_head

    if (risk is None) == (tpr is None):
        fail("give exactly one of --risk (guaranteed selective risk) and --tpr (share of ID kept)")
    det = load(detector)
    outputs = read_outputs_with_head(val_file, head)
    flags = None
    if correct is not None:
        flags = as_correct(io.read_array(correct).reshape(-1), len(outputs), f"{correct}: correct")
    if risk is not None:
        det.calibrate(outputs, risk=risk, delta=delta, method=method, correct=flags)
    else:
        det.calibrate(outputs, tpr=tpr)
    target = dest = output or detector
    det.save(dest)
    if risk is not None:
        kept = float((det.score(outputs) <= det.threshold_).float().mean())
        how = f"selective risk <= {risk:g} with probability >= {1 - delta:g} ({method}); keeps {100 * kept:.2f}% of the validation set"
    else:
        how = f"keeps {100 * tpr:g}% of ID"
    typer.echo(f"wrote threshold {det.threshold_:.6g} ({how}) to {target}")

"""``ebood export`` (a model and its fitted detector as one exported module) and ``ebood serve``
(that module behind an HTTP endpoint, with Ray Serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ._app import app, command, fail  # noqa: F401

MODEL_HELP = "A built-in name (digits_cnn, wrn40_2, resnet18_cifar), an entry point package.module:function, or a TorchScript file."
SHAPE_HELP = "Shape of one input without the batch axis, e.g. 3,32,32 (default: known for the built-in models)."


def parse_shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"3,32,32"`` -> ``(3, 32, 32)``; a one-line error for anything else."""
    if text is None:
        return None
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        fail(f"--input-shape {text!r}: expected sizes separated by commas, e.g. 3,32,32")
    if not shape or any(d < 1 for d in shape):
        fail(f"--input-shape {text!r}: expected positive sizes, e.g. 3,32,32")
    return shape


def wrapped_from_options(model: str, detector: Path, checkpoint: Optional[Path], model_arg: Optional[list[str]], input_shape: Optional[str],
                         threshold: Optional[float], logits_from: Optional[str]) -> tuple[Any, Any]:
    """The wrapped module and an example batch, from the shared command-line options."""
    from ..deploy import wrap_files
    from .detecting import parse_params
    from .models import _parse_selector

    if not detector.is_file():
        fail(f"{detector}: no such detector file (write one with `ebood fit ... -o det.safetensors`)")
    kwargs = parse_params(model_arg or [])
    return wrap_files(model, detector, checkpoint=checkpoint, input_shape=parse_shape(input_shape), threshold=threshold,
                      output=_parse_selector(logits_from), **kwargs)


@command("export")
def export_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    detector: Path = typer.Option(..., "--detector", "-d", help="A fitted, calibrated detector saved by `ebood fit` (.safetensors)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write: .pt2 (torch.export), .pt (TorchScript) or .onnx."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="State dict to load into the model (.safetensors, .pt)."),
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", "-a", help="Constructor argument KEY=VALUE (repeatable), e.g. -a num_classes=100."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=SHAPE_HELP),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Decision threshold (default: the detector's calibrated one)."),
    logits_from: Optional[str] = typer.Option(None, "--logits-from", help="When the model returns a tuple or dict: the index or key of the logits."),
) -> None:
    """Write a model and its fitted detector as one module: forward gives logits, score and is_ood."""
    from ..deploy import export, format_of

    format_of(output)  # an unknown suffix fails before any work
    wrapped, example = wrapped_from_options(model, detector, checkpoint, model_arg, input_shape, threshold, logits_from)
    path = export(wrapped, example, output)
    typer.echo(f"wrote {wrapped.detector_name} on {model} (threshold {float(wrapped.threshold):.6g}, inputs {tuple(example.shape[1:])}) to {path}")

"""``ebood export`` (a model and its fitted detector as one exported module) and ``ebood serve``
(that module behind an HTTP endpoint, with Ray Serve)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Optional

import typer

from ._app import USER_ERRORS, app, command, fail  # noqa: F401

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


@command("export", renamed={"-d": ["--detector"]})
def export_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    detector: Path = typer.Option(..., "--detector", help="A fitted, calibrated detector saved by `ebood fit` (.safetensors)."),
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


@command("serve", renamed={"-d": ["--detector"]})
def serve_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    detector: Optional[Path] = typer.Option(None, "--detector", help="A fitted, calibrated detector saved by `ebood fit` (.safetensors)."),
    exported: Optional[Path] = typer.Option(None, "--exported", "-e", help="Serve a file written by `ebood export` (.pt2, .pt, .onnx) instead of --model / --detector."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="State dict to load into the model (.safetensors, .pt)."),
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", "-a", help="Constructor argument KEY=VALUE (repeatable)."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=SHAPE_HELP),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Decision threshold (default: the detector's calibrated one)."),
    logits_from: Optional[str] = typer.Option(None, "--logits-from", help="When the model returns a tuple or dict: the index or key of the logits."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    address: Optional[str] = typer.Option(None, "--address", "--ray", help="Join the Ray cluster at ADDRESS (auto, HOST:PORT, ray://...); default: start a local Ray instance. --ray ADDRESS is the same, as in `ebood score` / `ebood fit`."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Replicas of the deployment (each holds the module; metrics are per replica)."),
    max_batch_size: int = typer.Option(32, "--max-batch-size", min=1, help="Requests merged into one forward pass at most."),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", min=0.0, help="How long a request waits for others to batch with."),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", min=0.001, help="Largest request body accepted (413 beyond)."),
    max_rows: int = typer.Option(4096, "--max-rows", min=1, help="Most inputs in one request (413 beyond)."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Ray's and Serve's logs (access log included)."),
) -> None:
    """Serve a model and its detector over HTTP (Ray Serve): POST /score, GET /healthz, GET /metrics."""
    import time

    try:
        from ..deploy import serve as served
    except ImportError as exc:
        fail(str(exc))
    source: dict[str, Any]
    if exported is not None:
        if model is not None or detector is not None:
            fail("give either --exported FILE or --model and --detector, not both")
        source = {"exported": exported}
    else:
        if model is None or detector is None:
            fail("give --model and --detector (or --exported FILE written by `ebood export`)")
        if not detector.is_file():
            fail(f"{detector}: no such detector file (write one with `ebood fit ... -o det.safetensors`)")
        from .detecting import parse_params
        from .models import _parse_selector

        source = {"model": model, "detector": detector, "checkpoint": checkpoint, "input_shape": parse_shape(input_shape),
                  "threshold": threshold, "output": _parse_selector(logits_from), "model_kwargs": parse_params(model_arg or [])}
    try:
        url = served.start(source, host=host, port=port, address=address, quiet=not verbose, replicas=replicas, max_batch_size=max_batch_size,
                           batch_wait_ms=batch_wait_ms, max_body_bytes=int(max_body_mb * 2**20), max_rows=max_rows)
        typer.echo(f"serving on {url}: POST /score, GET /healthz, GET /metrics (Ctrl-C to stop)", err=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("ebood: stopping", err=True)
    except USER_ERRORS:
        raise
    except Exception as exc:  # Ray's own start-up failures: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"cannot start Ray Serve on {host}:{port}: {first}")
    finally:
        with contextlib.suppress(KeyboardInterrupt):  # Ray re-raises a second Ctrl-C while shutting down
            served.stop()  # also after Ctrl-C during start-up: nothing left running

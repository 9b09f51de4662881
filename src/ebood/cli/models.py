"""``ebood extract``: run a model once over a dataset and write its outputs as named arrays."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import typer

from ._app import app, command, echo_warnings, fail  # noqa: F401
from ._help import MODEL_HELP, DATA_SPEC_HELP, POOL_MODES, one_of

#: formats that hold several named arrays of different lengths (the head beside per-sample arrays)
OUTPUT_SUFFIXES = (".safetensors", ".npz", ".pt", ".pth")
_INPUT_KEYS = ("inputs", "x", "input")
_LABEL_KEYS = ("labels", "y", "label")


def _read_array_file(path: Path) -> Any:
    """(inputs, labels) or inputs from an .npz (keys inputs/x and optional labels/y) or .npy file."""
    import numpy as np
    import torch

    from .. import io

    arrays = io.read_arrays(path)
    if set(arrays) == {"array"}:
        inputs, labels = arrays["array"], None
    else:
        key = next((k for k in _INPUT_KEYS if k in arrays), None)
        if key is None:
            fail(f"{path}: no inputs array; expected a key named {' or '.join(_INPUT_KEYS)}, found {', '.join(arrays)}")
        inputs = arrays[key]
        labels = next((arrays[k] for k in _LABEL_KEYS if k in arrays), None)
    if inputs.dtype.kind not in "fiub":
        fail(f"{path}: inputs must be numbers, got dtype {inputs.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(inputs)).float()
    if labels is None:
        return x
    if labels.dtype.kind not in "iu" or labels.shape != (len(x),):
        fail(f"{path}: labels must be {len(x)} integers, got dtype {labels.dtype} and shape {labels.shape}")
    return x, torch.from_numpy(labels.astype(np.int64))


def open_data(spec: str, root: Optional[Path]) -> Any:
    """A dataset from a data spec (``ebood.data.open_dataset``) or an .npz / .npy file of inputs."""
    path = Path(spec)
    if path.suffix.lower() in (".npz", ".npy") and path.is_file():
        return _read_array_file(path)
    try:
        from ..data import open_dataset
    except ImportError:
        open_dataset = None
    if open_dataset is None:
        if path.suffix.lower() in (".npz", ".npy"):
            fail(f"{spec}: no such file")
        fail(f"data {spec!r}: give an .npz / .npy file of inputs (ebood.data.open_dataset is not available in this installation)")
    return open_dataset(spec, root=root)


def _split_layers(values: Optional[list[str]]) -> Optional[list[str]]:
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    return names or None


def _parse_selector(value: Optional[str]) -> Any:
    if value is None:
        return None
    return int(value) if value.lstrip("-").isdigit() else value


@command("extract", renamed={"--cache": ["--cache-dir"]})
def extract_command(
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    data: str = typer.Option(..., "--data", "-d", help=DATA_SPEC_HELP + "; or an .npz / .npy file (keys inputs / x and optional labels / y)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the outputs: .safetensors (or .npz / .pt), readable by `ebood fit` / `ebood score`."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="State dict to load: .safetensors, or .pt / .pth (read with weights_only=True)."),
    model_arg: Optional[list[str]] = typer.Option(None, "--model-arg", "-a", help="Constructor argument KEY=VALUE for a built-in or entry point (repeatable), e.g. -a num_classes=100."),
    layers: Optional[list[str]] = typer.Option(None, "--layers", "-l", help="Module names whose outputs to keep (comma-separated or repeated); default: the penultimate layer."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", min=1, help="Inputs per forward pass."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps (default: cpu)."),
    amp: Optional[str] = typer.Option(None, "--amp", help="Autocast dtype: bfloat16 or float16 (default: off)."),
    cache: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache folder: a second run with the same model and data reads the outputs from it."),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder where named datasets live (for data specs such as cifar10:test)."),
    pool: str = typer.Option("avg", "--pool", help="Reduce feature maps of named layers: " + one_of(POOL_MODES) + "."),
    logits_from: Optional[str] = typer.Option(None, "--logits-from", help="When the model returns a tuple or dict: the index or key of the logits."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (on a terminal)."),
) -> None:
    """Run a model once over a dataset: logits, features, labels and its head, for any detector."""
    from .. import io
    from ..extraction import extract
    from ..models import load_model
    from ..runtime import ModelInputError
    from .detecting import parse_params

    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        fail(f"{output}: write the outputs to {', '.join(OUTPUT_SUFFIXES)} (they hold several named arrays)")
    io.check_writable(output)
    kwargs = parse_params(model_arg or [])
    net = load_model(model, checkpoint, **kwargs)
    dataset = open_data(data, root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = extract(net, dataset, layers=_split_layers(layers), batch_size=batch_size, device=device, amp=amp, cache=cache,
                          progress=progress, output=_parse_selector(logits_from), pool=pool)  # type: ignore[arg-type]
        except ModelInputError as exc:
            fail(f"model {model} on data {data}: {exc}")
    echo_warnings(caught)
    arrays: dict[str, Any] = {"logits": out.logits}
    if isinstance(out.features, dict):
        arrays.update({f"features/{name}": t for name, t in out.features.items()})
    elif out.features is not None:
        arrays["features"] = out.features
    if out.labels is not None:
        arrays["labels"] = out.labels
    if out.head is not None:
        arrays["head_weight"] = out.head.weight
        arrays["head_bias"] = out.head.bias
    io.write_arrays(output, arrays)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
    typer.echo(f"wrote {shapes} for {len(out)} samples to {output}")

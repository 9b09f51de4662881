"""``ebood fit`` (fit a detector on training outputs, save it) and ``ebood detectors`` (list them)."""

from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from ..detectors import available
from ._app import app, command, echo_warnings, fail  # noqa: F401
from ._help import RAY_INSTALL, one_of

TRAIN_FILE_HELP = (
    "Training outputs: named arrays logits (N, C), features (N, D) or features/<layer>, labels (N,), "
    "head_weight (C, D), head_bias (C,) in .npz, .safetensors or .parquet (a parquet file cannot hold the head "
    "beside per-sample columns: give it with --head)."
)


def parse_params(specs: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: v}``; each value is parsed as JSON where possible (``90``, ``0.1``,
    ``true``, ``null``, ``[1, 2]``), otherwise kept as a string (``variant=s``)."""
    params: dict[str, Any] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            fail(f"--param {spec!r}: expected KEY=VALUE")
        if key in params:
            fail(f"--param {key!r} given twice")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params


def _read_head(path: Path) -> Any:
    from .. import io
    from ..outputs import Head

    arrays = io.read_arrays(path)
    unknown = sorted(set(arrays) - {"head_weight", "head_bias"})
    if "head_weight" not in arrays or unknown:
        found = ", ".join(arrays) or "nothing"
        fail(f"{path}: --head expects arrays head_weight (C, D) and optionally head_bias (C,); found {found}")
    try:
        return Head(arrays["head_weight"], arrays.get("head_bias"))
    except (ValueError, TypeError) as exc:
        fail(f"{path}: {exc}")


def read_head(path: Optional[Path]) -> Any:
    """The head in ``path`` (None when no file is given)."""
    return None if path is None else _read_head(path)


def ray_address(address: str) -> str | None:
    """``--ray`` value -> ``ray.init`` address: ``local`` starts a local instance (None)."""
    return None if address in ("", "local") else address


def distributed_module() -> Any:
    """:mod:`ebood.distributed`, or a one-line error saying how to install Ray."""
    try:
        from .. import distributed
    except ImportError as exc:
        fail(str(exc))
    return distributed


@contextlib.contextmanager
def connect_ray(address: str) -> Iterator[Any]:
    """Connect to (or start) Ray for one command, yielding :mod:`ebood.distributed`; shut down
    afterwards only what this command started."""
    distributed = distributed_module()
    stop = distributed.init_ray(ray_address(address))
    try:
        yield distributed
    finally:
        stop()


def read_outputs_with_head(path: Path, head_file: Optional[Path]) -> Any:
    """Outputs from ``path``; the head from ``head_file`` when given (and then not also in ``path``)."""
    from .. import io
    from ..outputs import Outputs

    outputs = io.read_outputs(path)
    if head_file is None:
        return outputs
    if outputs.head is not None:
        fail(f"{path} already holds head_weight; drop --head {head_file} or the head arrays from the file")
    try:
        return Outputs(outputs.logits, outputs.features, outputs.labels, _read_head(head_file))
    except (ValueError, TypeError) as exc:
        fail(f"{path} with --head {head_file}: {exc}")


_FIELD_KEYS = {"features": "features", "logits": "logits", "labels": "labels"}


def missing_field_message(exc: Exception, path: Path, head: Optional[Path]) -> str:
    """The detector's "needs Outputs.X" error, with how to give X in a file."""
    text = str(exc)
    if "Outputs.head" in text and head is None:
        return f"{text} (give the head with --head FILE, or head_weight / head_bias arrays in {path.name})"
    for field, key in _FIELD_KEYS.items():
        if f"Outputs.{field}" in text:
            single = " (a .npy / .csv file holds one array, read as logits)" if path.suffix.lower() in (".npy", ".csv") else ""
            return (f"{path}: {text}{single}; give the {field} as an array named {key!r} in a .npz, .safetensors or "
                    f".parquet file, e.g. numpy.savez('outputs.npz', {key}=...)")
    return text


@command("fit")
def fit_command(
    detector: str = typer.Argument(..., help="Detector name: " + one_of(available()) + " (`ebood detectors` says what each needs)."),
    train_file: Path = typer.Argument(..., help=TRAIN_FILE_HELP),
    output: Path = typer.Option(..., "-o", "--output", help="Where to save the fitted detector (safetensors + JSON header)."),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="Hyperparameter KEY=VALUE (repeatable), e.g. -p percentile=90 -p variant=b."),
    head: Optional[Path] = typer.Option(None, "--head", help="The classifier head as .npz/.safetensors with head_weight (C, D) and head_bias (C,), for training files that cannot hold it (parquet)."),
    calibrate: Optional[Path] = typer.Option(None, "--calibrate", help="ID validation outputs: set the detector's threshold (then `ebood score --predict` flags OOD)."),
    tpr: float = typer.Option(0.95, "--tpr", help="Share of ID validation samples kept by the threshold (with --calibrate)."),
    ray: Optional[str] = typer.Option(None, "--ray", help=(
        "Fit on Ray (" + RAY_INSTALL + "): TRAIN_FILE is Parquet file(s) or a directory of them; partial fits "
        "are merged in a tree (detectors whose fit is a sum over samples). ADDRESS: auto, ray://HOST:10001, or local."
    )),
    verbose: bool = typer.Option(False, "--verbose", help="With --ray: show Ray's and Ray Data's log lines and other libraries' deprecation warnings."),
) -> None:
    """Fit a detector on in-distribution training outputs and save it for `ebood score --detector`."""
    from ..detectors import MissingFieldError, create

    from ..io import check_writable

    det = create(detector, **parse_params(param or []))
    check_writable(output)  # before the fit, which can take long
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if ray is not None:
                distributed_module().check_mergeable(det)  # before starting Ray
                distributed_module().set_verbose(verbose)
                with connect_ray(ray) as dist:
                    det = dist.fit(det, train_file, head=read_head(head), sharded_knn=False)
            else:
                det.fit(read_outputs_with_head(train_file, head))
            if calibrate is not None:
                det.calibrate(read_outputs_with_head(calibrate, head), tpr=tpr)
            det.save(output)
    except MissingFieldError as exc:
        fail(missing_field_message(exc, train_file, head))
    echo_warnings(caught, verbose)
    note = "" if det.threshold_ is None else f" (threshold {det.threshold_:.6g} keeps {100 * tpr:g}% of ID)"
    typer.echo(f"wrote {det!r}{note} to {output}")


def detector_info(name: str) -> dict[str, Any]:
    """What ``ebood detectors`` shows for one detector."""
    from ..detectors import get

    cls = get(name)
    sig = inspect.signature(cls.__init__)
    hyper = {n: (None if p.default is inspect.Parameter.empty else p.default) for n, p in sig.parameters.items() if n in cls.hyperparameter_names()}
    return {
        "name": name,
        "class": cls.__name__,
        "fit": list(cls.requires + cls.fit_requires) if cls.needs_fit or cls.fit_requires else [],
        "fit_optional": not cls.needs_fit,
        "score": list(cls.requires),
        "streaming": bool(cls.streaming),
        "hyperparameters": hyper,
        "paper": cls.paper,
    }


@command("detectors")
def detectors_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the detectors: the inputs they need to fit and to score, hyperparameters, paper."""
    from rich.console import Console
    from rich.table import Table

    from ..detectors import available

    infos = [detector_info(n) for n in available()]
    if as_json:
        typer.echo(json.dumps(infos, indent=2, default=repr))
        return
    table = Table(title="ebood detectors (score: higher = more OOD)")
    table.add_column("name", no_wrap=True, style="bold")
    for column in ("fit needs", "score needs", "hyperparameters", "paper"):
        table.add_column(column, overflow="fold")
    for info in infos:
        fit = ", ".join(info["fit"]) or "-"
        if info["fit_optional"]:
            fit = f"optional: {fit}" if info["fit"] else "no fit"
        if info["streaming"]:
            fit += " (streams)"
        params = ", ".join(f"{k}={v!r}" for k, v in info["hyperparameters"].items()) or "-"
        table.add_row(info["name"], fit, ", ".join(info["score"]), params, info["paper"])
    Console().print(table)

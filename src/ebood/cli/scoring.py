"""``ebood score`` and ``ebood evaluate``: scores from files, metrics from score files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from ..scores import SCORE_NAMES
from ._app import app, command, fail  # noqa: F401
from ._help import RAY_INSTALL, check_choice, one_of

LOGIT_SCORES = SCORE_NAMES
POSITIVE_CLASSES = ("id", "ood")
RAY_HELP = (
    "Run on Ray (" + RAY_INSTALL + "): INPUT is Parquet file(s) or a directory of them, -o a directory of "
    "Parquet files written all-or-nothing. ADDRESS: auto (the running cluster), ray://HOST:10001, or local "
    "(a throwaway local instance; also what a bare --ray means)."
)


def _score_on_ray(input_file: Path, output: Path, score: str, temperature: float, detector: Optional[Path], head: Optional[Path], predict: bool, address: str, overwrite: bool, verbose: bool) -> None:
    """``ebood score ... --ray``: :func:`ebood.distributed.score` on Parquet input."""
    import warnings

    from ..detectors import create, load
    from ._app import echo_warnings
    from .detecting import connect_ray, distributed_module, read_head

    if detector is not None:
        det = load(detector)
        if predict and det.threshold_ is None:
            fail(f"{detector}: the detector has no threshold; fit it with `ebood fit ... --calibrate ID_FILE` to use --predict")
    elif score in LOGIT_SCORES:
        det = create(score, temperature=temperature) if score in ("energy", "msp") else create(score)
    else:
        fail(f"--ray scores one detector: choose --score from {', '.join(LOGIT_SCORES)} or give --detector FILE")
    distributed_module().set_verbose(verbose)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with connect_ray(address) as dist:
            out = dist.score(det, input_file, output=output, head=read_head(head), decision=predict, overwrite=overwrite)
    echo_warnings(caught, verbose)
    typer.echo(f"wrote {det.name}{' and is_ood' if predict else ''} for {input_file} to {out}/ (Parquet)")


@command("score", renamed={"-d": ["--detector"]})
def score_command(
    input_file: Path = typer.Argument(..., help="Logits (.npy/.npz/.pt/.safetensors/.parquet/.csv), or named outputs for --detector."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the scores (.npy, .npz, .csv, .parquet, .safetensors, .pt)."),
    score: str = typer.Option("energy", "--score", "-s", help="The logit score: " + one_of(LOGIT_SCORES + ("all",)) + " (all: every one, and the prediction)."),
    temperature: float = typer.Option(1.0, "--temperature", "-T", help="Softmax temperature for energy and msp."),
    detector: Optional[Path] = typer.Option(None, "--detector", help="A fitted detector file (from `ebood fit`)."),
    head: Optional[Path] = typer.Option(None, "--head", help="With --detector: the classifier head (.npz/.safetensors with head_weight, head_bias) for input files that cannot hold it (parquet)."),
    predict: bool = typer.Option(False, "--predict", help="With --detector: also write is_ood (1 = flagged) from the threshold set by `ebood fit --calibrate`."),
    ray_address: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="With --ray: replace an existing output directory."),
    verbose: bool = typer.Option(False, "--verbose", help="With --ray: show Ray's and Ray Data's log lines and other libraries' deprecation warnings."),
    strict: bool = typer.Option(False, "--strict", help="Refuse inputs with NaN or infinite values (default: score them, and say how many rows on stderr)."),
) -> None:
    """Score inputs: logit scores by name, or any fitted detector (higher = more OOD)."""
    import torch

    from .. import io, scores
    from ..detectors import load
    from .detecting import read_outputs_with_head

    if detector is None and (head is not None or predict):
        fail("--head and --predict need --detector FILE")
    if ray_address is None:
        io.check_writable(output)
    if ray_address is not None:
        _score_on_ray(input_file, output, score, temperature, detector, head, predict, ray_address, overwrite, verbose)
        return
    if detector is not None:
        det = load(detector)
        if predict and det.threshold_ is None:
            fail(f"{detector}: the detector has no threshold; fit it with `ebood fit ... --calibrate ID_FILE` to use --predict")
        values = det.score(read_outputs_with_head(input_file, head))
        _check_finite(input_file, int((~torch.isfinite(values)).sum()), values.numel(), "scores are NaN or infinite", strict)
        arrays = {det.name: values}
        if predict:
            arrays["is_ood"] = (values > det.threshold_).to(torch.int8)
    else:
        if score != "all" and score not in LOGIT_SCORES:
            fail(f"unknown score {score!r}; choose one of {', '.join(LOGIT_SCORES)}, all (or --detector FILE)")
        arrays_in = io.read_arrays(input_file)  # once: a .npy input is memory-mapped, not copied
        logits = io.choose_array(arrays_in, input_file, "logits" if "logits" in arrays_in else None)
        _check_finite(input_file, _non_finite_rows(logits), len(logits), "rows of logits hold NaN or infinite values", strict)
        result = scores.logit_scores(logits, temperature)
        arrays = {k: result[k] for k in (list(LOGIT_SCORES) + ["prediction"] if score == "all" else [score])}
    io.write_arrays(output, {k: v.cpu() for k, v in arrays.items()})
    n = next(iter(arrays.values())).numel()
    typer.echo(f"wrote {', '.join(arrays)} for {n} samples to {output}")


def _non_finite_rows(logits: np.ndarray, chunk: int = 1 << 16) -> int:
    """Rows of ``logits`` with a NaN or infinite value (in chunks: the input may be a memory map)."""
    a = np.asarray(logits)
    if a.dtype.kind not in "fc" or a.ndim == 0:
        return 0
    return sum(int((~np.isfinite(a[i:i + chunk])).reshape(len(a[i:i + chunk]), -1).any(axis=1).sum())
               for i in range(0, len(a), chunk))


def _check_finite(path: Path, bad: int, total: int, what: str, strict: bool) -> None:
    """NaN / infinity in the input: an error with --strict, else one warning line with the count."""
    if not bad:
        return
    message = f"{path}: {bad} of {total} {what}"
    if strict:
        fail(message)
    typer.echo(f"ebood: warning: {message}; their scores are not finite (--strict refuses such inputs)", err=True)


def split_key(spec: str) -> tuple[Path, Optional[str]]:
    """``FILE`` or ``FILE:KEY`` -> (file, key); a file whose own name holds a colon is taken whole."""
    path = Path(spec)
    head, sep, key = spec.rpartition(":")
    if path.exists() or not sep or not head or not key or "/" in key:
        return path, None
    return Path(head), key


def _parse_ood(specs: list[str]) -> dict[str, tuple[Path, Optional[str]]]:
    sets: dict[str, tuple[Path, Optional[str]]] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep:
            name, file = split_key(spec)[0].stem, spec
        if not name or not file:
            fail(f"--ood {spec!r}: expected FILE, NAME=FILE or NAME=FILE:KEY")
        if name in sets:
            fail(f"OOD set name {name!r} given twice")
        sets[name] = split_key(file)
    return sets


#: the name io.read_arrays gives the one array of an unnamed file (.npy, a one-column .csv)
_UNNAMED = "array"


def _read_scores(path: Path, key: Optional[str], default_key: Optional[str] = None) -> np.ndarray:
    """The scores in ``path``: the array ``key`` (from FILE:KEY), else ``default_key`` (--key) in a
    file of named arrays; a file of one unnamed array (.npy) is read as it is."""
    from .. import io

    arrays = io.read_arrays(path)
    if key is None:
        key = None if set(arrays) == {_UNNAMED} else default_key
    if key is None and len(arrays) > 1:
        fail(f"{path} holds several arrays ({', '.join(arrays)}); choose the scores with --key NAME or {path}:NAME")
    a = io.choose_array(arrays, path, key)
    if a.dtype.kind not in "fiu":
        fail(f"{path}: scores must be numbers, got dtype {a.dtype}")
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)
    if a.ndim != 1:
        fail(f"{path}: expected one score per sample (a 1-D array), got shape {a.shape}")
    from .._arrays import as_scores_1d

    return as_scores_1d(a, f"{path}: the score array")  # names the file with NaN / empty scores


@command("evaluate")
def evaluate_command(
    id_scores: str = typer.Option(..., "--id", help="Scores of in-distribution test samples: FILE or FILE:KEY."),
    ood: list[str] = typer.Option(..., "--ood", help="Scores of an OOD set: FILE, NAME=FILE or NAME=FILE:KEY (repeatable)."),
    key: Optional[str] = typer.Option(None, "--key", help="The array to read from files of named arrays (.npz, .safetensors, ...), e.g. energy; "
                                      "a .npy file is read as it is, and FILE:KEY chooses per file."),
    tpr: float = typer.Option(0.95, "--tpr", help="True positive rate for the FPR column."),
    positive: str = typer.Option("id", "--positive", help="Positive class of the FPR: " + one_of(POSITIVE_CLASSES) + " (id: the energy paper's; ood: OpenOOD's)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (fractions) instead of a table."),
) -> None:
    """Metrics (FPR@TPR, AUROC, AUPR-In, AUPR-Out) of ID vs each OOD set, and their mean."""
    from .. import metrics
    from ..tables import metrics_table, print_table

    check_choice(positive, POSITIVE_CLASSES, "--positive")
    if not 0.0 < tpr <= 1.0:
        fail(f"--tpr must be in (0, 1], got {tpr!r}")
    id_a = _read_scores(*split_key(id_scores), key)
    rows = {}
    for name, (path, file_key) in _parse_ood(ood).items():
        try:
            rows[name] = metrics.evaluate(id_a, _read_scores(path, file_key, key), tpr=tpr, positive=positive)
        except ValueError as exc:
            fail(f"{path}: {exc}")
    mean = {m: float(np.mean([r[m] for r in rows.values()])) for m in metrics.METRIC_NAMES}
    if as_json:
        typer.echo(json.dumps({"tpr": tpr, "positive": positive, "sets": rows, "mean": mean}, indent=2))
        return
    print_table(metrics_table(rows, mean, tpr=tpr, positive=positive))

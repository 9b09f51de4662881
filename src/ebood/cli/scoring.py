"""``ebood score`` and ``ebood evaluate``: scores from files, metrics from score files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from ._app import app, command, fail  # noqa: F401

LOGIT_SCORES = ("energy", "msp", "max_logit", "entropy")
RAY_HELP = (
    "Run on Ray (pip install 'ebood\\[ray]'): INPUT is Parquet file(s) or a directory of them, -o a directory of "
    "Parquet files written all-or-nothing. ADDRESS: auto (the running cluster), ray://HOST:10001, or local "
    "(a throwaway local instance; also what a bare --ray means)."
)


def _score_on_ray(input_file: Path, output: Path, score: str, temperature: float, detector: Optional[Path], head: Optional[Path], predict: bool, address: str, overwrite: bool) -> None:
    """``ebood score ... --ray``: :func:`ebood.distributed.score` on Parquet input."""
    from ..detectors import create, load
    from .detecting import connect_ray, read_head

    if detector is not None:
        det = load(detector)
        if predict and det.threshold_ is None:
            fail(f"{detector}: the detector has no threshold; fit it with `ebood fit ... --calibrate ID_FILE` to use --predict")
    elif score in LOGIT_SCORES:
        det = create(score, temperature=temperature) if score in ("energy", "msp") else create(score)
    else:
        fail(f"--ray scores one detector: choose --score from {', '.join(LOGIT_SCORES)} or give --detector FILE")
    with connect_ray(address) as dist:
        out = dist.score(det, input_file, output=output, head=read_head(head), decision=predict, overwrite=overwrite)
    typer.echo(f"wrote {det.name}{' and is_ood' if predict else ''} for {input_file} to {out}/ (Parquet)")


@command("score")
def score_command(
    input_file: Path = typer.Argument(..., help="Logits (.npy/.npz/.pt/.safetensors/.parquet/.csv), or named outputs for --detector."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the scores (.npy, .npz, .csv, .parquet, .safetensors, .pt)."),
    score: str = typer.Option("energy", "--score", "-s", help="energy | msp | max_logit | entropy | all"),
    temperature: float = typer.Option(1.0, "--temperature", "-T", help="Softmax temperature for energy and msp."),
    detector: Optional[Path] = typer.Option(None, "--detector", "-d", help="A fitted detector file (from `ebood fit`)."),
    head: Optional[Path] = typer.Option(None, "--head", help="With --detector: the classifier head (.npz/.safetensors with head_weight, head_bias) for input files that cannot hold it (parquet)."),
    predict: bool = typer.Option(False, "--predict", help="With --detector: also write is_ood (1 = flagged) from the threshold set by `ebood fit --calibrate`."),
    ray_address: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="With --ray: replace an existing output directory."),
) -> None:
    """Score inputs: logit scores by name, or any fitted detector (higher = more OOD)."""
    import torch

    from .. import io, scores
    from ..detectors import MissingFieldError, load
    from .detecting import missing_field_message, read_outputs_with_head

    if detector is None and (head is not None or predict):
        fail("--head and --predict need --detector FILE")
    if ray_address is None:
        io.check_writable(output)
    if ray_address is not None:
        _score_on_ray(input_file, output, score, temperature, detector, head, predict, ray_address, overwrite)
        return
    if detector is not None:
        det = load(detector)
        if predict and det.threshold_ is None:
            fail(f"{detector}: the detector has no threshold; fit it with `ebood fit ... --calibrate ID_FILE` to use --predict")
        try:
            values = det.score(read_outputs_with_head(input_file, head))
        except MissingFieldError as exc:
            fail(missing_field_message(exc, input_file, head))
        arrays = {det.name: values}
        if predict:
            arrays["is_ood"] = (values > det.threshold_).to(torch.int8)
    else:
        if score != "all" and score not in LOGIT_SCORES:
            fail(f"unknown score {score!r}; choose one of {', '.join(LOGIT_SCORES)}, all (or --detector FILE)")
        arrays_in = io.read_arrays(input_file)  # once: a .npy input is memory-mapped, not copied
        logits = io.choose_array(arrays_in, input_file, "logits" if "logits" in arrays_in else None)
        result = scores.logit_scores(logits, temperature)
        arrays = {k: result[k] for k in (list(LOGIT_SCORES) + ["prediction"] if score == "all" else [score])}
    io.write_arrays(output, {k: v.cpu() for k, v in arrays.items()})
    n = next(iter(arrays.values())).numel()
    typer.echo(f"wrote {', '.join(arrays)} for {n} samples to {output}")


def _parse_ood(specs: list[str]) -> dict[str, Path]:
    sets: dict[str, Path] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep:
            name, file = Path(spec).stem, spec
        if not name or not file:
            fail(f"--ood {spec!r}: expected FILE or NAME=FILE")
        if name in sets:
            fail(f"OOD set name {name!r} given twice")
        sets[name] = Path(file)
    return sets


def _read_scores(path: Path, key: Optional[str]) -> np.ndarray:
    from .. import io

    arrays = io.read_arrays(path)
    if key is None and len(arrays) > 1:
        fail(f"{path} holds several arrays ({', '.join(arrays)}); choose the scores with --key NAME")
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
    id_scores: Path = typer.Option(..., "--id", help="Scores of in-distribution test samples."),
    ood: list[str] = typer.Option(..., "--ood", help="Scores of an OOD set: FILE or NAME=FILE (repeatable)."),
    key: Optional[str] = typer.Option(None, "--key", help="Array name inside multi-array files (e.g. energy)."),
    tpr: float = typer.Option(0.95, "--tpr", help="True positive rate for the FPR column."),
    positive: str = typer.Option("id", "--positive", help="Positive class of the FPR: id (energy paper) or ood (OpenOOD)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (fractions) instead of a table."),
) -> None:
    """Metrics (FPR@TPR, AUROC, AUPR-In, AUPR-Out) of ID vs each OOD set, and their mean."""
    from .. import metrics
    from ..tables import metrics_table, print_table

    if positive not in ("id", "ood"):
        fail(f"--positive must be 'id' or 'ood', got {positive!r}")
    if not 0.0 < tpr <= 1.0:
        fail(f"--tpr must be in (0, 1], got {tpr!r}")
    id_a = _read_scores(id_scores, key)
    rows = {}
    for name, path in _parse_ood(ood).items():
        try:
            rows[name] = metrics.evaluate(id_a, _read_scores(path, key), tpr=tpr, positive=positive)
        except ValueError as exc:
            fail(f"{path}: {exc}")
    mean = {m: float(np.mean([r[m] for r in rows.values()])) for m in metrics.METRIC_NAMES}
    if as_json:
        typer.echo(json.dumps({"tpr": tpr, "positive": positive, "sets": rows, "mean": mean}, indent=2))
        return
    print_table(metrics_table(rows, mean, tpr=tpr, positive=positive))

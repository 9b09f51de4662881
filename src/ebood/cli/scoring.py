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
    from ..detectors import MissingFieldError, load
    from .detecting import missing_field_message, read_outputs_with_head

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
        try:
            values = det.score(read_outputs_with_head(input_file, head))
        except MissingFieldError as exc:
            fail(missing_field_message(exc, input_file, head))
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


def _read_correct(correct: Optional[Path], logits: Optional[Path], labels: Optional[Path], n: int) -> Optional[np.ndarray]:
    """Whether each ID prediction was right: from --correct, or argmax(--logits) == --labels."""
    from .. import io
    from .._arrays import as_correct

    if correct is not None and (logits is not None or labels is not None):
        fail("give either --correct or --logits (with --labels), not both")
    if correct is not None:
        flags = io.read_array(correct)
        try:
            return as_correct(flags.reshape(-1) if flags.ndim == 2 and 1 in flags.shape else flags, n, f"{correct}: correct")
        except (ValueError, TypeError) as exc:
            fail(f"{exc} (one flag per --id score)")
    if logits is None:
        if labels is not None:
            fail("--labels needs --logits")
        return None
    arrays = io.read_arrays(logits)
    z = arrays["logits"] if "logits" in arrays else io.read_array(logits)
    if labels is not None:
        y = io.read_array(labels, "labels" if "labels" in io.read_arrays(labels) else None)
    elif "labels" in arrays:
        y = arrays["labels"]
    else:
        fail(f"{logits} holds no 'labels' array: give the labels with --labels FILE")
    if z.ndim != 2 or y.ndim != 1 or z.shape[0] != y.shape[0] or z.shape[0] != n:
        fail(f"--logits must be (N, C) and --labels (N,) with N = {n} (the --id scores), got {tuple(z.shape)} and {tuple(y.shape)}")
    if y.dtype.kind not in "iu":
        fail(f"labels must be integer class indices, got dtype {y.dtype}")
    return z.argmax(axis=1) == y


def _failure_rows(id_a: np.ndarray, ok: np.ndarray, oods: dict[str, np.ndarray], tpr: float) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    from .. import metrics

    mis = dict(metrics.misclassification(id_a, ok, tpr=tpr), aurc=metrics.aurc(id_a, ok), e_aurc=metrics.e_aurc(id_a, ok), accuracy=float(ok.mean()))
    fail_rows = {}
    for name, o in oods.items():
        pooled_ok = np.r_[ok, np.zeros(o.size, dtype=bool)]
        fail_rows[name] = dict(metrics.failure(id_a, ok, o, tpr=tpr), e_aurc=metrics.e_aurc(np.r_[id_a, o], pooled_ok))
    return mis, fail_rows


@command("evaluate")
def evaluate_command(
    id_scores: str = typer.Option(..., "--id", help="Scores of in-distribution test samples: FILE or FILE:KEY."),
    ood: Optional[list[str]] = typer.Option(None, "--ood", help="Scores of an OOD set: FILE, NAME=FILE or NAME=FILE:KEY (repeatable)."),
    key: Optional[str] = typer.Option(None, "--key", help="The array to read from files of named arrays (.npz, .safetensors, ...), e.g. energy; "
                                      "a .npy file is read as it is, and FILE:KEY chooses per file."),
    tpr: float = typer.Option(0.95, "--tpr", help="True positive rate for the FPR column."),
    positive: str = typer.Option("id", "--positive", help="Positive class of the FPR: " + one_of(POSITIVE_CLASSES) + " (id: the energy paper's; ood: OpenOOD's)."),
    correct: Optional[Path] = typer.Option(None, "--correct", help=(
        "Whether each ID prediction was right (bool or 0/1, one per --id score): adds misclassification detection, "
        "AURC / E-AURC and, with --ood, failure detection with OOD samples counted as failures.")),
    logits: Optional[Path] = typer.Option(None, "--logits", help="Instead of --correct: the ID logits (N, C); right = argmax == label."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="With --logits: the ID labels (N,), unless the logits file holds a 'labels' array."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (fractions) instead of a table."),
) -> None:
    """Metrics (FPR@TPR, AUROC, AUPR-In, AUPR-Out) of ID vs each OOD set, and their mean; with
    --correct (or --logits and --labels) also misclassification / failure detection and AURC."""
    from .. import metrics
    from ..tables import failure_table, metrics_table, print_table

    check_choice(positive, POSITIVE_CLASSES, "--positive")
    if not 0.0 < tpr <= 1.0:
        fail(f"--tpr must be in (0, 1], got {tpr!r}")
    id_a = _read_scores(*split_key(id_scores), key)
    ok = _read_correct(correct, logits, labels, id_a.size)
    if not ood and ok is None:
        fail("nothing to evaluate: give --ood FILE (OOD detection) and/or --correct FILE or --logits FILE (failure detection)")
    oods = {name: (path, _read_scores(path, file_key, key)) for name, (path, file_key) in _parse_ood(ood or []).items()}
    report: dict = {"tpr": tpr}
    if oods:
        rows = {}
        for name, (path, o) in oods.items():
            try:
                rows[name] = metrics.evaluate(id_a, o, tpr=tpr, positive=positive)
            except ValueError as exc:
                fail(f"{path}: {exc}")
        mean = {m: float(np.mean([r[m] for r in rows.values()])) for m in metrics.METRIC_NAMES}
        report.update(positive=positive, sets=rows, mean=mean)
    if ok is not None:
        mis, fail_rows = _failure_rows(id_a, ok, {name: o for name, (_, o) in oods.items()}, tpr)
        report["misclassification"] = mis
        if fail_rows:
            report["failure"] = fail_rows
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    if oods:
        print_table(metrics_table(report["sets"], report["mean"], tpr=tpr, positive=positive))
    if ok is not None:
        tasks = {"misclassification (ID)": report["misclassification"]}
        tasks.update({f"failure (ID + {name})": r for name, r in report.get("failure", {}).items()})
        title = f"failure detection: correct predictions kept (ID accuracy {100 * report['misclassification']['accuracy']:.2f}%)"
        print_table(failure_table(tasks, title=title))

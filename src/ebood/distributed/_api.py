"""``score`` and ``fit`` on Ray Data: the public functions of :mod:`ebood.distributed`."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping

from ..detectors import Detector, available, create, get
from ..outputs import Head
from . import _knn
from ._runtime import clean_errors, remote, tree_reduce, write_parquet_atomic
from ._source import FIELDS, PROVENANCE, PartitionError, as_source, batch_outputs, spec_columns, where

#: rows per scoring batch: large enough that per-batch overhead (and, for KNN, fetching every
#: shard once per batch) is small, small enough that a (batch, C) float64 block stays ~100 MB
SCORE_BATCH_ROWS = 16_384
DECISION_COLUMN = "is_ood"
STATE_COLUMN = "state"


def mergeable() -> list[str]:
    """Names of the detectors that ``fit`` can fit on a cluster (a fit that is a sum over samples)."""
    return [n for n in available() if get(n).streaming]


def check_mergeable(det: Any) -> None:
    """TypeError unless :func:`fit` can fit ``det`` (a sum over samples, or nothing to fit)."""
    if isinstance(det, _knn.ShardedKNN):
        raise TypeError("this ShardedKNN is already fitted")
    if not det.streaming and det.needs_fit:
        raise TypeError(
            f"detector {det.name!r} fits on all its data at once, so it cannot be fitted across a cluster; "
            f"detectors that can: {', '.join(mergeable())} (or fit it on one machine with a sample of the data)"
        )


def _as_detector(detector: Detector | str | Any) -> Any:
    if isinstance(detector, str):
        return create(detector)
    if isinstance(detector, (Detector, _knn.ShardedKNN)):
        return detector
    raise TypeError(f"expected an ebood detector (or a detector name), got {type(detector).__name__}")


# ----- score ------------------------------------------------------------------------------------


def _score_block(table: Any, *, batch_size: int, **kwargs: Any) -> Any:
    """Ray Data UDF over a whole block, scored ``batch_size`` rows at a time. (Asking Ray Data
    for fixed-size batches instead would stop it fusing the read with the scoring, and every
    block would then pass through the object store between the two.)"""
    import pyarrow as pa

    parts = [_score_batch(table.slice(start, batch_size), **kwargs) for start in range(0, table.num_rows, batch_size)]
    return pa.concat_tables(parts) if parts else _score_batch(table, **kwargs)


def _score_batch(table: Any, *, detector: Any, spec: Mapping[str, Any], widths: Mapping[str, int], files: list[str] | None, head: Head | None, keys: list[str], decision: bool) -> Any:
    """Key columns, the score and (when asked) the decision of one batch."""
    import pyarrow as pa

    outputs = batch_outputs(table, spec, widths, files, head)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = detector.score(outputs).detach().cpu().numpy()
    except (ValueError, TypeError) as exc:  # e.g. a dimension that does not match the detector
        raise PartitionError(f"{where(table, files)}: {str(exc).strip().splitlines()[0]}") from None
    columns = {k: table.column(k) for k in keys}
    columns[detector.name] = pa.array(values)
    if decision:
        columns[DECISION_COLUMN] = pa.array(values > detector.threshold_)
    return pa.table(columns)


def _ready_to_score(det: Any) -> None:
    """Check the fit and derive scoring state once on the driver (not once per task)."""
    if isinstance(det, Detector):
        if "model" in det.requires:
            raise TypeError(f"detector {det.name!r} needs the model itself; ebood.distributed scores logits or features")
        det._check_fitted()
        det._ensure_final()


def score(
    detector: Detector | str | Any,
    data: Any,
    *,
    output: str | Path | None = None,
    columns: Mapping[str, Any] | None = None,
    keys: list[str] | None = None,
    head: Head | None = None,
    decision: bool | None = None,
    batch_size: int = SCORE_BATCH_ROWS,
    concurrency: int | None = None,
    overwrite: bool = False,
) -> Any:
    """Score a Ray Dataset (or Parquet file(s) / directories) of logits or features.

    ``detector``: a fitted ebood detector, a :class:`ShardedKNN` from :func:`fit`, or the name of
    a detector that needs no fit (``"energy"``, ``"msp"``, ...). ``columns`` maps the fields the
    detector reads (``logits``, ``features``) to input columns (default: the same names; a list of
    numeric columns also works). The result has the ``keys`` columns (default: every input column
    that is neither read as a field nor a list column: ids, paths, labels) plus one score column named after the detector (higher = more OOD) and,
    when the detector is calibrated (``decision=None``) or ``decision=True``, a bool ``is_ood``
    (``score > threshold_``).

    With ``output``, writes a directory of Parquet files all-or-nothing (see
    :func:`write_parquet_atomic`) and returns its path; without, returns the lazy Dataset.
    A bad row (wrong length, NaN) fails the job with a :class:`PartitionError` naming the file and
    rows.
    """
    det = _as_detector(detector)
    _ready_to_score(det)
    if decision is None:
        decision = getattr(det, "threshold_", None) is not None
    elif decision and getattr(det, "threshold_", None) is None:
        raise ValueError(f"detector {det.name!r} has no threshold: calibrate it first to write {DECISION_COLUMN}")
    needed = [f for f in det.requires if f in FIELDS]
    source, spec = as_source(data, needed, columns)
    used = {c for col in spec.values() for c in ([col] if isinstance(col, str) else col)}
    keys = [c for c in source.columns if c not in used and not source.is_list(c)] if keys is None else list(keys)
    missing = [k for k in keys if k not in source.columns]
    if missing:
        raise ValueError(f"keys: {source.describe()} has no column {', '.join(map(repr, missing))}; its columns are: {', '.join(source.columns)}")
    clash = [k for k in keys if k in (det.name, DECISION_COLUMN) or k in PROVENANCE]
    if clash:
        raise ValueError(f"keys: column(s) {', '.join(map(repr, clash))} would clash with the output columns; pass keys=[...] without them")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    kwargs = {"detector": det, "spec": spec, "widths": source.widths, "files": source.files, "head": head, "keys": keys, "decision": decision, "batch_size": batch_size}
    scored = source.read(spec_columns(spec) + keys).map_batches(
        _score_block, batch_size=None, batch_format="pyarrow", fn_kwargs=kwargs, concurrency=concurrency
    )
    if output is None:
        return scored
    return write_parquet_atomic(scored, output, overwrite=overwrite)


# ----- fit --------------------------------------------------------------------------------------


def _partial_fit(table: Any, *, name: str, params: dict[str, Any], spec: Mapping[str, Any], widths: Mapping[str, int], files: list[str] | None, head: Head | None) -> Any:
    """Ray Data UDF: the detector's partial fit (its sufficient statistics) on one block,
    pickled into one row. Ray pickles the detector between its own processes; nothing saved
    to disk is unpickled."""
    import pyarrow as pa

    outputs = batch_outputs(table, spec, widths, files, head)
    if len(outputs) == 0:
        return pa.table({STATE_COLUMN: pa.array([], pa.large_binary())})
    det = create(name, **params)
    try:
        det.partial_fit(outputs)
    except (ValueError, TypeError) as exc:
        raise PartitionError(f"{where(table, files)}: {str(exc).strip().splitlines()[0]}") from None
    return pa.table({STATE_COLUMN: pa.array([pickle.dumps(det, protocol=5)], pa.large_binary())})


def _merge_states(*tables: Any) -> Any:
    """Merge the partial fits in ``tables`` (in order) into one, returned as a one-row table."""
    import pyarrow as pa

    merged = None
    for table in tables:
        for blob in table.column(STATE_COLUMN).to_pylist():
            det = pickle.loads(blob)
            merged = det if merged is None else merged.merge(det)
    rows = [] if merged is None else [pickle.dumps(merged, protocol=5)]
    return pa.table({STATE_COLUMN: pa.array(rows, pa.large_binary())})


def _fit_knn(det: Any, source: Any, spec: Mapping[str, Any], batch_size: int | None, concurrency: int | None) -> _knn.ShardedKNN:
    import ray

    shards = source.read(spec_columns(spec)).map_batches(
        _knn.shard_from_batch, batch_size=batch_size, batch_format="pyarrow", concurrency=concurrency,
        fn_kwargs={"spec": spec, "widths": source.widths, "files": source.files},
    )
    with clean_errors("fit"):
        refs = shards.to_arrow_refs()
        shapes = ray.get([remote(_knn.shard_shape).remote(r) for r in refs])
    kept = [(r, s) for r, s in zip(refs, shapes) if s[0] > 0]
    n = sum(s[0] for _, s in kept)
    if n == 0:
        raise ValueError(f"detector 'knn': fit received no data ({source.describe()} has no rows)")
    if det.k > n:
        raise ValueError(f"knn: k={det.k} is larger than the bank of {n} training samples; use k <= {n} or fit on more samples")
    dim, dtype = kept[0][1][1], kept[0][1][2]
    return _knn.ShardedKNN(det.k, [r for r, _ in kept], [s[0] for _, s in kept], dim, dtype)


def fit(
    detector: Detector | str,
    data: Any,
    *,
    columns: Mapping[str, Any] | None = None,
    head: Head | None = None,
    batch_size: int | None = None,
    fanout: int = 8,
    concurrency: int | None = None,
    sharded_knn: bool = True,
) -> Any:
    """Fit ``detector`` on training data spread over the cluster.

    Every block (``batch_size=None``) or batch of rows computes the detector's partial fit (class
    counts, float64 sums and Chan-merged scatter matrices, ...); the partial fits are merged in a
    tree (``fanout`` at a time, in Ray tasks), and the result equals a single-process ``fit`` on
    the same rows: counts exactly, statistics to rounding (1e-9 relative in float64).
    Only detectors whose fit is a sum over samples can be fitted this way (:func:`mergeable`);
    detectors that need no fit are returned unchanged. ``head`` is the classifier head, for the
    detectors that need it (ViM, Residual, fDBD, DICE); Parquet rows cannot hold it.

    Exact KNN (``index="flat"``) returns a :class:`ShardedKNN`: one bank shard per block, left in
    the object store (``sharded_knn=False`` gathers the bank into an ordinary KNN instead).
    """
    det = _as_detector(detector)
    check_mergeable(det)
    if not det.streaming:  # nothing to fit
        return det
    needed = [f for f in det.requires + det.fit_requires if f in FIELDS]
    optional = [f for f in ("logits",) if f not in needed]  # logits tell class-based fits the class count
    source, spec = as_source(data, needed, columns, optional=optional if "labels" in needed else ())
    if det.name == "knn" and det.index == "flat" and sharded_knn:
        return _fit_knn(det, source, spec, batch_size, concurrency)
    states = source.read(spec_columns(spec)).map_batches(
        _partial_fit, batch_size=batch_size, batch_format="pyarrow", concurrency=concurrency,
        fn_kwargs={"name": det.name, "params": det.get_params(), "spec": spec, "widths": source.widths, "files": source.files, "head": head},
    )
    import ray

    with clean_errors(f"detector {det.name!r}"):
        refs = states.to_arrow_refs()
        final = ray.get(tree_reduce(refs, remote(_merge_states), fanout))
    blobs = final.column(STATE_COLUMN).to_pylist()
    if not blobs:
        raise ValueError(f"detector {det.name!r}: fit received no data ({source.describe()} has no rows)")
    fitted = pickle.loads(blobs[0])
    fitted.threshold_ = None
    return fitted

"""Exact OOD metrics over scores held across the cluster (no binning).

Each batch of pooled scores is reduced to its distinct values with ID / OOD counts, and these
rows are sorted with Ray Data's ``sort`` (a distributed range-partitioned sort: its blocks come
out in value order). A value's rows are then adjacent, though a run of them may be cut between
two blocks; the driver finds such straddling values from each block's first and last value and
adds them up itself, and every block handles its other values. Every metric of
:mod:`ebood.metrics` is a sum over distinct values ``v`` of terms that need only the counts at
``v`` and the counts below ``v``:

* AUROC ``= sum_v ood(v) (ID_below(v) + id(v) / 2) / (n_id n_ood)``
* AUPR-In ``= sum_v id(v) ID_le(v) / ALL_le(v) / n_id`` (ID positive, ranked by -score)
* AUPR-Out ``= sum_v ood(v) OOD_ge(v) / ALL_ge(v) / n_ood`` (OOD positive, ranked by score)
* FPR at TPR (ID positive): ``t`` the first ``v`` with ``ID_le(v) >= k``; ``OOD_le(t) / n_ood``.

So one pass gives each sorted block's totals, the driver turns them into prefix counts (two
integers per block), and a second pass sums each block's terms. Only per-block totals, boundary
values and partial sums reach the driver (no shuffle by hash: it would start actors).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..metrics import _check_tpr, _needed
from ._runtime import clean_errors, remote as _remote
from ._source import PartitionError, as_source, where

SCORE = "score"
OOD = "ood"
N_ID = "n_id"
N_OOD = "n_ood"


def _score_columns(table: Any, *, column: str, label: int, files: list[str] | None) -> Any:
    """Ray Data UDF: ``score`` (float64, -0.0 made 0.0 so that equal scores group together) and
    ``ood`` (0 / 1) from a batch of scores; NaN or inf is an error naming the rows."""
    import pyarrow as pa

    col = table.column(column)
    if col.null_count:
        raise PartitionError(f"{where(table, files, col.is_null().to_numpy(zero_copy_only=False))}: column {column!r} has null scores")
    if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
        raise PartitionError(f"{where(table, files)}: column {column!r} holds {col.type}, expected one number per row")
    s = col.to_numpy().astype(np.float64) + 0.0
    bad = ~np.isfinite(s)  # as ebood.metrics: an infinite score has no place on a ROC curve's axis
    if bad.any():
        raise PartitionError(f"{where(table, files, bad)}: column {column!r} has NaN or infinite scores")
    return pa.table({SCORE: s, OOD: np.full(s.shape[0], label, dtype=np.int64)})


def _default_column(names: list[str]) -> str:
    usable = [c for c in names if c not in ("is_ood",)]
    if len(usable) == 1:
        return usable[0]
    raise ValueError(f"choose the score column with column=NAME; the input has columns: {', '.join(names)}")


def _scores_dataset(data: Any, column: str | None, label: int) -> Any:
    import ray.data

    if isinstance(data, ray.data.Dataset):
        src_cols = list(data.schema().names)
        col = column or _default_column(src_cols)
        if col not in src_cols:
            raise ValueError(f"the input has no column {col!r}; its columns are: {', '.join(src_cols)}")
        return data.map_batches(_score_columns, batch_format="pyarrow", fn_kwargs={"column": col, "label": label, "files": None})
    source, _ = as_source(data, (), None)
    col = column or _default_column(_numeric_columns(source.files))
    if col not in source.columns:
        raise ValueError(f"{source.describe()} has no column {col!r}; its columns are: {', '.join(source.columns)}")
    return source.read([col]).map_batches(_score_columns, batch_format="pyarrow", fn_kwargs={"column": col, "label": label, "files": source.files})


def _numeric_columns(files: list[str] | None) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.ParquetFile(files[0]).schema_arrow
    return [f.name for f in schema if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)]


def _local_groups(table: Any) -> Any:
    """Ray Data UDF: the batch's distinct scores with their ID and OOD counts (fewer rows to sort)."""
    import pyarrow as pa

    v, n_id, n_ood = _collapse(table.column(SCORE).to_numpy(), *_id_ood(table.column(OOD).to_numpy()))
    return pa.table({SCORE: v, N_ID: n_id, N_OOD: n_ood})


def _id_ood(is_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (is_ood == 0).astype(np.int64), (is_ood != 0).astype(np.int64)


def _collapse(v: np.ndarray, n_id: np.ndarray, n_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group equal values (sorting first): distinct values ascending, summed counts."""
    order = np.argsort(v, kind="stable")
    v, n_id, n_ood = v[order], n_id[order], n_ood[order]
    if v.size == 0:
        return v, n_id, n_ood
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    return v[starts], np.add.reduceat(n_id, starts), np.add.reduceat(n_ood, starts)


def _block_groups(table: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sorted block's distinct values (rows of equal score from different batches merged)."""
    return _collapse(table.column(SCORE).to_numpy(), table.column(N_ID).to_numpy(), table.column(N_OOD).to_numpy())


def _block_summary(table: Any) -> dict[str, Any] | None:
    """Totals of a sorted block and its first and last distinct value with their counts."""
    v, n_id, n_ood = _block_groups(table)
    if v.size == 0:
        return None
    return {"n_id": int(n_id.sum()), "n_ood": int(n_ood.sum()), "first": (float(v[0]), int(n_id[0]), int(n_ood[0])), "last": (float(v[-1]), int(n_id[-1]), int(n_ood[-1]))}


def _terms(v: np.ndarray, n_id: np.ndarray, n_ood: np.ndarray, id_le: np.ndarray, ood_le: np.ndarray, totals: tuple[int, int], k: tuple[int, int]) -> dict[str, Any]:
    """Each metric's sum over the distinct values ``v`` (counts at ``v``, counts ``<= v``), and
    the FPR candidates: the smallest ``v`` accepting ``k_id`` ID samples (with the OOD accepted
    there), the largest ``v`` flagging ``k_ood`` OOD samples (with the ID flagged there)."""
    total_id, total_ood = totals
    id_ge = total_id - id_le + n_id
    ood_ge = total_ood - ood_le + n_ood
    out: dict[str, Any] = {
        "wins": float(np.sum(n_ood * ((id_le - n_id) + 0.5 * n_id))),
        "ap_in": float(np.sum(n_id * (id_le / (id_le + ood_le)))),
        "ap_out": float(np.sum(n_ood * (ood_ge / (ood_ge + id_ge)))),
        "fpr_id": None,
        "fpr_ood": None,
    }
    hit = np.flatnonzero(id_le >= k[0])
    if hit.size:
        out["fpr_id"] = (float(v[hit[0]]), int(ood_le[hit[0]]))
    hit = np.flatnonzero(ood_ge >= k[1])
    if hit.size:
        out["fpr_ood"] = (float(v[hit[-1]]), int(id_ge[hit[-1]]))
    return out


def _block_terms(table: Any, below: tuple[int, int], totals: tuple[int, int], k: tuple[int, int], skip_first: bool, skip_last: bool) -> dict[str, Any]:
    """:func:`_terms` of a sorted block's distinct values, given the counts of all blocks below;
    a first / last value shared with the neighbouring block is left to the driver (``skip_*``)."""
    v, n_id, n_ood = _block_groups(table)
    id_le = below[0] + np.cumsum(n_id)
    ood_le = below[1] + np.cumsum(n_ood)
    keep = slice(1 if skip_first else 0, v.size - 1 if skip_last and v.size > (1 if skip_first else 0) else v.size)
    return _terms(v[keep], n_id[keep], n_ood[keep], id_le[keep], ood_le[keep], totals, k)


def _shared_values(summaries: list[dict[str, Any]], prefix: list[tuple[int, int]]) -> dict[float, list[int]]:
    """Values that straddle block boundaries: ``v -> [id(v), ood(v), ID below v, OOD below v]``
    over all blocks (a sort keeps equal values adjacent, but may cut a run of them between blocks)."""
    shared: dict[float, list[int]] = {}
    n = len(summaries)
    for i, s in enumerate(summaries):
        groups = [("first", s["first"])] + ([("last", s["last"])] if s["last"][0] != s["first"][0] else [])
        for pos, (v, c_id, c_ood) in groups:
            single = s["first"][0] == s["last"][0]
            with_prev = (pos == "first") and i > 0 and summaries[i - 1]["last"][0] == v
            with_next = (pos == "last" or single) and i + 1 < n and summaries[i + 1]["first"][0] == v
            if not (with_prev or with_next):
                continue
            if v not in shared:
                at_start = pos == "first"
                below = prefix[i] if at_start else (prefix[i][0] + s["n_id"] - c_id, prefix[i][1] + s["n_ood"] - c_ood)
                shared[v] = [0, 0, below[0], below[1]]
            shared[v][0] += c_id
            shared[v][1] += c_ood
    return shared


def evaluate(id_scores: Any, ood_scores: Any, *, column: str | None = None, tpr: float = 0.95, positive: str = "id") -> dict[str, float]:
    """``{"fpr95", "auroc", "aupr_in", "aupr_out"}`` of ID vs OOD scores held across the cluster.

    ``id_scores`` / ``ood_scores``: Ray Datasets or Parquet paths (e.g. what
    :func:`ebood.distributed.score` wrote); ``column`` names the score column (default: the only
    numeric column besides ``is_ood``). Definitions and results are those of
    :func:`ebood.metrics.evaluate` on the gathered scores (exact, ties included).
    """
    tpr = _check_tpr(tpr)
    if positive not in ("id", "ood"):
        raise ValueError(f"positive must be 'id' or 'ood', got {positive!r}")
    pooled = _scores_dataset(id_scores, column, 0).union(_scores_dataset(ood_scores, column, 1))
    runs = _sorted_by_tasks(pooled.map_batches(_local_groups, batch_format="pyarrow", batch_size=None), SCORE)
    with clean_errors("evaluate"):
        blocks = runs.to_arrow_refs()
        return from_sorted_blocks(blocks, tpr, positive, _on_ray)


def _sorted_by_tasks(ds: Any, key: str) -> Any:
    """``ds.sort(key)`` with Ray Data's task-based sort shuffle. The default strategy of Ray 2.5x/2.6x
    (hash shuffle) starts aggregator actors: seconds per call on a small cluster, and a CPU held
    after the job. The setting goes on a copy of the dataset's context, not on the caller's."""
    from ray.data import Dataset
    from ray.data.context import ShuffleStrategy

    ds = Dataset.copy(ds, _deep_copy=True)  # its own DataContext (a transformed dataset shares its parent's)
    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return ds.sort(key)


def _on_ray(fn: Any, calls: list[tuple[Any, ...]]) -> list[Any]:
    """``[fn(*args) for args in calls]``, as Ray tasks next to the blocks they read."""
    import ray

    task = _remote(fn).options(num_cpus=0.25)  # light passes over one block each
    return ray.get([task.remote(*args) for args in calls])


def _locally(fn: Any, calls: list[tuple[Any, ...]]) -> list[Any]:
    return [fn(*args) for args in calls]


def from_sorted_blocks(blocks: list[Any], tpr: float, positive: str, run: Any = _locally) -> dict[str, float]:
    """The metrics from blocks of ``(score, n_id, n_ood)`` rows in ascending score order (a value
    may repeat within a block and across neighbouring blocks). ``run(fn, calls)`` runs the
    per-block passes (Ray tasks, or locally for tests)."""
    summaries = run(_block_summary, [(b,) for b in blocks])
    kept = [(b, s) for b, s in zip(blocks, summaries) if s is not None]
    blocks, summaries = [b for b, _ in kept], [s for _, s in kept]
    total_id, total_ood = sum(s["n_id"] for s in summaries), sum(s["n_ood"] for s in summaries)
    if total_id == 0 or total_ood == 0:
        raise ValueError(f"evaluate: {'id_scores' if total_id == 0 else 'ood_scores'} is empty")
    totals, k = (total_id, total_ood), (_needed(tpr, total_id), _needed(tpr, total_ood))
    prefix, below = [], (0, 0)
    for s in summaries:
        prefix.append(below)
        below = (below[0] + s["n_id"], below[1] + s["n_ood"])
    shared = _shared_values(summaries, prefix)
    calls = [(b, prefix[i], totals, k, s["first"][0] in shared, s["last"][0] in shared) for i, (b, s) in enumerate(zip(blocks, summaries))]
    terms = run(_block_terms, calls)
    if shared:
        v = np.array(sorted(shared))
        c = np.array([shared[x] for x in v], dtype=np.int64)
        terms.append(_terms(v, c[:, 0], c[:, 1], c[:, 2] + c[:, 0], c[:, 3] + c[:, 1], totals, k))
    if positive == "id":  # the smallest value accepting enough ID
        fpr = min(t["fpr_id"] for t in terms if t["fpr_id"] is not None)[1] / total_ood
    else:  # the largest value flagging enough OOD
        fpr = max(t["fpr_ood"] for t in terms if t["fpr_ood"] is not None)[1] / total_id
    return {
        "fpr95": float(fpr),
        "auroc": float(sum(t["wins"] for t in terms) / (total_id * total_ood)),
        "aupr_in": float(sum(t["ap_in"] for t in terms) / total_id),
        "aupr_out": float(sum(t["ap_out"] for t in terms) / total_ood),
    }

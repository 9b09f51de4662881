"""Inputs of the distributed functions: a Ray Dataset, or Parquet files read with row provenance.

Parquet columns follow :func:`ebood.io.read_outputs`: ``logits`` (N, C) and ``features`` (N, D)
as list columns (one list per row), ``labels`` as an integer column. A field can also be given as
a list of plain numeric columns (one per class / dimension), e.g. ``columns={"logits": ["c0", "c1"]}``.

Parquet paths are split into pieces of whole row groups of about 128 MB (one Ray Data block each), and every row
carries two hidden columns, the file's index and its row number in that file, so that a bad row
is reported as ``file.parquet: rows a..b`` wherever in the cluster it is found.
"""

from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..outputs import Head, Outputs

FILE_COLUMN = "__ebood_file"
ROW_COLUMN = "__ebood_row"
PROVENANCE = (FILE_COLUMN, ROW_COLUMN)
FIELDS = ("logits", "features", "labels")
#: uncompressed bytes per piece, Ray Data's default target block size (a piece is whole row
#: groups, so a file written with larger row groups gives larger pieces)
PIECE_BYTES = 128 * 2**20


class PartitionError(ValueError):
    """A partition of the input is bad (wrong shape, NaN where not allowed, unreadable): the
    message names the file and the rows (0-based, inclusive) where they are known."""


@dataclass
class Source:
    """A Ray Dataset plus what is known about it on the driver."""

    dataset: Any  # a Ray Dataset given by the caller (None for Parquet paths: see read())
    files: list[str] | None  # Parquet inputs: file index -> path (rows carry the index)
    columns: list[str]  # the input's column names (without the provenance columns)
    widths: dict[str, int] = field(default_factory=dict)  # expected row length per field, where known
    list_columns: set[str] = field(default_factory=set)  # columns holding one list per row

    pieces: list[dict[str, Any]] = field(default_factory=list)

    def is_list(self, column: str) -> bool:
        return column in self.list_columns

    def read(self, columns: Iterable[str]) -> Any:
        """The Ray Dataset of the input, reading only ``columns`` (plus provenance) from Parquet."""
        import ray.data

        if self.dataset is not None:
            return self.dataset
        wanted = list(dict.fromkeys(columns))
        return ray.data.read_datasource(_datasource(self.files, self.pieces, wanted), override_num_blocks=len(self.pieces))

    def describe(self) -> str:
        if self.files:
            return self.files[0] if len(self.files) == 1 else f"{len(self.files)} Parquet files under {os.path.commonpath(self.files)}"
        return "the input dataset"


# ----- finding the files ------------------------------------------------------------------------


def parquet_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Parquet files named by ``paths`` (files, directories searched recursively, or glob
    patterns; sorted).
    Names starting with ``.`` or ``_`` (temporary files, ``_SUCCESS``) are skipped, as pyarrow does."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("no input paths given")
    expanded: list[str] = []
    for item in items:  # shell-style patterns (logs/2025-*/) are expanded, sorted
        text = os.fspath(item)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not matches:
            raise FileNotFoundError(f"{text}: no file or directory matches")
        expanded.extend(matches)
    out: list[str] = []
    for item in expanded:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.parquet") if not any(part.startswith((".", "_")) for part in f.relative_to(p).parts))
            if not found:
                raise FileNotFoundError(f"{p}: the directory holds no .parquet files")
            out.extend(str(f) for f in found)
        elif p.is_file():
            out.append(str(p))
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


def _list_columns(schema: Any) -> set[str]:
    import pyarrow as pa

    kinds = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    return {f.name for f in schema if any(k(f.type) for k in kinds)}


def _pieces(files: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """One item per piece: ``{"file": i, "groups": [...], "start": first row, "rows": n, "bytes":
    uncompressed size}``; and the column names of the first file. Reads only the footers."""
    import pyarrow.parquet as pq

    pieces: list[dict[str, Any]] = []
    names: list[str] | None = None
    for i, path in enumerate(files):
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as exc:  # pyarrow raises its own types for a corrupt footer
            raise PartitionError(f"{path}: cannot read the Parquet file: {_first_line(exc)}") from None
        if names is None:
            names = list(meta.schema.to_arrow_schema().names)
        start, groups, rows, size = 0, [], 0, 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            size += meta.row_group(g).total_byte_size
            if size >= PIECE_BYTES or g == meta.num_row_groups - 1:
                if rows:
                    pieces.append({"file": i, "groups": groups, "start": start, "rows": rows, "bytes": size})
                start, groups, rows, size = start + rows, [], 0, 0
    return pieces, names or []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_piece(path: str, file_id: int, groups: list[int], start: int, columns: list[str]) -> Any:
    """Row groups of one file, with the provenance columns (file index, row number in the file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:  # one thread: a task holds one CPU, and the cluster's parallelism comes from its tasks
        table = pq.ParquetFile(path).read_row_groups(groups, columns=columns, use_threads=False)
    except Exception as exc:
        raise PartitionError(f"{path}: cannot read row groups {groups[0]}..{groups[-1]}: {_first_line(exc)}") from None
    n = table.num_rows
    table = table.append_column(FILE_COLUMN, pa.array(np.full(n, file_id, dtype=np.int32)))
    return table.append_column(ROW_COLUMN, pa.array(np.arange(start, start + n, dtype=np.int64)))


def _datasource(files: list[str], pieces: list[dict[str, Any]], columns: list[str]) -> Any:
    """A Ray Data source with one read task per piece (so each piece is one block, read where
    Ray schedules it, and Ray Data knows every block's rows and size before reading)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ParquetPieces(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return int(sum(p["bytes"] for p in pieces))

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None) -> list[Any]:
            tasks = []
            for p in pieces:
                path = files[p["file"]]
                meta = BlockMetadata(num_rows=p["rows"], size_bytes=p["bytes"], exec_stats=None, input_files=(path,))
                read = functools.partial(_read_piece_list, path, p["file"], p["groups"], p["start"], columns)
                tasks.append(ReadTask(read, meta))
            return tasks

        def get_name(self) -> str:
            return "EboodParquet"

    return ParquetPieces()


def _read_piece_list(path: str, file_id: int, groups: list[int], start: int, columns: list[str]) -> list[Any]:
    return [_read_piece(path, file_id, groups, start, columns)]


# ----- building the source ----------------------------------------------------------------------


def resolve_columns(needed: Iterable[str], columns: Mapping[str, Any] | None, available: list[str], optional: Iterable[str] = ()) -> dict[str, Any]:
    """Field -> column name (or list of numeric column names). Needed fields default to the column
    of the same name; optional fields are added where such a column exists."""
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise ValueError(f"columns: unknown field(s) {', '.join(map(repr, unknown))}; fields are {', '.join(FIELDS)}")
    spec: dict[str, Any] = {}
    for f in needed:
        spec[f] = columns.get(f, f)
    for f in optional:
        if f not in spec and (f in columns or f in available):
            spec[f] = columns.get(f, f)
    for f, col in spec.items():
        names = [col] if isinstance(col, str) else list(col)
        if f == "labels" and len(names) != 1:
            raise ValueError("columns['labels'] must be one column name")
        missing = [c for c in names if c not in available]
        if missing:
            raise ValueError(
                f"the input has no column {', '.join(map(repr, missing))} for {f}; its columns are: {', '.join(available) or '(none)'}"
                f" (map fields to columns with columns={{'{f}': NAME}})"
            )
    return spec


def spec_columns(spec: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for col in spec.values():
        out.extend([col] if isinstance(col, str) else col)
    return out


def _peek_widths(files: list[str], spec: Mapping[str, Any]) -> dict[str, int]:
    """Row length of each matrix field, from the schema (fixed-size lists) or the first row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    widths: dict[str, int] = {}
    for f, col in spec.items():
        if f == "labels":
            continue
        if not isinstance(col, str):
            widths[f] = len(col)
            continue
        for path in files:
            pf = pq.ParquetFile(path)
            t = pf.schema_arrow.field(col).type
            if pa.types.is_fixed_size_list(t):
                widths[f] = t.list_size
                break
            if pf.metadata.num_rows:
                first = next(pf.iter_batches(batch_size=1, columns=[col])).column(0)
                if first.null_count == 0 and (pa.types.is_list(t) or pa.types.is_large_list(t)):
                    widths[f] = len(first[0].values)
                break
    return widths


def as_source(data: Any, needed: Iterable[str], columns: Mapping[str, Any] | None, optional: Iterable[str] = ()) -> tuple[Source, dict[str, Any]]:
    """A :class:`Source` for a Ray Dataset or Parquet path(s), and the field -> column spec."""
    import ray.data

    if isinstance(data, ray.data.Dataset):
        schema = data.schema()
        available = [c for c in schema.names if c not in PROVENANCE]
        spec = resolve_columns(needed, columns, available, optional)
        lists = {n for n, t in zip(schema.names, schema.types) if "list" in str(t).lower() or "tensor" in str(t).lower()}
        return Source(data, None, available, list_columns=lists), spec
    files = parquet_files(data)
    pieces, available = _pieces(files)
    spec = resolve_columns(needed, columns, available, optional)
    widths = _peek_widths(files, spec)
    if not pieces:
        raise ValueError(f"{files[0] if len(files) == 1 else 'the input files'}: no rows to read")
    import pyarrow.parquet as pq

    return Source(None, files, available, widths, _list_columns(pq.ParquetFile(files[0]).schema_arrow), pieces), spec


# ----- one batch -> Outputs ---------------------------------------------------------------------


def where(table: Any, files: list[str] | None, bad: np.ndarray | None = None) -> str:
    """``file: rows a..b`` for the rows of ``table`` where ``bad`` (all rows when None)."""
    n = table.num_rows
    mask = np.ones(n, dtype=bool) if bad is None else bad
    if files is None or FILE_COLUMN not in table.column_names:
        idx = np.flatnonzero(mask)
        span = f"rows {idx[0]}..{idx[-1]}" if idx.size else "an empty batch"
        return f"the input dataset: {span} of a batch of {n} rows (pass Parquet paths to get file names and row numbers)"
    file_ids = table.column(FILE_COLUMN).to_numpy()[mask]
    rows = table.column(ROW_COLUMN).to_numpy()[mask]
    parts = []
    for fid in np.unique(file_ids):
        r = rows[file_ids == fid]
        parts.append(f"{files[int(fid)]}: rows {int(r.min())}..{int(r.max())} ({r.size} row{'s' if r.size != 1 else ''})")
    return "; ".join(parts) if parts else "an empty batch"


def _column(table: Any, name: str) -> Any:
    col = table.column(name)
    return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)


def _matrix(table: Any, field_name: str, col: Any, width: int | None, files: list[str] | None) -> np.ndarray:
    """The (N, W) float array of a field; PartitionError naming the rows of wrong length, nulls
    or non-finite values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    if not isinstance(col, str):  # one numeric column per class / dimension
        parts = []
        for name in col:
            arr = _column(table, name)
            if arr.null_count:
                bad = arr.is_null().to_numpy(zero_copy_only=False)
                raise PartitionError(f"{where(table, files, bad)}: column {name!r} ({field_name}) has null values")
            parts.append(arr.to_numpy(zero_copy_only=False))
        data = np.stack(parts, axis=1) if parts else np.empty((n, 0))
    else:
        arr = _column(table, col)
        t = arr.type
        if isinstance(t, pa.ExtensionType):  # Ray's tensor columns (ray.data.from_numpy of a 2-D array)
            data = _tensor_column(table, arr, col, field_name, files)
            return _check_values(table, data, field_name, files)
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
            raise PartitionError(f"{where(table, files)}: column {col!r} ({field_name}) holds {t}, expected one list of numbers per row")
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        nulls = arr.is_null().to_numpy(zero_copy_only=False)
        expected = width if width is not None else (int(lengths[~nulls][0]) if (~nulls).any() else 0)
        bad = nulls | (np.nan_to_num(lengths.astype(np.float64), nan=-1.0) != expected)
        if bad.any():
            got = sorted({int(v) for v in lengths[bad & ~nulls]})
            what = "null rows" if not got else f"rows of length {', '.join(map(str, got[:5]))}"
            raise PartitionError(f"{where(table, files, bad)}: column {col!r} ({field_name}) has {what}, expected length {expected}")
        data = arr.flatten().to_numpy(zero_copy_only=False).reshape(n, expected)
    return _check_values(table, data, field_name, files)


def _tensor_column(table: Any, arr: Any, col: str, field_name: str, files: list[str] | None) -> np.ndarray:
    try:
        data = np.asarray(arr.to_numpy(zero_copy_only=False))
    except Exception as exc:
        raise PartitionError(f"{where(table, files)}: column {col!r} ({field_name}) cannot be read as numbers: {_first_line(exc)}") from None
    if data.ndim != 2 or data.dtype == object:
        raise PartitionError(f"{where(table, files)}: column {col!r} ({field_name}) holds rows of shape {data.shape[1:]}, expected one vector per row")
    return data


def _check_values(table: Any, data: np.ndarray, field_name: str, files: list[str] | None) -> np.ndarray:
    """``data``, or a PartitionError naming the rows that hold NaN / infinity (or non-numbers)."""
    n = table.num_rows
    if data.dtype.kind not in "fiu":
        raise PartitionError(f"{where(table, files)}: {field_name} must be numbers, got dtype {data.dtype}")
    finite = np.isfinite(data).all(axis=1) if data.dtype.kind == "f" else np.ones(n, dtype=bool)
    if not finite.all():
        raise PartitionError(f"{where(table, files, ~finite)}: {field_name} hold NaN or infinite values")
    return data


def _labels(table: Any, col: str, files: list[str] | None) -> np.ndarray:
    arr = _column(table, col)
    if arr.null_count:
        raise PartitionError(f"{where(table, files, arr.is_null().to_numpy(zero_copy_only=False))}: column {col!r} (labels) has null values")
    values = arr.to_numpy(zero_copy_only=False)
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            raise PartitionError(f"{where(table, files, bad)}: column {col!r} (labels) holds values that are not integers")
        values = values.astype(np.int64)
    if values.dtype.kind not in "iu":
        raise PartitionError(f"{where(table, files)}: column {col!r} (labels) must hold integers, got {arr.type}")
    return values.astype(np.int64, copy=False)


def batch_outputs(table: Any, spec: Mapping[str, Any], widths: Mapping[str, int], files: list[str] | None, head: Head | None) -> Outputs:
    """:class:`ebood.Outputs` of one batch (pyarrow Table), checked row by row."""
    arrays: dict[str, np.ndarray] = {}
    for f, col in spec.items():
        arrays[f] = _labels(table, col, files) if f == "labels" else _matrix(table, f, col, widths.get(f), files)
    try:
        return Outputs(logits=arrays.get("logits"), features=arrays.get("features"), labels=arrays.get("labels"), head=head)
    except (ValueError, TypeError) as exc:
        raise PartitionError(f"{where(table, files)}: {_first_line(exc)}") from None

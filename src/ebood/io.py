"""Reading and writing named arrays: .npy, .npz, .pt (tensors only), .safetensors, .parquet, .csv.

Every reader returns a dict of name -> numpy array and raises :class:`ArrayFileError` (a
ValueError) with a one-line message for a missing, unreadable or malformed file.

Every file ebood writes goes through :func:`atomic_path` (or :func:`atomic_write_bytes` /
:func:`atomic_write_text`): it is written under a unique temporary name in its own directory
and renamed onto the target only when complete, so a reader sees the old file or the new one,
never a part; concurrent writers of one path never clash (the last rename wins); a failed write
leaves nothing but what was there before; and the file gets the usual mode (0666 minus the
umask) whatever the underlying writer does. A failure is a :class:`FileWriteError` naming the
path, the cause and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np
import torch

if TYPE_CHECKING:  # the outputs layer sits above this one: imported when read_outputs runs
    from .outputs import Outputs

__all__ = ["ArrayFileError", "FileWriteError", "read_arrays", "read_array", "choose_array", "write_arrays", "SUFFIXES",
           "atomic_path", "atomic_write_bytes", "atomic_write_text", "check_writable"]

SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors", ".parquet", ".csv")


class ArrayFileError(ValueError):
    """A file of arrays that is missing, unreadable or not in the expected layout."""


class FileWriteError(OSError):
    """A file that could not be written (a directory in the way, no permission, a full disk ...)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return str(self.strerror) if self.strerror else super().__str__()


_WRITE_HINTS = {
    errno.EISDIR: "it is a directory: give a file name (e.g. inside it)",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.ENOENT: "its directory does not exist: create it or choose another path",
    errno.EACCES: "permission denied: choose a writable location",
    errno.EPERM: "permission denied: choose a writable location",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.ENOSPC: "no space left on the device: free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded: free some space or write elsewhere",
}


def _write_error(path: Path, exc: BaseException) -> FileWriteError:
    if isinstance(exc, FileWriteError):
        return exc
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code is None:  # writers in other languages (safetensors, torch's zip writer) only say it in words
        lowered = text.lower()
        code = errno.ENOSPC if ("no space" in lowered or "storagefull" in lowered) else None
    if code in _WRITE_HINTS:
        reason = _WRITE_HINTS[code]
    elif "inline_container" in text or "enforce fail" in text or "serializ" in text.lower():
        # torch's zip writer and safetensors report a failed write by their C++ / Rust location only
        reason = "the write failed part-way: check the free space and that the folder is still there"
    else:
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        reason = f"{getattr(exc, 'strerror', None) or first}: check the path and the free space"
    return FileWriteError(code or errno.EIO, f"{path}: cannot write: {reason}")


def _unique_temp(path: Path) -> tuple[Path, int]:
    """Create a new, empty, unique file beside ``path``; return it and its mode (0666 minus the umask)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            mode = os.fstat(fd).st_mode & 0o7777
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary file beside ``path`` for the block to write (by name); then renamed onto ``path``.

    On any error in the block, or in the rename, the temporary file is removed, ``path`` is left
    as it was and the error is raised as :class:`FileWriteError` (``ValueError`` / ``TypeError``,
    which say the data were wrong, pass unchanged). The directory of ``path`` must exist.
    """
    path = Path(path)
    if path.is_dir():
        raise _write_error(path, IsADirectoryError(errno.EISDIR, "Is a directory"))
    try:
        tmp, mode = _unique_temp(path)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) replace the file with one of mode 0600
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, (ValueError, TypeError)) or not isinstance(exc, Exception):
            raise
        raise _write_error(path, exc) from exc


def check_writable(path: str | Path, directory: bool = False) -> Path:
    """Raise :class:`FileWriteError` now, before any long work, when ``path`` clearly cannot be
    written as a file (or, with ``directory=True``, as a folder of files): a directory (or a
    file) in the way, a file where a folder should be, no permission."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise FileWriteError(errno.ENOTDIR, f"{path}: cannot write: it is a file, not a directory: choose a folder")
    if directory and path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise _write_error(path, PermissionError(errno.EACCES, "Permission denied"))
        return path
    if path.is_dir():
        raise _write_error(path, IsADirectoryError(errno.EISDIR, "Is a directory"))
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise _write_error(path, NotADirectoryError(errno.ENOTDIR, "Not a directory"))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _write_error(path, PermissionError(errno.EACCES, "Permission denied"))
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def _to_numpy(value: Any, path: Path, key: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    if isinstance(value, np.ndarray):
        return value
    raise ArrayFileError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor or array")


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    """Each column is an array; a list column (one list per row) becomes a 2-D array."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if col.null_count:
            raise ArrayFileError(f"{path}: column {name!r} has {col.null_count} null value(s)")
        t = col.type
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            if lengths.size and (lengths != lengths[0]).any():
                raise ArrayFileError(f"{path}: column {name!r} has rows of different lengths")
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def _native_byte_order(a: np.ndarray) -> np.ndarray:
    """``a`` in the machine's byte order (torch refuses big-endian data on little-endian machines)."""
    if a.dtype.fields is None:
        return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))
    if all(a.dtype.fields[name][0].isnative for name in a.dtype.names):
        return a
    native = np.dtype([(name, a.dtype.fields[name][0].newbyteorder("=")) for name in a.dtype.names])
    return a.astype(native)


def _fields(a: np.ndarray) -> dict[str, np.ndarray]:
    """A structured array (several named results in one .npy) as one plain array per field."""
    if a.dtype.names is None:
        return {"array": a}
    return {name: np.ascontiguousarray(a[name]) for name in a.dtype.names}


def _read_npy(path: Path) -> dict[str, np.ndarray]:
    """A memory map (copy-on-write, so that torch can use it without a copy): read once, lazily."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ArrayFileError(
                f"{path}: not a .npy file (no NumPy header); write arrays with numpy.save, or give a .csv for text"
            )
    try:
        a = np.load(path, mmap_mode="c", allow_pickle=False)
    except ValueError as exc:
        if "pickled" in str(exc) or "object" in str(exc):
            raise ArrayFileError(f"{path}: holds Python objects (dtype object), not numbers; save a numeric array") from exc
        raise
    return _fields(_native_byte_order(a))


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    """A CSV of numbers, with or without a header row: with one, ``name`` columns are 1-D arrays
    and ``name[0], name[1], ...`` columns form one 2-D array; without, one 2-D array ``"array"``."""
    with open(path, newline="") as f:
        first = f.readline()
    names = [c.strip() for c in first.strip().split(",")] if first.strip() else []
    has_header = False
    for cell in names:
        try:
            float(cell)
        except ValueError:
            has_header = True
            break
    values = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64, skiprows=1 if has_header else 0)
    if not has_header:
        return {"array": values}
    if values.size and values.shape[1] != len(names):
        raise ArrayFileError(f"{path}: the header names {len(names)} columns, the rows have {values.shape[1]}")
    values = values.reshape(-1, len(names))
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        base = name.rsplit("[", 1)[0] if name.endswith("]") and "[" in name else name
        groups.setdefault(base, []).append(i)
    out = {}
    for base, cols in groups.items():
        out[base] = values[:, cols[0]] if len(cols) == 1 and names[cols[0]] == base else values[:, cols]
    return out


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays in ``path``, by name (``.npy`` and header-less ``.csv`` files give one array named ``"array"``).

    ``.npy`` files are memory-mapped, so a large input is read once, as it is used. Arrays stored
    big-endian are converted to the machine's byte order.
    """
    path = Path(path)
    if not path.exists():
        raise ArrayFileError(f"{path}: no such file")
    if path.is_dir():
        raise ArrayFileError(f"{path}: is a directory, not a file of arrays")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return _read_npy(path)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: _native_byte_order(z[k]) for k in z.files}
        if suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, Mapping):
                return {str(k): _to_numpy(v, path, str(k)) for k, v in obj.items()}
            return {"array": _to_numpy(obj, path, "array")}
        if suffix == ".safetensors":
            from safetensors.numpy import load_file

            try:
                return dict(load_file(str(path)))
            except Exception:  # bfloat16 has no numpy dtype: go through torch
                from safetensors.torch import load_file as load_torch

                return {k: _to_numpy(v, path, k) for k, v in load_torch(str(path)).items()}
        if suffix == ".parquet":
            return _read_parquet(path)
        if suffix == ".csv":
            return _read_csv(path)
    except ArrayFileError:
        raise
    except (OSError, ValueError, RuntimeError, EOFError, zipfile.BadZipFile, KeyError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArrayFileError(f"{path}: cannot read {suffix} file: {msg}") from exc
    except Exception as exc:  # third-party readers (pyarrow, safetensors) raise their own types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArrayFileError(f"{path}: cannot read {suffix} file: {msg}") from exc
    raise ArrayFileError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")


def choose_array(arrays: Mapping[str, np.ndarray], path: str | Path, key: str | None = None) -> np.ndarray:
    """One array of ``arrays`` (read from ``path``): the one named ``key``, or the only / first one.

    When every array is 1-D and the file is a table (parquet, CSV with a header), the columns are
    stacked into one 2-D array (one column per class).
    """
    if not arrays:
        raise ArrayFileError(f"{path}: the file holds no arrays")
    if key is not None:
        if key not in arrays:
            raise ArrayFileError(f"{path}: no array named {key!r}; the file has: {', '.join(arrays)}")
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    if Path(path).suffix.lower() in (".parquet", ".csv") and all(a.ndim == 1 for a in arrays.values()):
        return np.stack(list(arrays.values()), axis=1)
    return next(iter(arrays.values()))


def read_array(path: str | Path, key: str | None = None) -> np.ndarray:
    """One array from ``path``: the one named ``key``, or the only / first array in the file.

    A parquet file whose columns are all plain numbers is read as a 2-D array (one column per class).
    """
    return choose_array(read_arrays(path), path, key)


def _as_numpy_arrays(path: Path, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    data = {k: _to_numpy(v, path, k) if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in arrays.items()}
    if not data:
        raise ArrayFileError(f"{path}: nothing to write")
    return data


def _one_table(path: Path, data: Mapping[str, np.ndarray]) -> int:
    """The common length of arrays that go into one table (.npy with several arrays, .csv)."""
    lengths = {k: (a.shape[0] if a.ndim else 1) for k, a in data.items()}
    if len(set(lengths.values())) > 1 or any(a.ndim > 2 for a in data.values()):
        shapes = ", ".join(f"{k} {tuple(a.shape)}" for k, a in data.items())
        raise ArrayFileError(
            f"{path}: a {path.suffix} file holds one row per sample; {shapes} do not fit one table: "
            f"use .npz, .safetensors or .pt"
        )
    return next(iter(lengths.values()))


def _write_npy(f: Any, path: Path, data: Mapping[str, np.ndarray]) -> None:
    """One array as is; several (one row per sample) as a structured array with a field each."""
    if len(data) == 1:
        np.save(f, next(iter(data.values())), allow_pickle=False)
        return
    n = _one_table(path, data)
    dtype = np.dtype([(k, a.dtype, a.shape[1:] if a.ndim == 2 else ()) for k, a in data.items()])
    table = np.empty(n, dtype=dtype)
    for k, a in data.items():
        table[k] = a.reshape(n, *a.shape[1:]) if a.ndim else a
    np.save(f, table, allow_pickle=False)


def _write_csv(f: Any, path: Path, data: Mapping[str, np.ndarray]) -> None:
    """A header row, then one row per sample: ``name`` for a 1-D array, ``name[j]`` for column j of a 2-D one."""
    n = _one_table(path, data)
    header, columns = [], []
    for k, a in data.items():
        if "," in k or "\n" in k:
            raise ArrayFileError(f"{path}: array name {k!r} cannot be a CSV column name")
        a2 = a.reshape(n, -1)
        if a.ndim == 2:
            header += [f"{k}[{j}]" for j in range(a2.shape[1])]
        else:
            header.append(k)
        columns.append(a2.astype(np.float64) if a2.dtype.kind == "b" else a2)
    table = np.concatenate([c.astype(np.result_type(*[c.dtype for c in columns])) for c in columns], axis=1)
    np.savetxt(f, table, delimiter=",", fmt="%.17g", header=",".join(header), comments="")


def write_arrays(path: str | Path, arrays: Mapping[str, Any]) -> Path:
    """Write named arrays, atomically (see :func:`atomic_path`); the format follows the suffix.

    Every format takes every set of results: a ``.npy`` file holds one array, or several of one
    row per sample as a structured array (one field per name); a ``.csv`` file has a header row.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ArrayFileError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    data = _as_numpy_arrays(path, arrays)
    if suffix in (".npy", ".csv", ".parquet") and len(data) > 1:
        _one_table(path, data)  # refuse before writing anything
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(path, exc) from None
    with atomic_path(path) as tmp:
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                _write_npy(f, path, data)
        elif suffix == ".npz":
            with open(tmp, "wb") as f:  # a file object: numpy would add ".npz" to a name
                np.savez(f, **data)
        elif suffix in (".pt", ".pth"):
            torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items()}, tmp)
        elif suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in data.items()}, str(tmp))
        elif suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            cols = {k: (pa.array(list(v)) if v.ndim > 1 else pa.array(v)) for k, v in data.items()}
            pq.write_table(pa.table(cols), tmp)
        else:
            with open(tmp, "w", newline="") as f:
                _write_csv(f, path, data)
    return path


def read_outputs(path: str | Path) -> "Outputs":
    """Model outputs from a file of named arrays.

    Names: ``logits`` (N, C), ``features`` (N, D) or ``features/<layer>`` for several layers (the
    last one is the penultimate layer), ``labels`` (N,), ``head_weight`` (C, D), ``head_bias`` (C,).
    A file holding a single unnamed array (.npy, .csv) is read as logits.
    """
    from .outputs import Head, Outputs

    arrays = read_arrays(path)
    if set(arrays) == {"array"}:
        arrays = {"logits": arrays["array"]}
    known = {"logits", "features", "labels", "head_weight", "head_bias"}
    layers = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("features/")}
    if "penultimate" in layers:  # the head's input must be the last layer; safetensors stores names sorted
        layers["penultimate"] = layers.pop("penultimate")
    unknown = [k for k in arrays if k not in known and not k.startswith("features/")]
    if unknown:
        raise ArrayFileError(
            f"{path}: unexpected array name(s) {', '.join(map(repr, unknown))}; expected logits, features "
            f"(or features/<layer>), labels, head_weight, head_bias"
        )
    if "head_bias" in arrays and "head_weight" not in arrays:
        raise ArrayFileError(f"{path}: head_bias given without head_weight")
    head = Head(arrays["head_weight"], arrays.get("head_bias")) if "head_weight" in arrays else None
    features: Any = layers or arrays.get("features")
    try:
        return Outputs(logits=arrays.get("logits"), features=features, labels=arrays.get("labels"), head=head)
    except (ValueError, TypeError) as exc:
        raise ArrayFileError(f"{path}: {exc}") from exc

"""Reading and writing named arrays: .npy, .npz, .pt (tensors only), .safetensors, .parquet, .csv.

Every reader returns a dict of name -> numpy array and raises :class:`ArrayFileError` (a
ValueError) with a one-line message for a missing, unreadable or malformed file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["ArrayFileError", "read_arrays", "read_array", "write_arrays", "SUFFIXES"]

SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors", ".parquet", ".csv")


class ArrayFileError(ValueError):
    """A file of arrays that is missing, unreadable or not in the expected layout."""


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


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays in ``path``, by name (``.npy`` and ``.csv`` files give one array named ``"array"``)."""
    path = Path(path)
    if not path.exists():
        raise ArrayFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return {"array": np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
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
            return {"array": np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)}
    except ArrayFileError:
        raise
    except (OSError, ValueError, RuntimeError, EOFError, zipfile.BadZipFile, KeyError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArrayFileError(f"{path}: cannot read {suffix} file: {msg}") from exc
    except Exception as exc:  # third-party readers (pyarrow, safetensors) raise their own types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArrayFileError(f"{path}: cannot read {suffix} file: {msg}") from exc
    raise ArrayFileError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")


def read_array(path: str | Path, key: str | None = None) -> np.ndarray:
    """One array from ``path``: the one named ``key``, or the only / first array in the file.

    A parquet file whose columns are all plain numbers is read as a 2-D array (one column per class).
    """
    arrays = read_arrays(path)
    if not arrays:
        raise ArrayFileError(f"{path}: the file holds no arrays")
    if key is not None:
        if key not in arrays:
            raise ArrayFileError(f"{path}: no array named {key!r}; the file has: {', '.join(arrays)}")
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    if Path(path).suffix.lower() == ".parquet" and all(a.ndim == 1 for a in arrays.values()):
        return np.stack(list(arrays.values()), axis=1)
    return next(iter(arrays.values()))


def write_arrays(path: str | Path, arrays: Mapping[str, Any]) -> Path:
    """Write named 1-D / 2-D arrays; the format follows the suffix (.npy/.csv take exactly one array)."""
    path = Path(path)
    data = {k: _to_numpy(v, path, k) if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in arrays.items()}
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".npy", ".csv") and len(data) != 1:
        raise ArrayFileError(f"{path}: {suffix} holds one array, got {len(data)} ({', '.join(data)}); use .npz, .parquet or .safetensors")
    if suffix == ".npy":
        np.save(path, next(iter(data.values())))
    elif suffix == ".npz":
        np.savez(path, **data)
    elif suffix in (".pt", ".pth"):
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items()}, path)
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in data.items()}, str(path))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {k: (pa.array(list(v)) if v.ndim > 1 else pa.array(v)) for k, v in data.items()}
        pq.write_table(pa.table(cols), path)
    elif suffix == ".csv":
        a = next(iter(data.values()))
        np.savetxt(path, a.reshape(a.shape[0], -1) if a.ndim else a.reshape(1, 1), delimiter=",", fmt="%.17g")
    else:
        raise ArrayFileError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")
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

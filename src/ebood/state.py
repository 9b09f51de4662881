"""Saved state: tensors in safetensors, everything else in a JSON header. Never pickle.

A file is a standard safetensors file whose ``__metadata__`` holds one key, ``"ebood"``, with a
JSON document (the header). The header carries a SHA-256 over itself and every tensor, so that a
truncated or edited file is refused with a clear error instead of giving silently wrong scores.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .io import atomic_write_bytes

__all__ = ["StateError", "save_state", "load_state", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_MAX_HEADER = 100 * 2**20


class StateError(ValueError):
    """A saved-state file that cannot be used: missing, truncated, edited or of another version."""


def _digest(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> Path:
    """Write ``tensors`` and the JSON-able ``header`` to ``path`` atomically (:func:`ebood.io.atomic_path`:
    a unique temporary file, then a rename; a failure raises :class:`ebood.io.FileWriteError` and
    leaves what was there before)."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    body = dict(header, format_version=FORMAT_VERSION)
    try:
        doc = dict(body, sha256=_digest(body, tensors))
        meta = {"ebood": json.dumps(doc, sort_keys=True, allow_nan=True)}
    except TypeError as exc:
        raise TypeError(f"state header is not JSON-serialisable: {exc}") from exc
    return atomic_write_bytes(path, st_save(tensors, metadata=meta))


def _read_header(data: bytes, path: Path) -> dict[str, Any]:
    if len(data) < 8:
        raise StateError(f"{path}: file is truncated or not a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise StateError(f"{path}: file is truncated or not a safetensors file (header of {n} bytes, file of {len(data)})")
    try:
        raw = json.loads(data[8 : 8 + n])
        doc = json.loads(raw["__metadata__"]["ebood"])
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path}: not an ebood state file (no valid 'ebood' header): {exc}") from exc
    if not isinstance(doc, dict):
        raise StateError(f"{path}: the 'ebood' header is not a JSON object")
    return doc


def load_state(path: str | Path, expected_format: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_state`, verifying version and checksum."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"{path}: no such file")
    data = path.read_bytes()
    doc = _read_header(data, path)
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise StateError(
            f"{path}: state format version {version!r} (written by ebood {doc.get('ebood_version', '?')}); "
            f"this ebood reads format version {FORMAT_VERSION}"
        )
    if expected_format is not None and doc.get("format") != expected_format:
        raise StateError(f"{path}: holds {doc.get('format')!r}, expected {expected_format!r}")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for corrupt payloads
        raise StateError(f"{path}: corrupt tensor data: {exc}") from exc
    stored = doc.pop("sha256", None)
    if stored != _digest(doc, tensors):
        raise StateError(f"{path}: checksum mismatch: the file was edited or damaged after it was written")
    return tensors, doc

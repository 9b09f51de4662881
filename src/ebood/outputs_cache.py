"""The extraction cache's files: :class:`ebood.Outputs` stored under their key (see :mod:`ebood.extraction`,
"Caching") and read back, a damaged or stale entry reported and ignored, an unwritable cache folder
reported once."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from .io import FileWriteError
from .outputs import Head, Outputs
from .state import StateError, load_state, save_state

__all__ = ["CACHE_FORMAT", "read_cached_outputs", "write_cached_outputs"]

CACHE_FORMAT = "ebood.extract"


def _outputs_to_tensors(out: Outputs, layer_order: list[str] | None) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    if out.logits is not None:
        tensors["logits"] = out.logits
    if out.labels is not None:
        tensors["labels"] = out.labels
    if isinstance(out.features, dict):
        for name, t in out.features.items():
            tensors[f"features/{name}"] = t
    elif out.features is not None:
        tensors["features"] = out.features
    if out.head is not None:
        tensors["head_weight"] = out.head.weight
        tensors["head_bias"] = out.head.bias
    return tensors


def read_cached_outputs(path: Path, key: str) -> Outputs | None:
    """The outputs stored at ``path`` under ``key``; ``None`` (with a warning when the file is stale or damaged) if none."""
    if not path.is_file():
        return None
    try:
        tensors, header = load_state(path, expected_format=CACHE_FORMAT)
        if header.get("key") != key:
            raise StateError(f"{path}: entry was written for another model / data (key mismatch)")
        order = header.get("feature_layers")
        features: Any = None
        if order is not None:
            features = {name: tensors[f"features/{name}"] for name in order}
        elif "features" in tensors:
            features = tensors["features"]
        head = Head(tensors["head_weight"], tensors["head_bias"]) if "head_weight" in tensors else None
        out = Outputs(logits=tensors.get("logits"), features=features, labels=tensors.get("labels"), head=head)
        if len(out) != header.get("n"):
            raise StateError(f"{path}: holds {len(out)} samples, its header says {header.get('n')}")
        return out
    except (StateError, KeyError, ValueError, TypeError) as exc:
        warnings.warn(f"ignoring a stale or corrupt extraction cache entry, recomputing: {exc}", RuntimeWarning, stacklevel=3)
        return None


_UNWRITABLE_CACHES: set[Path] = set()


def write_cached_outputs(path: Path, key: str, out: Outputs, describe: dict[str, Any]) -> None:
    """Store ``out`` under ``path``. Concurrent writers of one entry each write a file of their own
    and rename it into place (the last rename wins; all hold the same outputs). A cache that cannot
    be written is only an optimisation lost: one warning per folder, and the outputs are returned."""
    order = list(out.features) if isinstance(out.features, dict) else None
    header = {"format": CACHE_FORMAT, "key": key, "n": len(out), "feature_layers": order, **describe}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_state(path, _outputs_to_tensors(out, order), header)
    except OSError as exc:
        folder = path.parent.absolute()
        if folder not in _UNWRITABLE_CACHES:
            _UNWRITABLE_CACHES.add(folder)
            reason = str(exc) if isinstance(exc, FileWriteError) else f"{folder}: {exc.strerror or exc}"
            warnings.warn(f"extraction cache not written, the outputs are returned uncached: {reason}", RuntimeWarning, stacklevel=3)

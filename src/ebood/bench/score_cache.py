"""Cached detector scores: what makes a warm ``ebood bench`` a matter of seconds.

A benchmark model's evaluation (every detector fitted on the ID training outputs and scored on the
ID test set and each OOD set) is a pure function of the model's weights, the data, the detectors
with their hyperparameters (seeds included) and ebood's scoring code. :func:`scores_key` hashes all
of these, so a cached entry is reused only when none changed: the model by
:func:`ebood.extraction.model_fingerprint`, each dataset by :func:`ebood.extraction.data_identity`,
the code by a digest of the package's source files below the benchmark layer (detectors, scores,
extraction, models, ...). Data that cannot be identified without reading all of it gives no key
(nothing is cached). An entry is one state file (:func:`ebood.state.save_state`: written atomically,
checksummed): the raw scores, the ID test correctness, and a header with the ID accuracy and the fit
seconds of the run that computed them. An entry that fails its checks is ignored (the scores are
recomputed and the entry rewritten).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..extraction import data_identity, model_fingerprint
from ..state import StateError, load_state, save_state

__all__ = ["CachedScores", "scores_key", "load_scores", "save_scores", "code_digest"]

#: bump when the entry's layout changes
_LAYOUT = 1
CACHE_FORMAT = "ebood.bench.scores"
#: subpackages whose code cannot change a detector's scores (the layers above the runner)
_NOT_SCORING = ("bench", "cli", "report", "deploy", "distributed")


@dataclass
class CachedScores:
    """What :func:`ebood.bench.runner.evaluate_model` needs of an evaluation (the fields of
    :class:`ebood.evaluation.EvaluationResult` of the same names)."""

    scores: dict[str, dict[str, torch.Tensor]]
    id_accuracy: float | None
    id_correct: torch.Tensor | None
    fit_seconds: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    tpr: float = 0.95
    cached: bool = False


@lru_cache(maxsize=1)
def code_digest() -> str:
    """A hash of the ebood source files that compute scores (every module but the benchmark,
    report, CLI, deployment and distributed layers), so that editing a detector invalidates its
    cached scores even when the version number stays the same."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.blake2b(digest_size=16)
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.suffix not in (".py", ".c") or rel.parts[0] in _NOT_SCORING:
            continue
        h.update(f"{rel.as_posix()}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def scores_key(model: torch.nn.Module, datasets: Mapping[str, Any], detectors: Sequence[tuple[str, Mapping[str, Any]]],
               **settings: Any) -> str | None:
    """The cache key of ``model``'s scores on ``datasets`` (role -> data; ``None`` values allowed) by
    ``detectors`` (``(label, {"name": ..., **hyperparameters})``), with ``settings`` (TPR, score
    direction, ...); ``None`` when some dataset cannot be identified cheaply."""
    identities = {}
    for role, data in datasets.items():
        if data is None:
            identities[role] = None
            continue
        parts = data if isinstance(data, (list, tuple)) else [data]
        ids = [data_identity(d)[0] for d in parts]
        if any(i is None for i in ids):
            return None
        identities[role] = ids
    payload = {"layout": _LAYOUT, "code": code_digest(), "model": model_fingerprint(model), "data": identities,
               "detectors": [[label, dict(spec)] for label, spec in detectors], "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()[:32]


def save_scores(path: str | Path, entry: CachedScores) -> Path:
    """Write ``entry`` to ``path`` (:func:`ebood.state.save_state`: atomic, checksummed; the folder is created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    index: list[list[str]] = []
    for label, per_set in entry.scores.items():
        for set_name, s in per_set.items():
            tensors[f"s{len(index)}"] = s
            index.append([label, set_name])
    if entry.id_correct is not None:
        tensors["id_correct"] = entry.id_correct.to(torch.uint8)
    header = {"format": CACHE_FORMAT, "index": index, "id_accuracy": entry.id_accuracy, "fit_seconds": entry.fit_seconds,
              "timings": entry.timings, "tpr": entry.tpr}
    return save_state(path, tensors, header)


def load_scores(path: str | Path) -> CachedScores | None:
    """The entry at ``path``, or ``None`` when there is none or it fails its checks (damaged, another format)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        tensors, header = load_state(path, expected_format=CACHE_FORMAT)
        scores: dict[str, dict[str, torch.Tensor]] = {}
        for i, (label, set_name) in enumerate(header["index"]):
            scores.setdefault(label, {})[set_name] = tensors[f"s{i}"]
        correct = tensors.get("id_correct")
        return CachedScores(scores=scores, id_accuracy=header["id_accuracy"],
                            id_correct=correct.to(torch.bool) if correct is not None else None,
                            fit_seconds={k: float(v) for k, v in header["fit_seconds"].items()},
                            timings={k: float(v) for k, v in header["timings"].items()}, tpr=float(header["tpr"]), cached=True)
    except (StateError, KeyError, ValueError, TypeError):
        return None

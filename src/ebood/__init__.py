"""ebood: energy-based out-of-distribution detection.

Layers, each using only the ones before it in this list:
``scores`` / ``metrics`` (pure functions) -> ``outputs`` (what a model produced) -> ``detectors``
(fit / score objects) -> ``extraction`` (running a model once: ``ebood.extract``) -> ``bench`` (benchmark runner) and ``deploy``
(``ebood.wrap``: model + detector as one exportable module) -> ``report`` and ``cli``.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from . import metrics, scores  # noqa: E402
from .outputs import Head, Outputs  # noqa: E402
from .detectors import load  # noqa: E402

__all__ = ["__version__", "scores", "metrics", "Head", "Outputs", "load", "extract", "evaluate_detectors", "wrap"]

_LAZY_FUNCTIONS = {"extract": "extraction", "evaluate_detectors": "evaluation", "wrap": "deploy"}
_LAZY_MODULES = ("detectors", "data", "models", "train", "bench", "report", "io", "extraction", "evaluation", "distributed", "deploy", "selective")


def __getattr__(name: str) -> Any:
    # Heavier layers load on first use so that `import ebood` stays fast.
    if name in _LAZY_FUNCTIONS:
        module = importlib.import_module(f".{_LAZY_FUNCTIONS[name]}", __name__)
        return getattr(module, name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ebood' has no attribute {name!r}")

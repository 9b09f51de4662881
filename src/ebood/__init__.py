"""ebood: energy-based out-of-distribution detection.

Layers, each using only the ones above it in this list:
``scores`` / ``metrics`` (pure functions) -> ``outputs`` (what a model produced) -> ``detectors``
(fit / score objects) -> ``extract`` (running a model once) -> ``bench`` (benchmark runner) ->
``report`` and ``cli``.
"""

__version__ = "0.1.0"

from . import metrics, scores  # noqa: E402
from .outputs import Head, Outputs  # noqa: E402
from .detectors import load  # noqa: E402

__all__ = ["__version__", "scores", "metrics", "Head", "Outputs", "load"]

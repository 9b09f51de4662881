"""Detectors that read penultimate features (and labels / the head to fit).

Every score here is an OOD score: higher = more out-of-distribution. Where a paper defines a
confidence (higher = more in-distribution), the docstring gives the paper's formula and says that
the score is its negation.

Fits that are sums over samples (class counts, class means, scatter matrices) stream: they are
accumulated in float64 batch by batch (``partial_fit``, or ``fit`` on an iterable of batches) and
two partial fits merge (``merge``) into exactly the fit on all their data. The neighbour-based
detectors (KNN, NNGuide) keep the training features themselves (their state *is* the data); they
stream and merge by appending. ConjNorm needs its class prototypes before it can estimate its
partition function, so it fits on all data at once.

Scores are computed in float32 for float16/bfloat16/float32 features and in float64 for float64
features, in chunks of rows so that memory stays bounded.

One module per detector (``mahalanobis``, ``vim``, ``knn``, ...), each citing its paper; the
shared fit machinery lives in the private modules (``_common``, ``_gaussian``, ``_principal``,
``_bank``). Every name stays importable from ``ebood.detectors.feature``.
"""

from ._common import _FeatureDetector, _KeepsHead  # noqa: F401  (bases, for subclasses elsewhere)
from .conjnorm import ConjNorm
from .fdbd import FDBD
from .knn import KNN
from .mahalanobis import Mahalanobis
from .nnguide import NNGuide
from .relative_mahalanobis import RelativeMahalanobis
from .residual import Residual
from .she import SHE
from .vim import ViM

__all__ = [
    "Mahalanobis",
    "RelativeMahalanobis",
    "ViM",
    "Residual",
    "KNN",
    "SHE",
    "FDBD",
    "NNGuide",
    "ConjNorm",
]

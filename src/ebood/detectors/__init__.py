"""OOD detectors behind one API: ``create(name, **hyperparameters)``, ``fit``, ``score``.

One file per family: ``logit`` (logits only), ``feature`` (penultimate features), ``shaping``
(activation shaping, re-applying the head) and ``model`` (detectors that need the model itself).
"""

from .base import Detector, MissingFieldError, NotFittedError, available, create, get, load, register
from .logit import MSP, Energy, Entropy, MaxLogit

__all__ = [
    "Detector", "MissingFieldError", "NotFittedError", "available", "create", "get", "load", "register",
    "MSP", "Energy", "Entropy", "MaxLogit",
]

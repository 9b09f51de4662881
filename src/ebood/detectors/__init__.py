"""OOD detectors behind one API: ``create(name, **hyperparameters)``, ``fit``, ``score``.

Grouped by family: ``logit`` (logits only), ``feature`` (penultimate features: a package with one
module per detector), ``shaping`` (activation shaping, re-applying the head), ``model``
(detectors that need the model itself) and ``msma`` (multiscale score matching, a trained density
model on features or inputs). Failure (misclassification) detectors have a file each: ``doctor``,
``relu``, ``softmax_centroid``. A new detector is one class, decorated with ``@register``.
"""

from .base import Detector, MissingFieldError, NotFittedError, available, create, get, load, register
from .logit import *  # noqa: F401,F403
from .feature import *  # noqa: F401,F403
from .shaping import *  # noqa: F401,F403
from .model import *  # noqa: F401,F403
from .msma import *  # noqa: F401,F403
from .doctor import *  # noqa: F401,F403
from .relu import *  # noqa: F401,F403
from .softmax_centroid import *  # noqa: F401,F403
from . import doctor, feature, logit, model, msma, relu, shaping, softmax_centroid

__all__ = ["Detector", "MissingFieldError", "NotFittedError", "available", "create", "get", "load", "register"]
__all__ += logit.__all__ + feature.__all__ + shaping.__all__ + model.__all__ + msma.__all__
__all__ += doctor.__all__ + relu.__all__ + softmax_centroid.__all__

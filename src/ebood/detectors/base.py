"""The detector API: hyperparameters in ``__init__``, learned state from ``fit``, scores from ``score``.

Conventions every detector follows (see CONVENTIONS.md):

* ``score`` returns one OOD score per sample, higher = more OOD.
* Learned state lives in attributes whose names end with ``_`` (scikit-learn style), declared once
  in ``learned_state`` (name -> :class:`~ebood.detectors._learned.Learned`: kind, dtype, shape
  symbols). Tensors are saved with safetensors, plain values (numbers, strings, lists) in the JSON
  header. :meth:`Detector.save` checks the state against the declaration, and :func:`load` checks a
  file against it (known names only, dtypes, shapes, hyperparameters through ``__init__``) before
  setting anything; every problem with a file is a :class:`~ebood.state.StateError`.
* Non-finite input follows one rule (CONVENTIONS.md, "Non-finite values"): NaN anywhere in an input
  row is an error naming the rows (:class:`NonFiniteError`); so is an infinite feature or input
  pixel, and any non-finite training input. An infinite *logit* gives the limit of the score as
  that logit goes to infinity (energy ``-inf`` for a ``+inf`` logit, as ``ebood.scores``); where that
  limit does not exist (softmax of a row of only ``-inf``) the row is an error too. A detector
  never returns NaN.
* Detectors whose fit is a sum over samples set ``streaming = True`` and implement
  ``_accumulate(batch)`` (add float64 sums to ``*_`` attributes), ``_merge(other)`` and
  ``_finalize()`` (derive what scoring needs). ``fit``, ``partial_fit`` and ``merge`` are then
  provided here.
* Detectors that need the model itself (ODIN, GradNorm, ...) have ``requires = ("model",)``;
  they subclass ``detectors.model.ModelDetector`` and score with ``score_inputs(model, inputs)``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import warnings
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch

from .. import selective
from .._version import __version__
from ..metrics import id_threshold
from ..outputs import Outputs
from ..state import StateError, load_state, save_state
from ._finite import NonFiniteError, check_finite_rows, check_scores
from ._learned import Learned, check_header, check_learned, learned_values, number

__all__ = ["Detector", "NotFittedError", "MissingFieldError", "NonFiniteError", "DegenerateFitError", "register", "create", "available", "get", "load"]

_REGISTRY: dict[str, type["Detector"]] = {}
STATE_FORMAT = "ebood.detector"


def _is_array(data: Any) -> bool:
    """A torch tensor or a numpy array (numpy is not imported for the check)."""
    return isinstance(data, torch.Tensor) or type(data).__module__ == "numpy" and type(data).__name__ == "ndarray"


class NotFittedError(RuntimeError):
    """Raised when a detector that needs fitting is used before ``fit``."""


class MissingFieldError(ValueError):
    """Raised when Outputs lack a field (logits, features, labels, head) that a detector needs."""


class DegenerateFitError(ValueError):
    """The training data cannot define the detector (identical rows, a single class, ...)."""


def warn_unseen_classes(seen: torch.Tensor, message: str, *, stacklevel: int) -> None:
    """A RuntimeWarning ``message`` (``{classes}`` filled with the first ten unseen class indices) when
    some entry of the boolean per-class ``seen`` is false; ``stacklevel`` as seen from the caller."""
    if bool(seen.all()):
        return
    missing = torch.nonzero(~seen)[:, 0].tolist()
    classes = f"{missing[:10]}{'...' if len(missing) > 10 else ''}"
    warnings.warn(message.format(classes=classes), RuntimeWarning, stacklevel=stacklevel + 1)


def register(cls: type["Detector"]) -> type["Detector"]:
    """Class decorator: add a detector to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no registry name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"detector name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of all registered detectors, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type["Detector"]:
    """The detector class registered under ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown detector {name!r}.{hint} Known detectors: {', '.join(available())}") from None


def create(name: str, **hyperparameters: Any) -> "Detector":
    """Create the detector registered under ``name`` with the given hyperparameters."""
    cls = get(name)
    params = cls.hyperparameter_names()
    unknown = sorted(set(hyperparameters) - set(params))
    if unknown:
        raise TypeError(
            f"detector {name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
            f"its hyperparameters are: {', '.join(params) or '(none)'}"
        )
    return cls(**hyperparameters)


class Detector:
    """Base class of every OOD detector (post-hoc and model-level)."""

    #: registry name
    name: ClassVar[str] = ""
    #: Outputs fields needed to score
    requires: ClassVar[tuple[str, ...]] = ("logits",)
    #: extra Outputs fields needed to fit (e.g. ``("labels",)``)
    fit_requires: ClassVar[tuple[str, ...]] = ()
    #: False for detectors whose ``fit`` learns nothing (fit is then optional)
    needs_fit: ClassVar[bool] = True
    #: True when fit is a sum over samples: ``partial_fit`` and ``merge`` are available
    streaming: ClassVar[bool] = False
    #: paper, for ``ebood detectors`` and the docs
    paper: ClassVar[str] = ""
    #: the learned attributes that ``fit`` sets, checked by ``save`` and ``load`` (see ``_learned``)
    learned_state: ClassVar[dict[str, Learned]] = {}

    threshold_: float | None = None

    # ----- hyperparameters -------------------------------------------------------------------
    @classmethod
    def hyperparameter_names(cls) -> list[str]:
        """Names of the ``__init__`` parameters (the hyperparameters)."""
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        sig = inspect.signature(cls.__init__)
        return [n for n, p in sig.parameters.items() if n != "self" and p.kind in kinds]

    def get_params(self) -> dict[str, Any]:
        """The hyperparameters, as given to ``__init__``."""
        return {p: getattr(self, p) for p in self.hyperparameter_names()}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    # ----- learned state ---------------------------------------------------------------------
    def _learned(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_") and k != "threshold_"}

    @classmethod
    def _state_spec(cls) -> dict[str, Learned]:
        """``learned_state`` plus what ``calibrate`` adds for every detector."""
        return {**cls.learned_state, "calibration_tpr_": number(positive=True, optional=True)}

    @property
    def is_fitted(self) -> bool:
        return not self.needs_fit or bool(getattr(self, "_fitted", False))

    def _as_outputs(self, data: Any, fields: Iterable[str], action: str) -> Any:
        """``data`` itself, or a bare tensor / array wrapped as the one field the detector needs.

        A bare tensor is unambiguous only when ``action`` needs exactly one field, logits or
        features: ``energy.score(logits)``, ``knn.fit(features)``. Anything else is returned as
        given, for :meth:`_check_fields` to judge.
        """
        if not _is_array(data):
            return data
        fields = tuple(dict.fromkeys(fields))
        if len(fields) == 1 and fields[0] in ("logits", "features"):
            return Outputs(**{fields[0]: data})
        raise TypeError(
            f"detector {self.name!r} needs {' and '.join('Outputs.' + f for f in fields)} to {action}; a bare "
            f"{type(data).__name__} is accepted only by detectors that need logits alone or features alone: "
            f"give ebood.Outputs({', '.join(f'{f}=...' for f in fields)})"
        )

    def _check_fields(self, outputs: Outputs, fields: Iterable[str], action: str) -> None:
        if not isinstance(outputs, Outputs):
            raise TypeError(f"{self.name}.{action} expects ebood.Outputs (or, for a detector that needs one input "
                            f"kind, a tensor of it), got {type(outputs).__name__}")
        for f in fields:
            if not outputs.has(f):
                raise MissingFieldError(
                    f"detector {self.name!r} needs Outputs.{f} to {action}, but the outputs given have no {f}"
                )

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(f"detector {self.name!r} is not fitted: call fit() (or partial_fit()) first")

    # ----- fitting ---------------------------------------------------------------------------
    def fit(self, data: Outputs | Iterable[Outputs] | torch.Tensor) -> "Detector":
        """Learn from in-distribution (training) outputs, or from an iterable of batches of them.

        A detector that needs one input kind to fit (logits alone or features alone) also takes
        that tensor directly: ``create("knn").fit(train_features)``.
        """
        data = self._as_outputs(data, self.requires + self.fit_requires, "fit")
        batches = [data] if isinstance(data, Outputs) else data
        if self.streaming:
            self._reset()
            seen = False
            for batch in batches:
                self._check_fields(batch, self.requires + self.fit_requires, "fit")
                self._accumulate(batch)
                seen = seen or len(batch) > 0
            if not seen:
                raise ValueError(f"detector {self.name!r}: fit received no data (no batches, or only empty ones)")
            self._finish_fit()
            return self
        parts = list(batches)
        if not parts:
            raise ValueError(f"detector {self.name!r}: fit received no data")
        full = parts[0] if len(parts) == 1 else Outputs.concat(parts)
        self._check_fields(full, self.requires + self.fit_requires, "fit")
        if len(full) == 0:
            raise ValueError(f"detector {self.name!r}: fit received an empty set of outputs")
        self._fit(full)
        self._fitted = True
        return self

    def partial_fit(self, batch: Outputs | torch.Tensor) -> "Detector":
        """Add one batch to the fit (streaming detectors only). Scores use all batches seen so far."""
        if not self.streaming:
            raise TypeError(f"detector {self.name!r} cannot be fitted batch by batch; call fit() with all data (or an iterable of batches)")
        batch = self._as_outputs(batch, self.requires + self.fit_requires, "fit")
        self._check_fields(batch, self.requires + self.fit_requires, "fit")
        if not getattr(self, "_started", False):
            self._reset()
        self._accumulate(batch)
        self._finish_fit()
        return self

    def merge(self, other: "Detector") -> "Detector":
        """Combine the partial fit of ``other`` (same detector, same hyperparameters) into this one."""
        if not self.streaming:
            raise TypeError(f"detector {self.name!r} does not support merge()")
        if type(other) is not type(self) or other.get_params() != self.get_params():
            raise ValueError(f"can only merge {self!r} with a detector of the same kind and hyperparameters, got {other!r}")
        if not getattr(other, "_started", False):
            return self
        if not getattr(self, "_started", False):
            self._reset()
        self._merge(other)
        self._finish_fit()
        return self

    def _finish_fit(self) -> None:
        self._started = True
        self._fitted = True
        self._final = False

    def _ensure_final(self) -> None:
        if self.streaming and not getattr(self, "_final", True):
            self._finalize()
            self._final = True

    # hooks for subclasses ----------------------------------------------------------------
    def _fit(self, outputs: Outputs) -> None:
        """Learn state from all training outputs (non-streaming detectors)."""
        if self.streaming:
            self._reset()
            self._accumulate(outputs)
            self._finish_fit()

    def _reset(self) -> None:
        """Start empty sufficient statistics (streaming detectors)."""
        self._started = True

    def _accumulate(self, batch: Outputs) -> None:
        raise NotImplementedError

    def _merge(self, other: "Detector") -> None:
        raise NotImplementedError

    def _finalize(self) -> None:
        """Derive what scoring needs from the sufficient statistics (streaming detectors)."""

    def _score(self, outputs: Outputs) -> torch.Tensor:
        raise NotImplementedError

    def _validate_state(self) -> None:
        """Check the shapes of loaded state (raise ValueError naming the mismatch)."""

    # ----- scoring ---------------------------------------------------------------------------
    def score(self, outputs: Outputs | torch.Tensor) -> torch.Tensor:
        """One OOD score per sample (higher = more OOD), a 1-D tensor.

        ``outputs`` is an :class:`~ebood.Outputs`, or, for a detector that scores one input kind
        (logits alone or features alone), that (N, C) / (N, D) tensor: ``create("energy").score(logits)``.
        """
        outputs = self._as_outputs(outputs, self.requires, "score")
        self._check_fields(outputs, self.requires, "score")
        self._check_fitted()
        self._ensure_final()
        if outputs.features is not None and "features" in self.requires:
            check_finite_rows(outputs.feature(), "features", self.name)
        return check_scores(self._score(outputs), outputs, self.name)

    def calibrate(
        self,
        id_outputs: Outputs | torch.Tensor,
        tpr: float | None = None,
        *,
        risk: float | None = None,
        delta: float = 0.05,
        method: str = "sgr",
        correct: Any = None,
    ) -> "Detector":
        """Set ``threshold_`` (a sample is accepted when ``score <= threshold_``) from ID validation outputs.

        * ``tpr`` (default 0.95): the smallest score at which at least ``tpr`` of the samples are kept.
        * ``risk``: a threshold whose selective risk (share of wrong predictions among the accepted)
          is at most ``risk`` with probability ``1 - delta`` (:func:`ebood.selective.calibrate`,
          ``method="sgr"`` or ``"ltt"``). Which predictions were right comes from ``correct``
          (bool per sample) or else from ``argmax(logits) == labels`` of ``id_outputs``.
        """
        if risk is not None and tpr is not None:
            raise ValueError("calibrate takes either tpr= (share of ID kept) or risk= (guaranteed selective risk), not both")
        scores = self.score(id_outputs)
        finite = torch.isfinite(scores)
        if not bool(finite.all()):
            raise ValueError(f"detector {self.name!r} gave {int((~finite).sum())} non-finite scores on the calibration outputs")
        for key in ("calibration_tpr_", "calibration_risk_", "calibration_delta_", "calibration_method_"):
            self.__dict__.pop(key, None)
        if risk is None:
            tpr = 0.95 if tpr is None else tpr
            self.threshold_ = id_threshold(scores, tpr)
            self.calibration_tpr_ = float(tpr)
            return self
        if correct is None:
            correct = self._correct(id_outputs)
        with warnings.catch_warnings():  # the error below says it better than calibrate's warning
            warnings.simplefilter("ignore", RuntimeWarning)
            threshold = selective.calibrate(scores, correct, risk=risk, delta=delta, method=method)
        if not math.isfinite(threshold):
            raise ValueError(
                f"detector {self.name!r}: no threshold certifies a selective risk <= {risk} at delta = {delta} "
                f"from {len(scores)} calibration samples; give more samples or a larger risk"
            )
        self.threshold_ = threshold
        self.calibration_risk_ = float(risk)
        self.calibration_delta_ = float(delta)
        self.calibration_method_ = str(method)
        return self

    def _correct(self, outputs: Outputs | torch.Tensor) -> torch.Tensor:
        """Whether the classifier's prediction ``argmax(logits)`` matches ``labels``, per sample."""
        if isinstance(outputs, torch.Tensor):
            raise MissingFieldError("calibrate(risk=...) on a tensor needs correct=... (which predictions were right)")
        missing = [f for f in ("logits", "labels") if not outputs.has(f)]
        if missing:
            raise MissingFieldError(
                f"calibrate(risk=...) needs Outputs.{' and Outputs.'.join(missing)} to tell right predictions from wrong ones "
                "(or pass correct=...)"
            )
        return outputs.logits.argmax(dim=1).to("cpu") == outputs.labels.to("cpu")

    def predict(self, outputs: Outputs | torch.Tensor, *, tpr: float | None = None, risk: float | None = None) -> torch.Tensor:
        """A bool tensor, True where a sample is flagged (``score > threshold_``): OOD, or a
        prediction to reject.

        ``tpr=`` / ``risk=`` state the target the caller relies on; the threshold must have been
        calibrated for it (for ``risk``: calibrated with a risk at most that; for ``tpr``: with a
        tpr at least that), otherwise a ValueError says so instead of using a wrong threshold.
        """
        threshold = self._threshold("calibrate() on ID validation outputs")
        self._check_target(tpr, risk)
        return self.score(outputs) > threshold

    def _threshold(self, how: str) -> float:
        """``threshold_``, checked: set (else NotFittedError saying ``how``) and a finite number."""
        thr = self.threshold_
        if thr is None:
            raise NotFittedError(f"detector {self.name!r} has no threshold: call {how} first")
        if isinstance(thr, bool) or not isinstance(thr, numbers.Real) or not math.isfinite(thr):
            raise TypeError(f"detector {self.name!r}: threshold_ must be a finite number, got {thr!r}")
        return float(thr)

    def _check_target(self, tpr: float | None, risk: float | None) -> None:
        got_risk = getattr(self, "calibration_risk_", None)
        got_tpr = getattr(self, "calibration_tpr_", None)
        how = f"risk <= {got_risk}" if got_risk is not None else f"tpr = {got_tpr}" if got_tpr is not None else "an unknown target"
        if risk is not None and (got_risk is None or got_risk > float(risk)):
            raise ValueError(f"detector {self.name!r}: the threshold was calibrated for {how}, not for a selective risk <= {risk}; call calibrate(..., risk={risk})")
        if tpr is not None and (got_tpr is None or got_tpr < float(tpr)):
            raise ValueError(f"detector {self.name!r}: the threshold was calibrated for {how}, not for tpr >= {tpr}; call calibrate(..., tpr={tpr})")

    # ----- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the detector (hyperparameters, learned state, threshold) to a safetensors file."""
        self._check_fitted()
        self._ensure_final()
        learned = self._learned()
        try:
            check_learned(self._state_spec(), learned)
        except ValueError as exc:
            raise ValueError(f"cannot save detector {self.name!r}: its learned state does not match its declaration: {exc}") from exc
        tensors: dict[str, torch.Tensor] = {}
        plain: dict[str, Any] = {}
        for key, value in learned.items():
            if isinstance(value, torch.Tensor):
                tensors[key] = value
            elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
                for sub, t in value.items():
                    tensors[f"{key}/{sub}"] = t
                plain[key] = {"__tensor_dict__": list(value)}
            else:
                plain[key] = value
        header = {
            "format": STATE_FORMAT,
            "ebood_version": __version__,
            "detector": self.name,
            "hyperparameters": self.get_params(),
            "threshold": self.threshold_,
            "fitted": bool(getattr(self, "_fitted", False)),
            "learned": plain,
        }
        return save_state(path, tensors, header)

    @classmethod
    def _from_state(cls, tensors: dict[str, torch.Tensor], header: dict[str, Any], path: Path) -> "Detector":
        """A detector from a checked header (see :func:`load`): hyperparameters through ``__init__``,
        learned values through the class's declaration, then the detector's own ``_validate_state``."""
        name = header["detector"]
        try:
            det = create(name, **header["hyperparameters"])
        except (TypeError, ValueError) as exc:
            raise StateError(f"{path}: invalid hyperparameters for detector {name!r}: {exc}") from None
        if det.needs_fit and not header["fitted"]:
            raise StateError(f"{path}: the file holds an unfitted {name!r} detector (save() writes only fitted ones)")
        try:
            # an unfitted detector that needs no fit (ASH without a kept head) has nothing required
            learned = check_learned(det._state_spec(), learned_values(tensors, header["learned"], path), required=header["fitted"])
        except ValueError as exc:
            raise StateError(f"{path}: invalid learned state for detector {name!r}: {exc}") from None
        for key, value in learned.items():
            setattr(det, key, value)
        det.threshold_ = header["threshold"]
        det._fitted = header["fitted"]
        det._started = det._fitted
        det._final = True
        try:
            det._validate_state()
        except (ValueError, KeyError, AttributeError, RuntimeError, TypeError, IndexError) as exc:
            raise StateError(f"{path}: inconsistent detector state for {det.name!r}: {exc}") from exc
        return det


def load(path: str | Path) -> Detector:
    """Load a detector saved with :meth:`Detector.save`. Never unpickles."""
    path = Path(path)
    tensors, header = load_state(path, expected_format=STATE_FORMAT)
    check_header(header, path, _REGISTRY, __version__)
    return Detector._from_state(tensors, header, path)

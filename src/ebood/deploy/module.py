"""``ebood.wrap(model, detector)``: a classifier and its fitted detector as one ``nn.Module``.

The wrapped module's forward runs the model once and returns a dict: ``logits`` (N, C), ``score``
(N,) (the detector's OOD score, higher = more OOD) and ``is_ood`` (N,) bool, ``score > threshold``
with the threshold from the detector's calibration (:meth:`ebood.detectors.Detector.calibrate`).

The penultimate features are read as ``ebood.extract`` reads them: forward hooks
(:class:`ebood.extraction.LayerTap`) keep the input of the last ``nn.Linear`` called, the
classifier head. The hooks are registered for the duration of each forward call, so one wrapped
module should not be called from several threads at once (serving calls it from one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..detectors import Detector, NotFittedError
from ..extraction import PENULTIMATE, ExtractionError, LayerTap, select_output
from .scorers import Scorer, UnsupportedDetectorError, check_supported, scorer_for

__all__ = ["wrap", "wrap_files", "WrappedDetector", "UnsupportedDetectorError", "DEFAULT_INPUT_SHAPES", "example_batch"]

#: input shape (without the batch axis) of the built-in models, for exporting and serving them
DEFAULT_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "digits_cnn": (1, 8, 8),
    "wrn40_2": (3, 32, 32),
    "wideresnet": (3, 32, 32),
    "resnet18_cifar": (3, 32, 32),
    "resnet18": (3, 32, 32),
}


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return torch.float64 if t.dtype == torch.float64 else torch.float32
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


class WrappedDetector(nn.Module):
    """A model and a detector in one forward pass: ``{"logits", "score", "is_ood"}``.

    Built by :func:`wrap`. ``threshold`` (a buffer) is the calibrated decision threshold;
    ``detector_name`` names the detector; ``output`` selects the logits among the model's outputs
    (as ``ebood.extract``'s ``output=``: an index or a key).
    """

    def __init__(self, model: nn.Module, scorer: Scorer, threshold: float, *, detector_name: str, output: int | str | None = None) -> None:
        super().__init__()
        self.model = model
        self.scorer = scorer
        self.detector_name = detector_name
        self.output = output
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float64))
        #: the head the detector kept from its fit (checked against the model's by :meth:`check`)
        self.kept_head: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def needs_features(self) -> bool:
        return self.scorer.needs_features

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, nn.Linear | None]:
        if not self.needs_features:
            return select_output(self.model(x), self.output), None, None
        with LayerTap(self.model, [PENULTIMATE]) as tap:
            tap.start_batch()
            logits = select_output(self.model(x), self.output)
            tap.finish_batch()
            features = tap.values.get(PENULTIMATE)
            if tap.head is None or features is None:
                raise ExtractionError(
                    f"detector {self.detector_name!r} reads the penultimate features, but the model calls no nn.Linear "
                    "whose (N, D) input could be them (the classifier head)"
                )
            if tap.head_output is None or tuple(tap.head_output.shape) != tuple(logits.shape):
                shape = None if tap.head_output is None else tuple(tap.head_output.shape)
                raise ExtractionError(
                    f"the last nn.Linear called ({tap.head_name!r}) gives shape {shape}, not the logits' {tuple(logits.shape)}, "
                    "so it is not the classifier head whose input the detector reads"
                )
            return logits, features, tap.head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, features, head = self._run(x)
        weight = None if head is None else head.weight
        bias = None if head is None else head.bias
        score = self.scorer(logits, None if features is None else features.to(logits.dtype), weight, bias)
        # compared in the score's dtype, as Detector.predict compares with a Python float
        return {"logits": logits, "score": score, "is_ood": score > self.threshold.to(score.dtype)}

    def _check_classes(self, logits: torch.Tensor) -> None:
        c = self.scorer.num_classes()
        if c is not None and logits.shape[1] != c:
            raise ValueError(f"detector {self.detector_name!r} was fitted on {c} classes, but the model gives {logits.shape[1]} logits: wrong model or detector?")

    @torch.no_grad()
    def check(self, example: Any) -> "WrappedDetector":
        """Run ``example`` (a batch of inputs) once and check what can only be checked with data:
        that the last ``nn.Linear`` called is the head producing the logits, and that a detector
        which kept a head was fitted with this model's head. Errors name the problem."""
        x = torch.as_tensor(example).to(_model_device(self.model))
        if x.is_floating_point():
            x = x.to(_model_dtype(self.model))
        if not self.needs_features:
            self._check_classes(select_output(self.model(x), self.output))
            return self
        with LayerTap(self.model, [PENULTIMATE]) as tap:
            tap.start_batch()
            logits = select_output(self.model(x), self.output)
            tap.finish_batch()
        self._run(x)  # the head's presence and shape
        self._check_classes(logits)
        dim = self.scorer.feature_dim()
        features = tap.values[PENULTIMATE]
        if dim is not None and features.shape[1] != dim:
            raise ValueError(
                f"detector {self.detector_name!r} was fitted on features of dimension {dim}, but this model's penultimate layer "
                f"(the input of {tap.head_name!r}) has dimension {features.shape[1]}: wrong model or detector?"
            )
        if not torch.allclose(tap.head_output.float(), logits.float(), rtol=1e-4, atol=1e-5):
            raise ExtractionError(
                f"the model's logits are not the output of its last nn.Linear ({tap.head_name!r}): "
                f"detector {self.detector_name!r} would read features that do not produce them"
            )
        if self.kept_head is not None:
            w, b = self.kept_head
            head = tap.head
            hb = head.bias if head.bias is not None else torch.zeros_like(head.weight[:, 0])
            same = w.shape == head.weight.shape and torch.allclose(w, head.weight.to(w)) and torch.allclose(b, hb.to(b))
            if not same:
                raise ValueError(
                    f"detector {self.detector_name!r} was fitted with a head of shape {tuple(w.shape)} that differs from the model's "
                    f"head {tap.head_name!r} of shape {tuple(head.weight.shape)}: fit the detector on this model's outputs"
                )
        return self


def _kept_head(detector: Detector) -> tuple[torch.Tensor, torch.Tensor] | None:
    w, b = getattr(detector, "head_weight_", None), getattr(detector, "head_bias_", None)
    if isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor):
        return w.detach().clone(), b.detach().clone()
    return None


def wrap(model: nn.Module, detector: Detector, *, threshold: float | None = None, output: int | str | None = None, example: Any = None) -> WrappedDetector:
    """``model`` and its fitted ``detector`` as one :class:`WrappedDetector` (an ``nn.Module`` in
    eval mode, on the model's device) whose forward returns ``{"logits", "score", "is_ood"}``.

    ``threshold`` defaults to the detector's calibrated ``threshold_`` (an error when it has none).
    ``output`` selects the logits when the model returns a tuple or dict. With ``example`` (a batch
    of inputs) the model is run once to check that the head found is the one producing the logits
    and the one the detector was fitted with (:meth:`WrappedDetector.check`; export always does).

    Supported: every post-hoc detector whose scoring is tensor maths (:func:`ebood.deploy.supported`).
    Others raise :class:`UnsupportedDetectorError` naming the detector and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_supported(detector)
    if threshold is None:
        if detector.threshold_ is None:
            raise NotFittedError(
                f"detector {detector.name!r} has no threshold: call detector.calibrate(id_validation_outputs) first, or pass threshold="
            )
        threshold = float(detector.threshold_)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not torch.isfinite(torch.tensor(float(threshold))):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    scorer = scorer_for(detector, _model_dtype(model))
    if scorer.needs_features and isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedDetectorError(
            f"detector {detector.name!r} reads the penultimate features, but a TorchScript model runs as compiled code whose layers "
            "cannot be read; load the model from Python code (a built-in name or an entry point)"
        )
    wrapped = WrappedDetector(model, scorer, threshold, detector_name=detector.name, output=output)
    wrapped.kept_head = _kept_head(detector) if scorer.needs_features else None
    wrapped.scorer.to(_model_device(model))
    wrapped.threshold = wrapped.threshold.to(_model_device(model))
    wrapped.eval()
    if example is not None:
        wrapped.check(example)
    return wrapped



def example_batch(input_shape: tuple[int, ...] | list[int], rows: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fixed pseudo-random batch of ``rows`` inputs of ``input_shape`` (for checking and exporting)."""
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input shape must be positive sizes without the batch axis, e.g. 3,32,32; got {shape}")
    return torch.randn((rows, *shape), generator=torch.Generator().manual_seed(0)).to(dtype)


def wrap_files(model: str, detector: str | Path, *, checkpoint: str | Path | None = None, input_shape: Sequence[int] | None = None,
               threshold: float | None = None, output: int | str | None = None, **model_kwargs: Any) -> tuple[WrappedDetector, torch.Tensor]:
    """Load a model (``ebood.models.load_model``: a built-in name, an entry point or a TorchScript
    file, with ``checkpoint``) and a saved detector (``ebood.load``), wrap them, and check the result
    on an example batch of ``input_shape`` (default: the built-in model's input shape).
    Returns the wrapped module and the example batch."""
    from ..detectors import load
    from ..models import load_model

    if input_shape is None:
        if model not in DEFAULT_INPUT_SHAPES:
            raise ValueError(f"model {model!r}: give the input shape of one sample (e.g. 3,32,32); it is known only for the built-in models")
        input_shape = DEFAULT_INPUT_SHAPES[model]
    example = example_batch(input_shape)
    det = load(detector)
    net = load_model(model, checkpoint, **model_kwargs)
    return wrap(net, det, threshold=threshold, output=output, example=example), example

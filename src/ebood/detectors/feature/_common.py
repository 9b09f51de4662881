"""Shared machinery of the feature detectors: hyperparameter checks, the feature-detector base
class and the kept classifier head."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from ...outputs import Head, Outputs
from .. import _linalg as la
from ..base import Detector


def _batch_num_classes(batch: Outputs) -> int | None:
    """The class count that a batch's logits or head reveal (None when it has neither)."""
    if batch.logits is not None:
        return int(batch.logits.shape[1])
    if batch.head is not None:
        return int(batch.head.num_classes)
    return None


def _classes_text(idx: torch.Tensor) -> str:
    values = idx.tolist()
    return "[" + ", ".join(str(v) for v in values[:10]) + (", ...]" if len(values) > 10 else "]")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_positive_int(detector: str, name: str, value: Any, minimum: int = 1) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{detector}: {name} must be an integer >= {minimum}, got {value!r}")


def _check_positive_float(detector: str, name: str, value: Any, above: float = 0.0) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{detector}: {name} must be a number > {above:g}, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v <= above:
        raise ValueError(f"{detector}: {name} must be a finite number > {above:g}, got {value!r}")
    return v


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


class _FeatureDetector(Detector):
    """Base of the detectors in this file.

    Streaming fits derive what scoring needs (``_finalize``: a covariance's inverse, a bank...)
    lazily, at the first ``score`` or ``save``, so that partial fits too small to be used on their
    own (a shard of one sample) can still be merged; warnings and errors about the data appear
    then. Loaded state is checked and finalised by ``_validate_state`` (without repeating the
    warnings of the fit)."""

    requires = ("features",)

    def _validate_state(self) -> None:
        self._check_state()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._finalize()

    def _check_state(self) -> None:
        """Shapes and types of the loaded state (ValueError naming the mismatch)."""

    def _features(self, outputs: Outputs, dim: int) -> torch.Tensor:
        x = outputs.feature()
        if x.shape[1] != dim:
            raise ValueError(f"detector {self.name!r}: features have dimension {x.shape[1]}, the detector was fitted on dimension {dim} (it expects {dim})")
        return x

    def _finite_scores(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out``, or a clear error where a score is not finite."""
        if not bool(torch.isfinite(out).all()):
            la.check_finite(x, "features", self.name)
            bad = int((~torch.isfinite(out)).sum())
            raise ValueError(f"detector {self.name!r}: {bad} score(s) are not finite (they overflow {out.dtype})")
        return out


class _KeepsHead:
    """Keeps a copy of the classifier head (``head_weight_``, ``head_bias_``) from the first batch;
    later batches, merged fits and scored outputs that carry a head must carry the same one."""

    name: str
    head_weight_: torch.Tensor | None = None
    head_bias_: torch.Tensor | None = None

    def _keep_head(self, head: Head) -> None:
        if self.head_weight_ is None:
            self.head_weight_ = head.weight.detach().clone()
            self.head_bias_ = head.bias.detach().clone()
        else:
            self._check_same_head(head.weight, head.bias, "this batch carries")

    def _check_same_head(self, weight: torch.Tensor, bias: torch.Tensor, who: str) -> None:
        w = weight.to(self.head_weight_.device, self.head_weight_.dtype)
        b = bias.to(self.head_bias_.device, self.head_bias_.dtype)
        if w.shape != self.head_weight_.shape:
            raise ValueError(
                f"detector {self.name!r}: {who} a head of shape {tuple(w.shape)}, the detector was fitted with a head of shape {tuple(self.head_weight_.shape)}"
            )
        if not (torch.equal(w, self.head_weight_) and torch.equal(b, self.head_bias_)):
            raise ValueError(f"detector {self.name!r}: {who} a different head from the one the detector was fitted with")

    def _check_scoring_head(self, outputs: Outputs) -> None:
        if outputs.head is not None:
            self._check_same_head(outputs.head.weight, outputs.head.bias, "the outputs carry")

    def _check_head_state(self, dim: int | None = None) -> None:
        w, b = self.head_weight_, self.head_bias_
        if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise ValueError("the state has no head (head_weight_, head_bias_)")
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"head_weight_ {tuple(w.shape)} and head_bias_ {tuple(b.shape)} must be (C, D) and (C,)")
        if dim is not None and w.shape[1] != dim:
            raise ValueError(f"head_weight_ has shape {tuple(w.shape)}, the feature statistics have dimension {dim}")

    def _head_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.head_bias_.to(x.device, x.dtype), x, self.head_weight_.to(x.device, x.dtype).T)

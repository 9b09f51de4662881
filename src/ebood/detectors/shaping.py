"""Activation-shaping detectors: shape the pooled penultimate features, re-apply the head, score.

Every detector here scores with the energy of the shaped logits,
``E(x) = -logsumexp(W h'(x) + b)`` (Liu et al., NeurIPS 2020; higher = more OOD), where ``h'`` is
the shaped feature vector and ``W, b`` the classifier's last linear layer (:class:`ebood.Head`).

The head is part of the fitted state: ``fit`` needs ``Outputs.head`` and keeps a copy, so a saved
detector scores features alone. Outputs that carry a head when scoring must carry the same head.
ASH and SCALE learn nothing else from the data; they can also score without ``fit`` when the
outputs carry the head.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._arrays import accumulation_dtype
from ..outputs import Head, Outputs
from ._learned import integer, number, tensor
from .base import Detector, MissingFieldError, register
from .logit import _check_finite, _row_chunks

__all__ = ["ReAct", "ASH", "Scale", "DICE"]


def _check_percentile(detector: str, percentile: Any, upper_open: bool = False) -> float:
    try:
        p = float(percentile)
    except (TypeError, ValueError):
        raise ValueError(f"{detector}: percentile must be a number in [0, 100], got {percentile!r}") from None
    if isinstance(percentile, bool) or not (0.0 <= p <= 100.0) or (upper_open and p == 100.0):
        bound = "[0, 100)" if upper_open else "[0, 100]"
        raise ValueError(f"{detector}: percentile must be in {bound} (percent, as in numpy), got {percentile!r}")
    return p


def _energy(logits: torch.Tensor) -> torch.Tensor:
    return -torch.logsumexp(logits, dim=1)


def _linear_percentile(values: torch.Tensor, percentile: float) -> float:
    """``numpy.percentile(values, percentile)`` (linear interpolation) of all entries, without a
    float64 copy of ``values``: a partial sort finds the two neighbours, float64 interpolates."""
    a = values.detach().reshape(-1).to("cpu")
    if a.dtype not in (torch.float32, torch.float64):
        a = a.to(torch.float32)
    a = a.numpy()
    pos = percentile / 100.0 * (a.size - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    part = np.partition(a, [lo, hi]) if hi != lo else np.partition(a, lo)
    return float(np.interp(pos - lo, [0.0, 1.0], [float(part[lo]), float(part[hi])]))


class _Shaping(Detector):
    """Shared machinery: keep the head from ``fit``, shape features chunk by chunk, energy."""

    requires = ("features",)
    fit_requires = ("head",)
    #: the kept head; optional where the detector also scores with the outputs' own head
    learned_state = {"head_weight_": tensor("C", "D", optional=True), "head_bias_": tensor("C", optional=True)}

    head_weight_: torch.Tensor | None = None
    head_bias_: torch.Tensor | None = None

    # ----- the head ---------------------------------------------------------------------------
    def _keep_head(self, head: Head) -> None:
        self.head_weight_ = head.weight.detach().clone()
        self.head_bias_ = head.bias.detach().clone()

    def _head_for(self, outputs: Outputs) -> Head:
        if self.head_weight_ is None:
            if outputs.head is None:
                raise MissingFieldError(
                    f"detector {self.name!r} needs Outputs.head to score (or fit() on outputs with a head), "
                    "but the outputs given have no head"
                )
            return outputs.head
        if outputs.head is not None:
            w = outputs.head.weight.to(self.head_weight_.device, self.head_weight_.dtype)
            b = outputs.head.bias.to(self.head_bias_.device, self.head_bias_.dtype)
            if w.shape != self.head_weight_.shape:
                raise ValueError(
                    f"detector {self.name!r}: the outputs carry a head of shape {tuple(w.shape)}, "
                    f"the detector was fitted with a head of shape {tuple(self.head_weight_.shape)}"
                )
            if not (torch.equal(w, self.head_weight_) and torch.equal(b, self.head_bias_)):
                raise ValueError(f"detector {self.name!r}: the outputs carry a different head from the one it was fitted with")
        return Head(self.head_weight_, self.head_bias_)

    def _validate_head(self) -> None:
        if (self.head_weight_ is None) != (self.head_bias_ is None):
            raise ValueError("the state holds only one of head_weight_ and head_bias_")

    def _validate_state(self) -> None:
        self._validate_head()

    # ----- scoring ----------------------------------------------------------------------------
    def _scoring_head(self, outputs: Outputs) -> Head:
        """The head whose logits are scored (the kept head; DICE's masked one)."""
        return self._head_for(outputs)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        head = self._scoring_head(outputs)
        x = outputs.feature()
        if x.shape[1] != head.dim:
            raise ValueError(f"detector {self.name!r}: features have dimension {x.shape[1]}, the head expects {head.dim}")
        acc = accumulation_dtype(x.dtype)
        weight = head.weight.to(x.device, acc)
        bias = head.bias.to(x.device, acc)
        parts = [self._energy_chunk(x[rows].to(acc), weight, bias) for rows in _row_chunks(x.shape[0], max(head.dim, head.num_classes), acc)]
        out = torch.cat(parts) if parts else torch.empty(0, dtype=acc, device=x.device)
        if not bool(torch.isfinite(out).all()):
            self._non_finite(x, out)
        return out

    def _energy_chunk(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return _energy(torch.addmm(bias, self._shape(x), weight.T))

    def _shape(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _non_finite(self, x: torch.Tensor, out: torch.Tensor) -> None:
        bad = int((~torch.isfinite(out)).sum())
        if not bool(torch.isfinite(x).all()):
            _check_finite(x, "features", self.name)
        raise ValueError(f"detector {self.name!r}: {bad} score(s) are not finite (the shaped logits overflow {out.dtype})")


@register
class ReAct(_Shaping):
    """ReAct: rectified activations (Sun, Guo & Li, "ReAct: Out-of-distribution Detection With
    Rectified Activations", NeurIPS 2021).

    Fit: ``c`` = the ``percentile``-th percentile (numpy's linear interpolation) of all entries of
    the in-distribution penultimate features. Score: the energy of the head applied to the clipped
    features, ``-logsumexp(W min(h(x), c) + b)`` (higher = more OOD). Default ``percentile = 90``
    (the paper's choice and OpenOOD v1.5's).
    """

    name = "react"
    paper = "Sun et al., NeurIPS 2021"
    learned_state = {"head_weight_": tensor("C", "D"), "head_bias_": tensor("C"), "clip_": number()}

    def __init__(self, percentile: float = 90) -> None:
        self.percentile = percentile
        _check_percentile(self.name, percentile)

    def _fit(self, outputs: Outputs) -> None:
        x = outputs.feature()
        _check_finite(x, "features", self.name)
        self._keep_head(outputs.head)
        self.clip_ = _linear_percentile(x, float(self.percentile))

    def _shape(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_max(self.clip_)


def _kept_count(dim: int, percentile: float) -> int:
    """Activations kept per sample: ``D - round(D * percentile / 100)`` (as the ASH code)."""
    return dim - int(np.round(dim * percentile / 100.0))


def _top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of each row; among entries tied with the k-th largest
    the lower indices win, so the result does not depend on the machine or the batch."""
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    kth = torch.topk(x, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    mask = x >= kth
    crowded = torch.nonzero(mask.sum(dim=1) > k)[:, 0]  # rows with ties at the k-th value
    if crowded.numel():
        rows, t = x[crowded], kth[crowded]
        tie = rows == t
        room = k - (rows > t).sum(dim=1, keepdim=True)
        mask[crowded] = (rows > t) | (tie & (tie.cumsum(dim=1) <= room))
    return mask


@register
class ASH(_Shaping):
    """ASH: activation shaping (Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping
    for Out-of-Distribution Detection", ICLR 2023), on the pooled penultimate features.

    Per sample, the ``k = D - round(D * percentile / 100)`` largest activations are kept and the
    others set to 0 (pruning below the sample's own percentile). With ``s1`` the sum of all
    activations and ``s2`` the sum of the kept ones:

    * ``variant="p"``: kept activations unchanged;
    * ``variant="b"``: every kept activation becomes ``s1 / k`` (binarised, the total is preserved);
    * ``variant="s"``: kept activations multiplied by ``exp(s1 / s2)``.

    Score: the energy of the head applied to the shaped features (higher = more OOD). Defaults
    ``variant="s"`` (the paper's recommended variant), ``percentile = 90`` (the paper's ImageNet
    setting and OpenOOD v1.5's, which uses ``variant="b"``). ASH assumes non-negative (post-ReLU)
    activations; a sample whose kept activations sum to 0 is left unscaled by ASH-S. For ASH-S the
    factor ``exp(s1 / s2)`` multiplies ``W h_kept`` after the matrix product, in float64, so only
    energies beyond the output dtype's range overflow (a clear error then).
    """

    name = "ash"
    needs_fit = False
    paper = "Djurisic et al., ICLR 2023"
    VARIANTS = ("p", "b", "s")

    def __init__(self, variant: str = "s", percentile: float = 90) -> None:
        self.variant = variant
        self.percentile = percentile
        if variant not in self.VARIANTS:
            raise ValueError(f"ash: unknown variant {variant!r}; choose one of 'p' (prune), 'b' (binarise), 's' (scale)")
        _check_percentile(self.name, percentile)

    def _fit(self, outputs: Outputs) -> None:
        self._keep_head(outputs.head)

    def _energy_chunk(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        k = _kept_count(x.shape[1], float(self.percentile))
        mask = _top_k_mask(x, k)
        kept = torch.where(mask, x, torch.zeros_like(x))
        if self.variant == "p":
            return _energy(torch.addmm(bias, kept, weight.T))
        if self.variant == "b":
            if k == 0:
                return _energy(bias.expand(x.shape[0], -1))
            fill = (x.sum(dim=1, keepdim=True) / k).expand_as(x)
            binary = torch.where(mask, fill, torch.zeros_like(x))
            return _energy(torch.addmm(bias, binary, weight.T))
        return _scaled_energy(x.sum(dim=1), kept.sum(dim=1), kept @ weight.T, bias)


def _scaled_energy(s1: torch.Tensor, s2: torch.Tensor, product: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Energy of ``exp(s1 / s2) * product + bias``, the scale applied in float64.

    Where ``s2 == 0`` the scale is taken as 1 (for non-negative activations the features that it
    would scale are then all 0)."""
    s1d, s2d = s1.to(torch.float64), s2.to(torch.float64)
    ratio = torch.where(s2d != 0, s1d / torch.where(s2d != 0, s2d, torch.ones_like(s2d)), torch.zeros_like(s2d))
    logits = torch.exp(ratio)[:, None] * product.to(torch.float64) + bias.to(torch.float64)
    return _energy(logits).to(product.dtype)


@register
class Scale(_Shaping):
    """SCALE (Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution
    Detection Enhancement", ICLR 2024), on the pooled penultimate features.

    With ``s1`` the sum of all activations of a sample and ``s2`` the sum of its
    ``k = D - round(D * percentile / 100)`` largest, the features are scaled by ``exp(s1 / s2)``
    WITHOUT pruning: ``h' = h * exp(s1 / s2)``. Score: the energy of the head applied to ``h'``
    (higher = more OOD). Default ``percentile = 85`` (OpenOOD v1.5's setting for SCALE). The
    scale multiplies ``W h`` after the matrix product, in float64.
    """

    name = "scale"
    needs_fit = False
    paper = "Xu et al., ICLR 2024"

    def __init__(self, percentile: float = 85) -> None:
        self.percentile = percentile
        _check_percentile(self.name, percentile, upper_open=True)

    def _fit(self, outputs: Outputs) -> None:
        self._keep_head(outputs.head)

    def _energy_chunk(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        k = _kept_count(x.shape[1], float(self.percentile))
        if k == 0:
            raise ValueError(
                f"scale: percentile {self.percentile} keeps no activation of the {x.shape[1]} features "
                "(s2 = 0, the scale exp(s1/s2) is undefined); use a lower percentile"
            )
        s2 = torch.where(_top_k_mask(x, k), x, torch.zeros_like(x)).sum(dim=1)
        return _scaled_energy(x.sum(dim=1), s2, x @ weight.T, bias)


@register
class DICE(_Shaping):
    """DICE: directed sparsification (Sun & Li, "DICE: Leveraging Sparsification for
    Out-of-Distribution Detection", ECCV 2022).

    Fit: the mean in-distribution feature ``m`` (a float64 sum over samples: streams and merges)
    and the contribution matrix ``V = W ⊙ m`` (``V_cj = W_cj m_j``). The weights whose
    contribution is above the ``percentile``-th percentile of all C·D entries of ``V`` are kept
    (``M = V > percentile(V)``, as the official code), the others set to 0: ``percentile`` is the
    share of weights dropped. Score: the energy of the masked head, ``-logsumexp((W ⊙ M) h(x) + b)``
    (higher = more OOD). Default ``percentile = 90`` (the paper's CIFAR setting and OpenOOD v1.5's).
    """

    name = "dice"
    streaming = True
    paper = "Sun & Li, ECCV 2022"
    learned_state = {
        "head_weight_": tensor("C", "D"),
        "head_bias_": tensor("C"),
        "feature_sum_": tensor("D", dtype="float64"),
        "sample_count_": integer(minimum=1),
    }

    def __init__(self, percentile: float = 90) -> None:
        self.percentile = percentile
        _check_percentile(self.name, percentile)

    def _reset(self) -> None:
        self._started = True
        self.head_weight_ = None
        self.head_bias_ = None
        self.feature_sum_ = None
        self.sample_count_ = 0

    def _accumulate(self, batch: Outputs) -> None:
        x = batch.feature()
        _check_finite(x, "features", self.name)
        if self.head_weight_ is None:
            self._keep_head(batch.head)
            self.feature_sum_ = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        else:
            self._head_for(batch)  # every batch must come with the same head
        self.feature_sum_ += x.to(torch.float64).sum(dim=0).to(self.feature_sum_.device)
        self.sample_count_ += int(x.shape[0])

    def _merge(self, other: "DICE") -> None:
        if self.head_weight_ is None:
            self._keep_head(Head(other.head_weight_, other.head_bias_))
            self.feature_sum_ = torch.zeros_like(other.feature_sum_)
        elif not (torch.equal(self.head_weight_, other.head_weight_.to(self.head_weight_)) and torch.equal(self.head_bias_, other.head_bias_.to(self.head_bias_))):
            raise ValueError("dice: cannot merge fits made with different heads")
        self.feature_sum_ += other.feature_sum_.to(self.feature_sum_.device)
        self.sample_count_ += int(other.sample_count_)

    def _finalize(self) -> None:
        if self.sample_count_ <= 0:
            raise ValueError("dice: no training samples were seen")
        mean = self.feature_sum_ / self.sample_count_
        w = self.head_weight_.to(torch.float64)
        contribution = w * mean.to(w.device)[None, :]
        cut = float(np.percentile(contribution.cpu().numpy(), float(self.percentile)))
        self._masked_weight = torch.where(contribution > cut, self.head_weight_, torch.zeros_like(self.head_weight_))

    def _validate_state(self) -> None:
        super()._validate_state()
        self._finalize()

    def _scoring_head(self, outputs: Outputs) -> Head:
        self._head_for(outputs)  # refuse outputs that carry a different head
        return Head(self._masked_weight, self.head_bias_)

    def _shape(self, x: torch.Tensor) -> torch.Tensor:
        return x

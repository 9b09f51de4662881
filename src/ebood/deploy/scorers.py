"""Each supported detector's score as an ``nn.Module`` of plain tensor maths, for one forward pass.

A scorer computes, from the logits ``z`` (N, C) and the penultimate features ``x`` (N, D), the same
score as the detector's ``score`` (the formulas are in each detector's docstring), with the fitted
state held as buffers so that ``.to(device)`` moves it with the model. Unlike the detectors, a
scorer has no chunk loops, no data-dependent Python branches and no error checks on values, so it
traces (TorchScript), exports (``torch.export``, ONNX) and gives every row a score that does not
depend on the other rows of the batch. Where a detector recomputes a few values exactly after a
fast ranking (Mahalanobis, KNN), the scorer does the same for its best candidates without the
detector's data-dependent fallbacks; scores agree within float32 rounding.

``scorer_for(detector, dtype)`` builds the scorer, or raises :class:`UnsupportedDetectorError`
naming the detector and the reason.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..detectors import Detector
from ..detectors import _linalg as la
from ..detectors.feature import KNN, SHE, ConjNorm, FDBD, Mahalanobis, NNGuide, RelativeMahalanobis, Residual, ViM
from ..detectors.feature._common import _classes_text
from ..detectors.logit import GEN, MSP, Energy, Entropy, KLMatching, MaxLogit, TemperatureScaling
from ..detectors.model import ModelDetector
from ..detectors.shaping import ASH, DICE, ReAct, Scale, _kept_count

__all__ = ["Scorer", "UnsupportedDetectorError", "scorer_for", "supported", "UNSUPPORTED_REASONS"]

Tensor = torch.Tensor


class UnsupportedDetectorError(ValueError):
    """The detector cannot be part of a wrapped module; the message names it and says why."""


#: Why the model-level detectors cannot be one deterministic forward pass.
UNSUPPORTED_REASONS: dict[str, str] = {
    "odin": "it perturbs each input along the gradient of the softmax score, so scoring needs backpropagation",
    "gradnorm": "its score is the norm of a gradient with respect to the head's weights, so scoring needs backpropagation",
    "mahalanobis_ensemble": "it perturbs each input along a gradient and reads several intermediate layers, so scoring needs backpropagation",
    "mc_dropout": "it averages several random forward passes with dropout switched on, which is not one deterministic forward pass",
}


class Scorer(nn.Module):
    """``forward(logits, features, head_weight, head_bias) -> (N,) scores`` (higher = more OOD).

    ``head_weight`` / ``head_bias`` are the model's own head, passed for the detectors that can
    score with it without having kept one (ASH, SCALE fitted without ``fit``)."""

    #: whether the scorer reads the penultimate features (else only the logits)
    needs_features: bool = False

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def feature_dim(self) -> int | None:
        return None

    def num_classes(self) -> int | None:
        """The number of classes the fitted state expects (None: any)."""
        for name, axis in (("log_templates", 1), ("patterns", 0), ("weight", 0)):
            t = getattr(self, name, None)
            if isinstance(t, Tensor):
                return int(t.shape[axis])
        return None


def _energy(logits: Tensor) -> Tensor:
    return -torch.logsumexp(logits, dim=1)


def _buffer(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to(dtype).clone()


# ----- logit detectors --------------------------------------------------------------------------


class _MSP(Scorer):
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        # max softmax = 1 / sum_j exp(z_j - max z): no cancellation between two large logsumexps
        z = logits / self.temperature
        return -1.0 / torch.exp(z - z.amax(dim=1, keepdim=True)).sum(dim=1)


class _MaxLogit(Scorer):
    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        return -logits.amax(dim=1)


class _Energy(Scorer):
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        return -self.temperature * torch.logsumexp(logits / self.temperature, dim=1)


class _Entropy(Scorer):
    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        # H = logsumexp(z) - sum_j p_j z_j: no 0 * log 0 for classes whose probability underflows
        shifted = logits - logits.amax(dim=1, keepdim=True)
        return torch.logsumexp(shifted, dim=1) - (torch.softmax(shifted, dim=1) * shifted).sum(dim=1)


class _GEN(Scorer):
    def __init__(self, gamma: float, top_m: int) -> None:
        super().__init__()
        self.gamma = float(gamma)
        self.top_m = int(top_m)

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        z = logits
        m = min(self.top_m, z.shape[1])
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        top, idx = torch.topk(z, m, dim=1)
        log_p = top - lse
        log_1mp = torch.log1p(-torch.exp(log_p))
        # 1 - p_max from the other classes' logits, so that a confident prediction keeps it
        others = z.scatter(1, idx[:, :1], float("-inf"))
        first = torch.logsumexp(others, dim=1, keepdim=True) - lse
        log_1mp = torch.cat([first, log_1mp[:, 1:]], dim=1)
        return torch.exp(self.gamma * (log_p + log_1mp)).sum(dim=1)


class _KLMatching(Scorer):
    def __init__(self, log_templates: Tensor) -> None:
        super().__init__()
        self.register_buffer("log_templates", _buffer(log_templates, torch.float64))

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        log_p = torch.log_softmax(logits.to(torch.float64), dim=1)
        p = log_p.exp()
        nearest = (p @ self.log_templates.T).argmax(dim=1)  # max cross term = min KL
        kl = (p * (log_p - self.log_templates[nearest])).sum(dim=1)
        return kl.clamp_min(0).to(logits.dtype)


# ----- feature detectors ------------------------------------------------------------------------


class _FeatureScorer(Scorer):
    needs_features = True

    def feature_dim(self) -> int | None:
        """The feature dimension the fitted state expects (None: any)."""
        for name, axis in (("bank", 1), ("center", 0), ("basis", 0), ("patterns", 1), ("mean", 0), ("guides", 1), ("weight", 1)):
            t = getattr(self, name, None)
            if isinstance(t, Tensor):
                return int(t.shape[axis])
        return None


def _nearest_squared(y: Tensor, centres: Tensor) -> Tensor:
    """``min_c ||y - m_c||^2``: classes ranked by the expanded form, the best one recomputed from
    the difference vector (as ``_linalg.nearest_whitened``, without its per-row fallback)."""
    approx = torch.addmm(centres.square().sum(dim=1), y, centres.T, alpha=-2.0)
    best = approx.argmin(dim=1)
    return (y - centres[best]).square().sum(dim=1)


class _Mahalanobis(_FeatureScorer):
    def __init__(self, det: Mahalanobis | RelativeMahalanobis, dtype: torch.dtype) -> None:
        super().__init__()
        center, whiten, centres, background = det._scoring_params(dtype, torch.device("cpu"))
        self.rank = int(centres.shape[1])
        self.relative = isinstance(det, RelativeMahalanobis)
        for name, t in (("center", center), ("whiten", whiten), ("centres", centres), ("background", background)):
            self.register_buffer(name, _buffer(t, dtype))

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        y = (features - self.center) @ self.whiten
        score = _nearest_squared(y[:, : self.rank], self.centres)
        if self.relative:
            score = score - (y[:, self.rank :] - self.background).square().sum(dim=1)
        return score


class _Residual(_FeatureScorer):
    def __init__(self, det: Residual | ViM, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("basis", _buffer(det._residual_basis, dtype))
        self.register_buffer("shift", _buffer(det._origin_residual, torch.float64))

    def residual(self, x: Tensor) -> Tensor:
        # the constant u NS is subtracted in float64, as the detector does (u can be large)
        return torch.linalg.vector_norm((x @ self.basis).to(torch.float64) - self.shift, dim=1).to(x.dtype)

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        return self.residual(features)


class _ViM(_Residual):
    def __init__(self, det: ViM, dtype: torch.dtype) -> None:
        super().__init__(det, dtype)
        self.alpha = float(det._alpha)
        self.register_buffer("weight", _buffer(det.head_weight_, dtype))
        self.register_buffer("bias", _buffer(det.head_bias_, dtype))

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        energy = torch.logsumexp(torch.addmm(self.bias, features, self.weight.T), dim=1)
        return self.alpha * self.residual(features) - energy


def _unit_rows(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x, dim=1, eps=torch.finfo(x.dtype).tiny ** 0.5)


class _KNN(_FeatureScorer):
    """Exact k-th neighbour distance: the ``k + WINDOW + 1`` best bank rows by inner product, their
    distances recomputed from difference vectors (no ``2 - 2 a.b`` cancellation), the k-th smallest."""

    def __init__(self, det: KNN, dtype: torch.dtype) -> None:
        super().__init__()
        self.k = int(det.k)
        self.register_buffer("bank", _buffer(det.bank_, dtype))
        self.candidates = min(int(det.bank_.shape[0]), self.k + la.WINDOW + 1)

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        q = _unit_rows(features)
        index = torch.topk(q @ self.bank.T, self.candidates, dim=1).indices
        dist = torch.linalg.vector_norm(q[:, None, :] - self.bank[index], dim=2)
        return torch.topk(dist, self.k, dim=1, largest=False).values[:, -1]


class _NNGuide(_FeatureScorer):
    def __init__(self, det: NNGuide, dtype: torch.dtype) -> None:
        super().__init__()
        self.k = int(det.k)
        self.register_buffer("bank", _buffer(det.bank_, dtype))

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        guidance = torch.topk(_unit_rows(features) @ self.bank.T, self.k, dim=1).values.mean(dim=1)
        return -(guidance * torch.logsumexp(logits.to(features.dtype), dim=1))


class _SHE(_FeatureScorer):
    def __init__(self, det: SHE, dtype: torch.dtype) -> None:
        super().__init__()
        if not bool(det._has_pattern.all()):
            missing = torch.nonzero(~det._has_pattern)[:, 0]
            raise UnsupportedDetectorError(
                f"detector 'she': class(es) {_classes_text(missing)} had no training samples and so no stored pattern; "
                "the detector refuses samples predicted as them, which one exported forward pass cannot do. Fit it on data with every class"
            )
        self.register_buffer("patterns", _buffer(det._patterns, dtype))

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        return -(features * self.patterns[logits.argmax(dim=1)]).sum(dim=1)


class _FDBD(_FeatureScorer):
    def __init__(self, det: FDBD, dtype: torch.dtype) -> None:
        super().__init__()
        inverse, partners, mean = det._params(dtype, torch.device("cpu"))
        for name, t in (("inverse", inverse), ("partners", partners), ("mean", mean), ("weight", det.head_weight_), ("bias", det.head_bias_)):
            self.register_buffer(name, _buffer(t, dtype))
        self.floor = torch.finfo(dtype).tiny ** 0.5

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        z = torch.addmm(self.bias, features, self.weight.T)
        top, pred = z.max(dim=1)
        average = ((top[:, None] - z) * self.inverse[pred]).sum(dim=1) / self.partners[pred]
        spread = torch.linalg.vector_norm(features - self.mean, dim=1).clamp_min(self.floor)
        return -(average / spread)


class _ConjNorm(_FeatureScorer):
    def __init__(self, det: ConjNorm, dtype: torch.dtype) -> None:
        super().__init__()
        self.p = float(det.p)
        self.q = self.p / (self.p - 1.0)
        self.temperature = float(det.temperature)
        self.register_buffer("guides", _buffer(det.guides_, dtype))
        self.register_buffer("log_partition", _buffer(det.log_partition_, dtype))
        self.floor = torch.finfo(dtype).tiny ** 0.5

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        # p-norms written out (pow and sum), which every exporter knows
        norm = features.abs().pow(self.p).sum(dim=1, keepdim=True).pow(1.0 / self.p)
        xn = features / norm.clamp_min(self.floor)
        half_sq = 0.5 * xn.abs().pow(self.q).sum(dim=1).pow(2.0 / self.q)
        d = (xn @ self.guides.T) - half_sq[:, None]
        return -torch.logsumexp(d / self.temperature - self.log_partition, dim=1)


# ----- activation shaping -----------------------------------------------------------------------


class _Shaping(_FeatureScorer):
    """Keeps the detector's head when it has one; else scores with the model's own head."""

    def __init__(self, weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.own_head = weight is not None
        self.register_buffer("weight", _buffer(weight, dtype) if weight is not None else None)
        self.register_buffer("bias", _buffer(bias, dtype) if bias is not None else None)

    def head(self, x: Tensor, head_weight: Tensor | None, head_bias: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.own_head:
            return self.weight, self.bias
        assert head_weight is not None
        bias = head_bias if head_bias is not None else torch.zeros_like(head_weight[:, 0])
        return head_weight.to(x.dtype), bias.to(x.dtype)


class _ReAct(_Shaping):
    def __init__(self, det: ReAct, dtype: torch.dtype) -> None:
        super().__init__(det.head_weight_, det.head_bias_, dtype)
        self.clip = float(det.clip_)

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        w, b = self.head(features, head_weight, head_bias)
        return _energy(torch.addmm(b, features.clamp_max(self.clip), w.T))


class _DICE(_Shaping):
    def __init__(self, det: DICE, dtype: torch.dtype) -> None:
        super().__init__(det._masked_weight, det.head_bias_, dtype)

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        return _energy(torch.addmm(self.bias, features, self.weight.T))


def _top_k_mask(x: Tensor, k: int) -> Tensor:
    """The ``k`` largest entries of each row, ties with the k-th value going to the lower indices
    (the detectors' rule), without a data-dependent branch."""
    kth = torch.topk(x, k, dim=1).values[:, k - 1 : k]
    greater = x > kth
    tie = x == kth
    room = k - greater.sum(dim=1, keepdim=True)
    return greater | (tie & (tie.cumsum(dim=1) <= room))


def _scaled_energy(s1: Tensor, s2: Tensor, product: Tensor, bias: Tensor) -> Tensor:
    """Energy of ``exp(s1 / s2) * product + bias`` in float64; scale 1 where ``s2 == 0``."""
    s1d, s2d = s1.to(torch.float64), s2.to(torch.float64)
    nonzero = s2d != 0
    ratio = torch.where(nonzero, s1d / torch.where(nonzero, s2d, torch.ones_like(s2d)), torch.zeros_like(s2d))
    logits = torch.exp(ratio)[:, None] * product.to(torch.float64) + bias.to(torch.float64)
    return _energy(logits).to(product.dtype)


class _ASH(_Shaping):
    def __init__(self, det: ASH, dtype: torch.dtype) -> None:
        super().__init__(det.head_weight_, det.head_bias_, dtype)
        self.variant = str(det.variant)
        self.percentile = float(det.percentile)

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        x = features
        w, b = self.head(x, head_weight, head_bias)
        k = _kept_count(x.shape[1], self.percentile)
        if k == 0:  # nothing kept: the shaped features are all zero
            return _energy(b.expand(x.shape[0], -1))
        mask = _top_k_mask(x, k)
        kept = torch.where(mask, x, torch.zeros_like(x))
        if self.variant == "p":
            return _energy(torch.addmm(b, kept, w.T))
        if self.variant == "b":
            fill = (x.sum(dim=1, keepdim=True) / k).expand_as(x)
            return _energy(torch.addmm(b, torch.where(mask, fill, torch.zeros_like(x)), w.T))
        return _scaled_energy(x.sum(dim=1), kept.sum(dim=1), kept @ w.T, b)


class _Scale(_Shaping):
    def __init__(self, det: Scale, dtype: torch.dtype) -> None:
        super().__init__(det.head_weight_, det.head_bias_, dtype)
        self.percentile = float(det.percentile)

    def forward(self, logits: Tensor, features: Tensor | None, head_weight: Tensor | None, head_bias: Tensor | None) -> Tensor:
        x = features
        w, b = self.head(x, head_weight, head_bias)
        k = _kept_count(x.shape[1], self.percentile)
        if k == 0:
            raise ValueError(f"scale: percentile {self.percentile} keeps no activation of the {x.shape[1]} features; use a lower percentile")
        s2 = torch.topk(x, k, dim=1).values.sum(dim=1)  # ties do not change the sum
        return _scaled_energy(x.sum(dim=1), s2, x @ w.T, b)


# ----- the table --------------------------------------------------------------------------------

_BUILDERS: dict[type[Detector], Callable[[Detector, torch.dtype], Scorer]] = {
    MSP: lambda d, t: _MSP(d.temperature),
    TemperatureScaling: lambda d, t: _MSP(d.temperature_),
    MaxLogit: lambda d, t: _MaxLogit(),
    Energy: lambda d, t: _Energy(d.temperature),
    Entropy: lambda d, t: _Entropy(),
    GEN: lambda d, t: _GEN(d.gamma, d.top_m),
    KLMatching: lambda d, t: _KLMatching(d._log_templates),
    Mahalanobis: _Mahalanobis,
    RelativeMahalanobis: _Mahalanobis,
    Residual: _Residual,
    ViM: _ViM,
    KNN: _KNN,
    NNGuide: _NNGuide,
    SHE: _SHE,
    FDBD: _FDBD,
    ConjNorm: _ConjNorm,
    ReAct: _ReAct,
    DICE: _DICE,
    ASH: _ASH,
    Scale: _Scale,
}


def supported() -> list[str]:
    """Registry names of the detectors that :func:`scorer_for` turns into a scorer, sorted."""
    return sorted(cls.name for cls in _BUILDERS)


def check_supported(detector: Detector) -> None:
    """Raise :class:`UnsupportedDetectorError` when ``detector`` cannot be wrapped (it says why)."""
    if not isinstance(detector, Detector):
        raise TypeError(f"detector must be an ebood detector (ebood.detectors.create / ebood.load), got {type(detector).__name__}")
    name = detector.name
    if isinstance(detector, ModelDetector) or name in UNSUPPORTED_REASONS:
        reason = UNSUPPORTED_REASONS.get(name, "it needs the model itself (requires = ('model',)), not one forward pass's outputs")
        raise UnsupportedDetectorError(f"detector {name!r} cannot be wrapped into one exportable forward pass: {reason}. Supported: {', '.join(supported())}")
    if type(detector) not in _BUILDERS:
        raise UnsupportedDetectorError(f"detector {name!r} has no tensor implementation in ebood.deploy. Supported: {', '.join(supported())}")
    if isinstance(detector, KNN) and detector.index != "flat":
        raise UnsupportedDetectorError(
            f"detector 'knn' with index={detector.index!r} searches approximately (faiss / an inverted file), which does not export; "
            "the wrapped module searches exactly: set detector.index = 'flat' (the bank is the same) or refit with index='flat'"
        )


def scorer_for(detector: Detector, dtype: torch.dtype = torch.float32) -> Scorer:
    """The scorer of a fitted, supported ``detector``, its state in ``dtype`` (on the CPU)."""
    check_supported(detector)
    detector._check_fitted()
    detector._ensure_final()
    return _BUILDERS[type(detector)](detector, dtype).eval()

"""fDBD: fast decision-boundary-based detection (Liu & Qin, ICML 2024)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..._arrays import accumulation_dtype
from ...outputs import Head, Outputs
from .. import _linalg as la
from ..base import register
from ._common import _check_count, _FeatureDetector, _KeepsHead

__all__ = ["FDBD"]


@register
class FDBD(_KeepsHead, _FeatureDetector):
    """fDBD: fast decision-boundary-based detection (Liu & Qin, "Fast Decision Boundary based
    Out-of-Distribution Detector", ICML 2024).

    With the head ``z = W x + b`` and ``f = argmax_c z_c``, the distance of ``x`` to the decision
    boundary between ``f`` and ``c`` is ``|(w_f - w_c) . x + (b_f - b_c)| / ||w_f - w_c||``. The
    paper's confidence is the average of these distances over ``c != f``, regularised by the
    distance to the training mean:
    ``(1 / (C - 1)) sum_{c != f} |z_f - z_c| / ||w_f - w_c||  /  ||x - mu_train||``
    (OpenOOD v1.5 uses the sum instead of the average, the same ranking, and by default the same
    normaliser ``||x - mu_train||``). Score: its negation (higher = more OOD).

    Fit: the head and the training mean (batch sums accumulated in float64: streams and merges). Pairs of classes
    with identical weight rows have no decision boundary and are left out of the average (with a
    warning); an input exactly at the training mean has its normaliser clamped to
    ``sqrt(tiny)`` of the dtype instead of dividing by zero.
    """

    name = "fdbd"
    paper = "Liu & Qin, ICML 2024"
    fit_requires = ("head",)
    streaming = True

    def __init__(self) -> None:
        pass

    def _reset(self) -> None:
        self._started = True
        self.head_weight_ = None
        self.head_bias_ = None
        self.feature_sum_: torch.Tensor | None = None
        self.sample_count_ = 0

    def _accumulate(self, batch: Outputs) -> None:
        x = batch.feature()
        if batch.head.num_classes < 2:
            raise ValueError(f"{self.name}: the head has {batch.head.num_classes} class; decision boundaries need at least 2 classes")
        self._keep_head(batch.head)
        if self.feature_sum_ is None:
            self.feature_sum_ = torch.zeros(x.shape[1], dtype=torch.float64, device=self.head_weight_.device)
        # the batch's column sums in the features' precision (torch sums by cascades: an error of
        # a few ulps), accumulated over batches in float64
        sums = x.sum(dim=0, dtype=accumulation_dtype(x.dtype)).to(torch.float64)
        if not bool(torch.isfinite(sums).all()):  # NaN / inf in the batch (or an overflow)
            la.check_finite(x, "features", self.name)
            raise ValueError(f"detector {self.name!r}: the feature sums overflow {accumulation_dtype(x.dtype)}")
        self.feature_sum_ += sums.to(self.feature_sum_.device)
        self.sample_count_ = int(self.sample_count_) + int(x.shape[0])

    def _merge(self, other: "FDBD") -> None:
        if other.feature_sum_ is None:
            return
        if self.head_weight_ is None:
            self._keep_head(Head(other.head_weight_, other.head_bias_))
            self.feature_sum_ = torch.zeros_like(other.feature_sum_)
        else:
            self._check_same_head(other.head_weight_, other.head_bias_, "the other fit has")
        self.feature_sum_ += other.feature_sum_.to(self.feature_sum_.device)
        self.sample_count_ = int(self.sample_count_) + int(other.sample_count_)

    def _check_state(self) -> None:
        if not isinstance(self.feature_sum_, torch.Tensor) or self.feature_sum_.ndim != 1:
            raise ValueError("feature_sum_ must be a (D,) tensor")
        self._check_head_state(self.feature_sum_.shape[0])
        self.sample_count_ = _check_count(self.sample_count_, "sample_count_")

    def _finalize(self) -> None:
        if self.sample_count_ <= 0:
            raise ValueError(f"detector {self.name!r}: no training samples were seen")
        c = self.head_weight_.shape[0]
        if c < 2:
            raise ValueError(f"{self.name}: the head has {c} class; decision boundaries need at least 2 classes")
        w = self.head_weight_.to(torch.float64)
        sq = w.square().sum(dim=1)
        gram = w @ w.T
        dist_sq = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
        # pairs whose squared distance is at rounding level of ||w||^2 have identical rows
        degenerate = dist_sq <= 8 * torch.finfo(torch.float64).eps * (sq[:, None] + sq[None, :])
        degenerate.fill_diagonal_(True)
        inverse = torch.where(degenerate, torch.zeros_like(dist_sq), 1 / dist_sq.sqrt().clamp_min(torch.finfo(torch.float64).tiny))
        partners = (~degenerate).sum(dim=1)
        same = degenerate.clone().fill_diagonal_(False)
        if bool(same.any()):
            pairs = torch.nonzero(torch.triu(same))[:10].tolist()
            warnings.warn(
                f"{self.name}: head rows of classes {pairs} are identical (no decision boundary between them); those pairs are left out of the average",
                RuntimeWarning,
                stacklevel=4,
            )
        if bool((partners == 0).any()):
            raise ValueError(f"{self.name}: every row of the head is identical; the classifier has no decision boundary")
        self._inverse_norms = inverse  # 1 / ||w_f - w_c||, 0 on the diagonal and for identical rows
        self._partners = partners.to(torch.float64)
        self._mean = self.feature_sum_ / self.sample_count_
        self._cache: dict[Any, tuple[torch.Tensor, ...]] = {}

    def _params(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (dtype, str(device))
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device, dtype) for t in (self._inverse_norms, self._partners, self._mean))
        return self._cache[key]

    def _score(self, outputs: Outputs) -> torch.Tensor:
        self._check_scoring_head(outputs)
        x = self._features(outputs, self.feature_sum_.shape[0])
        acc = accumulation_dtype(x.dtype)
        inverse, partners, mean = self._params(acc, x.device)
        floor = torch.finfo(acc).tiny ** 0.5
        out = torch.empty(x.shape[0], dtype=acc, device=x.device)
        per_row = (self.head_weight_.shape[0] * 3 + x.shape[1]) * torch.finfo(acc).bits // 8
        for rows in la.row_slices(x.shape[0], per_row):
            xr = x[rows].to(acc)
            z = self._head_logits(xr)
            top, pred = z.max(dim=1)
            average = ((top[:, None] - z) * inverse[pred]).sum(dim=1) / partners[pred]
            spread = torch.linalg.vector_norm(xr - mean, dim=1).clamp_min(floor)
            out[rows] = -(average / spread)
        return self._finite_scores(out, x)

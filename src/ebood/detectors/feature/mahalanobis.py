"""Mahalanobis distance to the closest class (Lee et al., NeurIPS 2018)."""

from __future__ import annotations

import torch

from ..._arrays import accumulation_dtype
from ...outputs import Outputs
from .. import _linalg as la
from ..base import register
from ._gaussian import _ClassGaussian

__all__ = ["Mahalanobis"]


@register
class Mahalanobis(_ClassGaussian):
    """Mahalanobis distance to the closest class-conditional Gaussian with a shared covariance
    (Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples
    and Adversarial Attacks", NeurIPS 2018), on the penultimate features, without input
    preprocessing or layer ensembles (``mahalanobis_ensemble`` has those).

    Fit (labelled ID features): class means ``mu_c`` and the shared covariance of the
    class-centred features ``Sigma = 1/N sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T``.
    Score: ``min_c (x - mu_c)^T Sigma^+ (x - mu_c)``, the squared distance to the closest class
    (already higher = more OOD; the paper's confidence is its negation).

    ``Sigma^+`` is the inverse, or the pseudo-inverse (scipy ``pinvh``'s rank rule, as sklearn's
    ``EmpiricalCovariance``) with a warning when Sigma is singular (N < D, constant features).
    Classes without training samples are left out of the minimum (with a warning); labels must be
    ``0..C-1`` where C is known from the logits or head of the training outputs.

    Scoring: one product ``y = (x - m) W`` with ``W W^T = Sigma^+`` (``m`` the training mean
    rounded to the features' dtype), one with the whitened class means to rank the classes by the
    expanded form ``||y||^2 - 2 y.m_c + ||m_c||^2``, then ``||y - m_c||^2`` recomputed for the best
    class (and for every class within the expanded form's rounding margin of it), so the score
    keeps float32 accuracy where the expanded form cancels.
    """

    name = "mahalanobis"
    paper = "Lee et al., NeurIPS 2018"

    def _finalize(self) -> None:
        self._class_gaussian()

    def _score(self, outputs: Outputs) -> torch.Tensor:
        x = self._features(outputs, self.scatter_.shape[0])
        acc = accumulation_dtype(x.dtype)
        center, whiten, centres, _ = self._scoring_params(acc, x.device)
        per_row = (x.shape[1] + whiten.shape[1] * 6 + centres.shape[0]) * torch.finfo(acc).bits // 8
        out = torch.empty(x.shape[0], dtype=acc, device=x.device)
        for rows in la.row_slices(x.shape[0], per_row):
            y = (x[rows].to(acc) - center) @ whiten
            out[rows] = la.nearest_whitened(y, centres)[0]
        return self._finite_scores(out, x)

"""Relative Mahalanobis distance (Ren et al., 2021)."""

from __future__ import annotations

import torch

from ..._arrays import accumulation_dtype
from ...outputs import Outputs
from .. import _linalg as la
from ..base import register
from ._gaussian import _ClassGaussian

__all__ = ["RelativeMahalanobis"]


@register
class RelativeMahalanobis(_ClassGaussian):
    """Relative Mahalanobis distance (Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, "A Simple
    Fix to Mahalanobis Distance for Improving Near-OOD Detection", 2021).

    Fit: the class-conditional Gaussians of :class:`Mahalanobis` (class means, shared class-centred
    covariance ``Sigma``) and a background Gaussian of all training features (mean ``mu_0``,
    covariance ``Sigma_0``, as OpenOOD's RMDS). With ``MD_c(x) = (x - mu_c)^T Sigma^+ (x - mu_c)``
    and ``MD_0(x) = (x - mu_0)^T Sigma_0^+ (x - mu_0)``:
    ``score = min_c MD_c(x) - MD_0(x)`` (the paper's confidence is ``-min_c (MD_c - MD_0)``,
    negated here: higher = more OOD). The background covariance is the within-class scatter plus
    the between-class scatter of the class means, so it streams with the same sums.
    """

    name = "relative_mahalanobis"
    paper = "Ren et al., 2021 (arXiv:2106.09022)"

    def _finalize(self) -> None:
        self._class_gaussian()
        _, _, total = la.total_moments(self._moments())
        self._background = la.inverse_sqrt(total / self._n, self.name, "background covariance")

    def _score(self, outputs: Outputs) -> torch.Tensor:
        x = self._features(outputs, self.scatter_.shape[0])
        acc = accumulation_dtype(x.dtype)
        center, joint, centres, background = self._scoring_params(acc, x.device)
        r = centres.shape[1]
        per_row = (x.shape[1] + joint.shape[1] * 2 + r * 5 + centres.shape[0]) * torch.finfo(acc).bits // 8
        out = torch.empty(x.shape[0], dtype=acc, device=x.device)
        for rows in la.row_slices(x.shape[0], per_row):
            y = (x[rows].to(acc) - center) @ joint  # class part and background part in one product
            md_class = la.nearest_whitened(y[:, :r], centres)[0]
            out[rows] = md_class - (y[:, r:] - background).square().sum(dim=1)
        return self._finite_scores(out, x)

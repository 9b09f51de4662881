"""Residual norm outside the principal space (Wang et al., CVPR 2022)."""

from __future__ import annotations

import torch

from ..._arrays import accumulation_dtype
from ...outputs import Outputs
from ..base import register
from ._principal import _PrincipalSpace

__all__ = ["Residual"]


@register
class Residual(_PrincipalSpace):
    """Residual norm (Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit
    Matching", CVPR 2022; the paper's "Residual" baseline).

    Fit: the origin ``u = -pinv(W) b`` of the head ``(W, b)``, and the principal space: the
    ``dim`` eigenvectors of largest eigenvalue of the second moment
    ``1/N sum_i (x_i - u)(x_i - u)^T`` (sklearn ``EmpiricalCovariance(assume_centered=True)`` of
    ``x - u``, as the official code; ``pinv`` drops singular values below ``max(C, D) * eps`` of
    the head's dtype, numpy's rule, so float32 rounding of a rank-deficient head does not throw
    ``u`` far away). Score: ``||x^{P-perp}|| = ||(x - u) NS||``, the norm of the
    part of ``x - u`` outside the principal space (``NS`` an orthonormal basis of its complement;
    higher = more OOD). Default ``dim``: the official code's rule (1000 for D >= 2048, 512 for
    D >= 768, else D/2, e.g. OpenOOD v1.5's 256 for ResNet-18's 512 features).
    The second moment streams as mean + centred scatter (float64).
    """

    name = "residual"
    paper = "Wang et al., CVPR 2022"

    def _finalize(self) -> None:
        self._principal_space()

    def _score(self, outputs: Outputs) -> torch.Tensor:
        self._check_scoring_head(outputs)
        x = self._features(outputs, self.feature_mean_.shape[0])
        out = self._residual_norms(x, accumulation_dtype(x.dtype))
        return self._finite_scores(out, x)

"""DOCTOR (Granese, Romanelli, Gorla, Palamidessi & Piantanida, "DOCTOR: A Simple Method for
Detecting Misclassification Errors", NeurIPS 2021)."""

from __future__ import annotations

import torch

from .. import scores
from .._arrays import accumulation_dtype
from ..outputs import Outputs
from .base import Detector, register
from .logit import _row_chunks

__all__ = ["DOCTOR"]

VARIANTS = ("alpha", "beta")


@register
class DOCTOR(Detector):
    """DOCTOR's two discriminators on ``p = softmax(z / T)`` (Granese et al., NeurIPS 2021).

    * ``variant="alpha"``: ``D_alpha = (1 - g) / g`` with ``g = sum_j p_j^2`` (the probability
      that two draws from ``p`` agree);
    * ``variant="beta"``: ``D_beta = (1 - max_j p_j) / max_j p_j`` (the estimated error
      probability over the probability of the prediction).

    Both are already higher = more likely wrong (no sign flip); the paper rejects a prediction
    when ``D > gamma``. The official code (github.com/fgranese/DOCTOR) computes
    ``1 - sum_j p_j^2`` and the ratio ``F / (1 - F)`` the same way. The paper's optional input
    perturbation needs the model and gradients; this post-hoc detector uses the outputs as they
    are (the paper's "totally black box" setting).

    Computed so that confident predictions keep their precision: ``D_beta = sum_{j != argmax}
    exp((z_j - z_max) / T)`` exactly, and ``1 - g = sum_j p_j (1 - p_j)`` with ``1 - p_max``
    taken from the other classes' mass rather than from ``1 - p_max``.
    """

    name = "doctor"
    needs_fit = False
    paper = "Granese et al., NeurIPS 2021"

    def __init__(self, variant: str = "alpha", temperature: float = 1.0) -> None:
        self.variant = variant
        self.temperature = temperature
        if variant not in VARIANTS:
            raise ValueError(f"doctor: variant must be 'alpha' or 'beta', got {variant!r}")
        scores._check_temperature(temperature)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        logits = outputs.logits
        acc = accumulation_dtype(logits.dtype)
        n, c = logits.shape
        parts = [self._chunk(logits[rows].to(torch.float64)).to(acc) for rows in _row_chunks(n, c, torch.float64)]
        return torch.cat(parts) if parts else torch.empty(0, dtype=acc, device=logits.device)

    def _chunk(self, z: torch.Tensor) -> torch.Tensor:
        shifted = (z - z.max(dim=1, keepdim=True).values) / float(self.temperature)
        e = shifted.exp()
        top = e.argmax(dim=1, keepdim=True)
        others = e.scatter(1, top, 0.0).sum(dim=1)  # sum over non-top classes of exp(z_j - z_max)
        if self.variant == "beta":
            return others
        total = 1.0 + others
        p = e / total[:, None]
        p_max = 1.0 / total
        one_minus_p = (1.0 - p).scatter(1, top, (others / total)[:, None])
        one_minus_g = (p * one_minus_p).sum(dim=1)
        g = p_max * p_max + (p * p).scatter(1, top, 0.0).sum(dim=1)
        return one_minus_g / g

"""Detectors that read only the logits."""

from __future__ import annotations

import torch

from .. import scores
from ..outputs import Outputs
from .base import Detector, register

__all__ = ["MSP", "MaxLogit", "Energy", "Entropy"]


@register
class MSP(Detector):
    """Maximum softmax probability (Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and
    Out-of-Distribution Examples in Neural Networks", ICLR 2017).

    ``score = -max_j softmax(z / T)_j`` (the paper's confidence, negated: higher = more OOD).
    """

    name = "msp"
    needs_fit = False
    paper = "Hendrycks & Gimpel, ICLR 2017"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature
        scores._check_temperature(temperature)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return scores.msp(outputs.logits, self.temperature)


@register
class MaxLogit(Detector):
    """Maximum logit (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
    Settings", ICML 2022). ``score = -max_j z_j`` (negated: higher = more OOD)."""

    name = "max_logit"
    needs_fit = False
    paper = "Hendrycks et al., ICML 2022"

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return scores.max_logit(outputs.logits)


@register
class Energy(Detector):
    """Energy score (Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020).

    ``score = E(x) = -T * logsumexp(z / T)`` (already higher = more OOD; no sign flip).
    """

    name = "energy"
    needs_fit = False
    paper = "Liu et al., NeurIPS 2020"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature
        scores._check_temperature(temperature)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return scores.energy(outputs.logits, self.temperature)


@register
class Entropy(Detector):
    """Predictive entropy ``H = -sum_j p_j log p_j`` of ``p = softmax(z)``, in nats (higher = more OOD)."""

    name = "entropy"
    needs_fit = False
    paper = "Shannon entropy of the softmax (a classic uncertainty baseline)"

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return scores.entropy(outputs.logits)

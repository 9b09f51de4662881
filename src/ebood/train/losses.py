"""Training objectives: energy-bounded learning and Outlier Exposure (with auxiliary outliers), LogitNorm.

The losses are called as ``loss(in_logits, labels, out_logits)`` and return a :class:`LossParts`
whose ``total`` is the scalar to back-propagate. The parts obey one formula for all losses::

    total = ce + weight * (in_term + out_term)

so logging code can treat them alike. ``in_term`` and ``out_term`` are the *unweighted*
regularisers; Outlier Exposure has no in-distribution regulariser and reports ``in_term = 0``.
:class:`LogitNormLoss` uses no outliers (``out_logits`` is optional and ignored): its ``ce`` is the
cross-entropy of the normalised logits and both regularisers are 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["LossParts", "EnergyBoundedLoss", "OutlierExposureLoss", "LogitNormLoss", "free_energy"]


class LossParts(NamedTuple):
    """A loss value and its parts: ``total = ce + weight * (in_term + out_term)``.

    ``ce`` is the cross-entropy on the in-distribution batch; ``in_term`` / ``out_term`` are the
    unweighted regularisers on in-distribution and outlier logits (0-d tensors).
    """

    total: torch.Tensor
    ce: torch.Tensor
    in_term: torch.Tensor
    out_term: torch.Tensor


def free_energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Differentiable free energy ``E(x) = -T * logsumexp(f(x) / T)`` per row of ``(N, C)`` logits.

    Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020, eq. (5).
    (``ebood.scores.energy`` computes the same number without autograd, for scoring.)
    """
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


def _check_weight(weight: float) -> float:
    w = float(weight)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"weight must be finite and >= 0, got {weight!r}")
    return w


def _check_finite(value: float, name: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return v


def _check_inputs(in_logits: torch.Tensor, labels: torch.Tensor, out_logits: torch.Tensor) -> None:
    """Shapes, dtypes and label range, each with an error that names the argument."""
    for name, t in (("in_logits", in_logits), ("labels", labels), ("out_logits", out_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}")
    for name, t in (("in_logits", in_logits), ("out_logits", out_logits)):
        if t.ndim != 2:
            raise ValueError(f"{name} must have shape (batch, classes), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is empty: the batch needs at least one sample")
    if in_logits.shape[1] != out_logits.shape[1]:
        raise ValueError(
            f"in_logits and out_logits must have the same number of classes, "
            f"got {in_logits.shape[1]} and {out_logits.shape[1]}"
        )
    if labels.ndim != 1 or labels.shape[0] != in_logits.shape[0]:
        raise ValueError(
            f"labels must have shape ({in_logits.shape[0]},) to match in_logits {tuple(in_logits.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= in_logits.shape[1]:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"labels must be class indices in [0, {in_logits.shape[1] - 1}], found {bad} "
            f"(in-distribution data needs labels; -1 marks unlabelled data, allowed only for outliers)"
        )


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """``(N, C)`` floating logits and ``(N,)`` integer labels in ``[0, C)``, each error naming the argument."""
    for name, t in (("logits", logits), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor of shape (batch, classes), got {tuple(logits.shape)} {logits.dtype}")
    if logits.shape[0] == 0:
        raise ValueError("logits is empty: the batch needs at least one sample")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},) to match logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= logits.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {logits.shape[1] - 1}], found {lo if lo < 0 else hi}")


class EnergyBoundedLoss:
    """Energy-bounded learning objective (Liu, Wang, Owens & Li, NeurIPS 2020, eq. 9)::

        total = CE(f(x_in), y) + weight * (mean(relu(E(x_in) - m_in)^2) + mean(relu(m_out - E(x_out))^2))

    with ``E(x) = -T * logsumexp(f(x) / T)``. The hinges push in-distribution energies below
    ``m_in`` and outlier energies above ``m_out``; samples already past their margin add nothing.
    The defaults are the official code's argparse defaults; its run script uses ``m_in = -23,
    m_out = -5`` on CIFAR-10 and ``-27 / -5`` on CIFAR-100 (see ``ebood.train.presets``).
    """

    def __init__(self, m_in: float = -25.0, m_out: float = -7.0, weight: float = 0.1, temperature: float = 1.0):
        self.m_in = _check_finite(m_in, "m_in")
        self.m_out = _check_finite(m_out, "m_out")
        self.weight = _check_weight(weight)
        t = float(temperature)
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
        self.temperature = t

    def __call__(self, in_logits: torch.Tensor, labels: torch.Tensor, out_logits: torch.Tensor) -> LossParts:
        _check_inputs(in_logits, labels, out_logits)
        ce = F.cross_entropy(in_logits, labels)
        e_in = free_energy(in_logits, self.temperature)
        e_out = free_energy(out_logits, self.temperature)
        in_term = F.relu(e_in - self.m_in).pow(2).mean()
        out_term = F.relu(self.m_out - e_out).pow(2).mean()
        return LossParts(ce + self.weight * (in_term + out_term), ce, in_term, out_term)

    def config(self) -> dict[str, float | str]:
        """The settings as plain values (saved with checkpoints)."""
        return {"loss": "energy", "m_in": self.m_in, "m_out": self.m_out, "weight": self.weight,
                "temperature": self.temperature}

    def __repr__(self) -> str:
        return (f"EnergyBoundedLoss(m_in={self.m_in}, m_out={self.m_out}, weight={self.weight}, "
                f"temperature={self.temperature})")


class OutlierExposureLoss:
    """Outlier Exposure objective (Hendrycks, Mazeika & Dietterich, ICLR 2019)::

        total = CE(f(x_in), y) + weight * mean over outliers of H(U, softmax(f(x_out)))

    where ``H(U, p) = -(1/C) sum_j log p_j = logsumexp(f) - mean_j f_j`` is the cross-entropy from
    the uniform distribution to the softmax. It is smallest (``log C``) for a uniform softmax.
    ``in_term`` is reported as 0 so that the parts follow ``total = ce + weight * (in_term + out_term)``.
    """

    def __init__(self, weight: float = 0.5):
        self.weight = _check_weight(weight)

    def __call__(self, in_logits: torch.Tensor, labels: torch.Tensor, out_logits: torch.Tensor) -> LossParts:
        _check_inputs(in_logits, labels, out_logits)
        ce = F.cross_entropy(in_logits, labels)
        out_term = (torch.logsumexp(out_logits, dim=1) - out_logits.mean(dim=1)).mean()
        in_term = torch.zeros((), dtype=out_term.dtype, device=out_term.device)
        return LossParts(ce + self.weight * out_term, ce, in_term, out_term)

    def config(self) -> dict[str, float | str]:
        """The settings as plain values (saved with checkpoints)."""
        return {"loss": "oe", "weight": self.weight}

    def __repr__(self) -> str:
        return f"OutlierExposureLoss(weight={self.weight})"


class LogitNormLoss:
    """LogitNorm (Wei, Xie, Cheng, Feng, An & Li, "Mitigating Neural Network Overconfidence with
    Logit Normalization", ICML 2022, eq. 5): the cross-entropy of logits scaled to norm ``1 / tau``::

        total = ce = CE(f(x) / (tau * (||f(x)||_2 + 1e-7)), y)

    The norm no longer grows with training, so the softmax cannot become over-confident by scaling
    the logits; only their direction is learned. The 1e-7 guards a zero logit vector, as in the
    official code. ``tau`` (the paper's temperature): 0.04 is the paper's CIFAR-10 setting (the
    official README's example run uses 0.01; its argparse default 1.0 is plain normalisation).
    Smaller ``tau`` means larger normalised logits. Called as ``loss(logits, labels)`` (an
    ``out_logits`` third argument, passed by ``finetune``, is ignored: LogitNorm uses no outliers);
    returns :class:`LossParts` with ``in_term = out_term = 0``.
    """

    #: ``ebood.train.finetune`` may be run without outlier data for this loss
    needs_outliers = False

    def __init__(self, tau: float = 0.04):
        t = float(tau)
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"tau must be finite and > 0, got {tau!r}")
        self.tau = t

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, out_logits: torch.Tensor | None = None) -> LossParts:
        _check_logits_labels(logits, labels)
        norms = torch.linalg.vector_norm(logits, dim=1, keepdim=True) + 1e-7
        ce = F.cross_entropy(logits / (norms * self.tau), labels)
        zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
        return LossParts(ce, ce, zero, zero)

    def config(self) -> dict[str, float | str]:
        """The settings as plain values (saved with checkpoints)."""
        return {"loss": "logitnorm", "tau": self.tau}

    def __repr__(self) -> str:
        return f"LogitNormLoss(tau={self.tau})"

"""Noise-conditional score networks for :mod:`ebood.detectors.msma`: architecture and noise schedule.

Only what scoring needs lives here (the modules, built again from plain settings and a state dict);
training is in ``_msma_fit`` and is imported by ``fit`` alone.

Each network returns, for one input ``x``, the *weighted* scores ``sigma_i * s(x, sigma_i)`` at all
``L`` noise scales at once (shape ``(N, L, *x.shape[1:])``): the noise level conditions the output
layer (one output head per scale), so one forward pass gives the whole ``L``-vector of score norms.
NCSN (Song & Ermon, NeurIPS 2019), the network of the MSMA paper, conditions every layer instead
(conditional instance norm) and needs ``L`` passes per input; sharing the trunk trades some
capacity for an ``L`` times cheaper score. The weighting by ``sigma_i`` makes the regression target
``-z`` (unit variance) at every scale, as ``sigma^2``-weighted denoising score matching implies.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["geometric_sigmas", "MLPScoreNetwork", "ConvScoreNetwork", "build_network", "score_norms"]


def geometric_sigmas(sigma_high: float, sigma_low: float, num_scales: int) -> torch.Tensor:
    """``num_scales`` noise levels from ``sigma_high`` down to ``sigma_low`` in geometric progression
    (float64), the schedule of NCSN and of the MSMA paper (``sigma_1 = 1, sigma_L = 0.01, L = 10``)."""
    if isinstance(num_scales, bool) or not isinstance(num_scales, int) or num_scales < 1:
        raise ValueError(f"num_scales must be an integer >= 1, got {num_scales!r}")
    hi, lo = float(sigma_high), float(sigma_low)
    if not (math.isfinite(hi) and math.isfinite(lo) and 0 < lo <= hi):
        raise ValueError(f"noise levels must satisfy 0 < sigma_low <= sigma_high, got sigma_low={sigma_low!r}, sigma_high={sigma_high!r}")
    if num_scales == 1:
        return torch.tensor([hi], dtype=torch.float64)
    return torch.exp(torch.linspace(math.log(hi), math.log(lo), num_scales, dtype=torch.float64))


class MLPScoreNetwork(nn.Module):
    """Scores of ``dim``-dimensional vectors: ``depth`` hidden layers of ``hidden`` units (SiLU) and a
    linear output of ``num_scales * dim`` values, read as ``(N, L, dim)``."""

    def __init__(self, dim: int, num_scales: int, hidden: int = 256, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Linear(width, num_scales * dim)
        self.dim, self.num_scales = dim, num_scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.trunk(x)).view(x.shape[0], self.num_scales, self.dim)


class ConvScoreNetwork(nn.Module):
    """Scores of ``(C, H, W)`` images: 3x3 convolutions with ``hidden`` channels and dilations 1, 2, 4, 1
    (SiLU; the receptive field covers 17x17 pixels at full resolution), then a 3x3 output convolution
    with ``num_scales * C`` channels, read as ``(N, L, C, H, W)``."""

    dilations = (1, 2, 4, 1)

    def __init__(self, channels: int, num_scales: int, hidden: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = channels
        for d in self.dilations:
            layers += [nn.Conv2d(width, hidden, 3, padding=d, dilation=d), nn.SiLU()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, num_scales * channels, 3, padding=1)
        self.channels, self.num_scales = channels, num_scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(self.trunk(x))
        return y.view(x.shape[0], self.num_scales, self.channels, *x.shape[2:])


def build_network(config: dict[str, Any]) -> nn.Module:
    """The network described by ``config`` (plain values saved with the detector)."""
    kind = config.get("kind")
    if kind == "mlp":
        return MLPScoreNetwork(int(config["dim"]), int(config["num_scales"]), int(config["hidden"]), int(config["depth"]))
    if kind == "conv":
        return ConvScoreNetwork(int(config["channels"]), int(config["num_scales"]), int(config["hidden"]))
    raise ValueError(f"unknown score network kind {kind!r}")


def score_norms(network: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``(N, L)`` L2 norms ``||sigma_i * s(x, sigma_i)||`` of the weighted scores of ``x`` (one pass per batch)."""
    parts = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            out = network(x[start : start + batch_size])
            parts.append(torch.linalg.vector_norm(out.flatten(2), dim=2))
    return torch.cat(parts)

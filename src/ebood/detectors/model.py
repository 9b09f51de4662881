"""Detectors that need the model itself (input perturbation, gradients, stochastic passes)."""

from __future__ import annotations

__all__: list[str] = []

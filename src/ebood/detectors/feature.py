"""Detectors that read penultimate features (and labels / the head to fit)."""

from __future__ import annotations

__all__: list[str] = []

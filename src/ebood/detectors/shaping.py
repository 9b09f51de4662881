"""Activation-shaping detectors: shape the pooled penultimate features, re-apply the head, score."""

from __future__ import annotations

__all__: list[str] = []

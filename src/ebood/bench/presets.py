"""Benchmark presets shipped with ebood: TOML files in ``presets/`` (copy one to start your own)."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from .config import BenchConfig, ConfigError, load_config

__all__ = ["available_presets", "preset_path", "load_preset"]


def _folder() -> Path:
    return Path(str(resources.files("ebood.bench") / "presets"))


def available_presets() -> list[str]:
    """Names of the shipped presets (e.g. ``cifar10-energy``, ``openood-cifar10``)."""
    return sorted(p.stem for p in _folder().glob("*.toml"))


def preset_path(name: str) -> Path:
    """The TOML file of a preset; an unknown name lists the known ones."""
    path = _folder() / f"{name}.toml"
    if not path.is_file():
        close = difflib.get_close_matches(name, available_presets(), n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}.{hint} Presets: {', '.join(available_presets())}")
    return path


def load_preset(name: str) -> BenchConfig:
    return load_config(preset_path(name))

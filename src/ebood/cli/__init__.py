"""ebood's command line. One module per group of commands; each registers on the shared ``app``.

* ``scoring``: ``score``, ``evaluate``
* ``detecting``: ``fit``, ``detectors``
* ``calibrating``: ``calibrate``
* ``models``: ``extract``
* ``training``: ``train``, ``finetune``
* ``benchmarking``: ``bench``, ``report``
* ``deploying``: ``export``, ``serve``
"""

from __future__ import annotations

import importlib

from ._app import app, main

__all__ = ["app", "main", "load_commands"]

_MODULES = ("scoring", "detecting", "calibrating", "models", "training", "benchmarking", "deploying")


def load_commands() -> None:
    """Import every command module (each registers its commands on ``app`` once)."""
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")

"""Help-text helpers: lists of accepted values are built from ebood's registries, never typed by hand."""

from __future__ import annotations

import typing
from typing import Iterable

from ..data import SPEC_FORMS, available_builtin
from ..extraction import Pool
from ..models import BUILTINS
from ._app import fail


def one_of(values: Iterable[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b or c"`` (for help texts)."""
    items = [str(v) for v in values]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def check_choice(value: str, allowed: Iterable[str], option: str) -> str:
    """``value`` when it is one of ``allowed``, else the one-line CLI error naming them."""
    allowed = list(allowed)
    if value not in allowed:
        fail(f"{option} must be {one_of(allowed)}, got {value!r}")
    return value


#: ``--model``: the built-in architectures come from ebood.models.BUILTINS.
MODEL_HELP = ("Model: a built-in architecture (" + one_of(sorted(BUILTINS)) + "), an entry point "
              "package.module:function, or a TorchScript file.")
#: a dataset spec of ebood.data.open_dataset, with the built-in sets' names.
DATA_SPEC_HELP = ("Dataset spec: " + ", ".join(f.replace("|", " | ") for f in SPEC_FORMS)
                  + " (the NAME of builtin:NAME is " + one_of(available_builtin()) + ")")
#: ``--pool`` of ebood extract, from ebood.extraction.Pool.
POOL_MODES: tuple[str, ...] = typing.get_args(Pool)

#: how to get Ray, for help texts (ebood is installed from a clone, not from PyPI)
RAY_INSTALL = "needs Ray: .venv/bin/pip install -c constraints-cpu.txt -e '.[ray]' in ebood's clone"

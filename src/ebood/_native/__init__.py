"""Loader of ebood's optional native kernels (built at install time by setup.py).

``scores_kernel`` is the compiled module ``ebood._native._scores``, or ``None`` when it was not
built (no C compiler at install time) or when the environment variable ``EBOOD_NO_NATIVE=1`` asks
for the pure-torch code paths (tests use it to cover both). ``scores_kernel_isa`` names the
instruction set the kernel selected at run time (``"avx2+fma"`` or ``"portable"``), or ``None``.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Callable

__all__ = ["scores_kernel", "scores_kernel_isa", "native_disabled", "triton_score_kernel"]


def native_disabled() -> bool:
    """True when ``EBOOD_NO_NATIVE`` is set to something other than "", "0" or "false"."""
    return os.environ.get("EBOOD_NO_NATIVE", "").strip().lower() not in ("", "0", "false", "no")


def _load() -> ModuleType | None:
    if native_disabled():
        return None
    try:
        from . import _scores
    except ImportError:
        return None
    return _scores


scores_kernel: ModuleType | None = _load()
scores_kernel_isa: str | None = getattr(scores_kernel, "isa", None)


_triton: list[Callable[..., Any] | None] = []


def triton_score_kernel() -> Callable[..., Any] | None:
    """The CUDA kernel of the logit scores (:mod:`ebood._native._triton_scores`), or ``None`` where
    Triton is not installed (CPU builds of torch) or ``EBOOD_NO_NATIVE`` is set. Imported on the
    first call, not with ebood: importing Triton takes a while and only CUDA inputs need it."""
    if native_disabled():
        return None
    if not _triton:
        try:
            from ._triton_scores import write_scores
        except ImportError:
            write_scores = None  # type: ignore[assignment]
        _triton.append(write_scores)
    return _triton[0]


"""Turning user input (numpy arrays, torch tensors, lists) into validated torch tensors.

Every public function of ebood accepts numpy arrays and torch tensors on any device; this module
is the one place that converts and checks them, so that errors name the argument and the problem.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """Return ``x`` as a torch tensor without copying where possible.

    Accepts torch tensors (any device), numpy arrays and nested lists / scalars.
    """
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name} has dtype object; expected a numeric array")
        if not x.flags.writeable:
            x = x.copy()
        return torch.from_numpy(np.ascontiguousarray(x))
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}") from exc


def as_float_tensor(x: Any, name: str) -> torch.Tensor:
    """Like :func:`as_tensor`, but the result must be a floating tensor (float16/bfloat16/32/64).

    Integer inputs are promoted to float32; booleans and complex numbers are rejected.
    """
    t = as_tensor(x, name)
    if t.dtype in FLOAT_DTYPES:
        return t
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} has dtype {t.dtype}; expected a real floating dtype")
    if not t.is_floating_point():
        return t.to(torch.float32)
    raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected float16, bfloat16, float32 or float64")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for everything narrower (the ebood array contract)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_scores_1d(x: Any, name: str) -> np.ndarray:
    """A 1-D float64 numpy array of finite scores, or a ValueError naming what is wrong."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D array of numbers: {exc}") from exc
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one score per sample), got shape {tuple(a.shape)}")
    if a.size == 0:
        raise ValueError(f"{name} is empty: at least one score is needed")
    finite = np.isfinite(a)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        n_nan = int(np.isnan(a[bad]).sum())
        raise ValueError(
            f"{name} has {bad.size} non-finite value(s) ({n_nan} NaN, {bad.size - n_nan} inf), "
            f"first at index {int(bad[0])}; metrics need finite scores"
        )
    return a


def as_correct(correct: Any, n: int, name: str = "correct") -> np.ndarray:
    """``correct`` as a 1-D bool numpy array of length ``n`` (bool, or numbers that are all 0 / 1)."""
    if isinstance(correct, torch.Tensor):
        correct = correct.detach().to("cpu").numpy()
    a = np.asarray(correct)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one flag per sample), got shape {tuple(a.shape)}")
    if a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} entries but scores has {n}: one flag per score is needed")
    if a.dtype == np.bool_:
        return a
    if a.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be boolean (True = the prediction was right), got dtype {a.dtype}")
    valid = (a == 0) | (a == 1)
    if not valid.all():
        i = int(np.flatnonzero(~valid)[0])
        raise ValueError(f"{name} must be boolean or 0/1, got {a[i]!r} at index {i}")
    return a != 0

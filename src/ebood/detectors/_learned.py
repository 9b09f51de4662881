"""Declared learned state: what a detector's ``fit`` leaves behind, stated once per class.

Each detector lists its learned attributes in ``learned_state``, a dict ``name -> Learned``:
the kind of value (tensor, dict of tensors, integer, number, text), for tensors the dtype kind and
the shape written with symbols (``("C", "D")``; ``"L+1"`` is one more than ``L``; an integer
attribute can bind a symbol, e.g. ``bank_size_`` binds ``N`` of ``bank_ ("N", "D")``).
:meth:`Detector.save` checks the state against the declaration before writing it, and
:func:`ebood.load` checks a file against it before any attribute is set, so that a file can
neither set an unknown attribute (or shadow a method) nor carry a tensor of the wrong dtype or
shape. Checks that need more than one value's type and shape (a faiss index, a sample size) stay
in the detector's ``_validate_state``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Container, Mapping

import torch

from ..state import StateError

__all__ = ["Learned", "tensor", "tensors", "integer", "number", "text", "texts", "check_learned", "check_header", "learned_values",
           "CALIBRATION_PREFIX", "HEADER_KEYS"]

#: learned plain values set by ``calibrate`` (e.g. ``calibration_tpr_``) for every detector
CALIBRATION_PREFIX = "calibration_"

_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "float": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "float64": (torch.float64,),
    "int": (torch.int64, torch.int32),
    "uint8": (torch.uint8,),
    "real": (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32),
}
_DIM = re.compile(r"^([A-Za-z]\w*)(?:\+(\d+))?$")


@dataclass(frozen=True)
class Learned:
    """One learned attribute. Use the constructors below (``tensor``, ``integer``, ...)."""

    kind: str  # "tensor", "tensors", "int", "ints", "number", "text", "texts", "mapping"
    dtype: str = "float"  # tensors: a key of _DTYPES
    shape: tuple[str | int, ...] | None = None  # tensors: one entry per dimension (None: any shape)
    ndim: int | None = None  # "tensors": every tensor of the dict has this many dimensions
    optional: bool = False  # may be None (or absent)
    minimum: float | None = None  # int / number: smallest allowed value
    positive: bool = False  # number: > 0
    binds: str | None = None  # int: the shape symbol that the value fixes
    choices: tuple[str, ...] = ()  # text: allowed values
    finite: bool = True  # floating tensors / numbers: every value finite (False: +/-inf allowed, NaN never)

    def describe(self) -> str:
        if self.kind == "tensor" and self.shape is None:
            return f"a {self.dtype} tensor"
        if self.kind == "tensor":
            dims = ", ".join(str(d) for d in self.shape or ())
            return f"a {self.dtype} tensor of shape ({dims}{',' if len(self.shape or ()) == 1 else ''})"
        if self.kind == "tensors":
            return f"a dict of {'' if self.ndim is None else f'{self.ndim}-D '}{self.dtype} tensors"
        if self.kind == "ints":
            return "a list of integers >= 1"
        if self.kind == "mapping":
            return "a JSON object of numbers, strings and lists of numbers"
        if self.kind == "int":
            return f"an integer >= {self.minimum:g}" if self.minimum is not None else "an integer"
        if self.kind == "number":
            return "a finite number" + (" > 0" if self.positive else "")
        if self.kind == "text":
            return "one of " + ", ".join(map(repr, self.choices)) if self.choices else "a string"
        return "a list of strings"


def tensor(*shape: str | int, dtype: str = "float", optional: bool = False, finite: bool = True, any_shape: bool = False) -> Learned:
    """A tensor of ``dtype`` kind (``"float"``: any float dtype; ``"float64"``, ``"int"``, ``"uint8"``,
    ``"real"``: float or int); ``any_shape``: its shape is checked by the detector itself."""
    for d in shape:
        if not isinstance(d, int) and not _DIM.match(d):
            raise ValueError(f"bad shape symbol {d!r}")
    return Learned("tensor", dtype=dtype, shape=None if any_shape else tuple(shape), optional=optional, finite=finite)


def ints() -> Learned:
    """A list of integers >= 1 (e.g. a sample shape)."""
    return Learned("ints")


def mapping() -> Learned:
    """A JSON object of plain values (numbers, strings, booleans, lists of numbers): a configuration."""
    return Learned("mapping")


def tensors(ndim: int | None, dtype: str = "float") -> Learned:
    """A dict ``name -> tensor`` (saved as one tensor per entry)."""
    return Learned("tensors", dtype=dtype, ndim=ndim)


def integer(minimum: int = 0, binds: str | None = None, optional: bool = False) -> Learned:
    return Learned("int", minimum=minimum, binds=binds, optional=optional)


def number(positive: bool = False, optional: bool = False) -> Learned:
    return Learned("number", positive=positive, optional=optional)


def text(*choices: str) -> Learned:
    return Learned("text", choices=tuple(choices))


def texts() -> Learned:
    return Learned("texts")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_plain(name: str, spec: Learned, value: Any) -> Any:
    """``value`` (an integral float as an int), or a ValueError."""
    bad = f"{name} must be {spec.describe()}, got {value!r}"
    if spec.kind == "int":
        if isinstance(value, float) and value.is_integer():  # JSON readers may give 3.0
            value = int(value)
        if not _is_int(value) or (spec.minimum is not None and value < spec.minimum):
            raise ValueError(bad)
    elif spec.kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(bad)
        if spec.positive and value <= 0:
            raise ValueError(bad)
    elif spec.kind == "text":
        if not isinstance(value, str) or (spec.choices and value not in spec.choices):
            raise ValueError(bad)
    elif spec.kind == "texts":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(bad)
    elif spec.kind == "ints":
        if not isinstance(value, list) or not all(_is_int(v) and v >= 1 for v in value):
            raise ValueError(bad)
    elif spec.kind == "mapping":
        if not isinstance(value, dict) or not all(isinstance(k, str) and _is_plain(v) for k, v in value.items()):
            raise ValueError(bad)
    return value


def _is_plain(v: Any) -> bool:
    """A JSON scalar, or a flat list of them (no nesting: a configuration, not a document)."""
    if v is None or isinstance(v, (str, bool, int, float)):
        return True
    return isinstance(v, list) and all(x is None or isinstance(x, (str, bool, int, float)) for x in v)


def _check_tensor(name: str, spec: Learned, t: Any, ndim: int | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be {spec.describe()}, got {type(t).__name__}")
    if t.dtype not in _DTYPES[spec.dtype]:
        allowed = ", ".join(str(d).replace("torch.", "") for d in _DTYPES[spec.dtype])
        raise ValueError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected {allowed}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {ndim} dimensions ({spec.describe()})")
    if t.is_floating_point() and t.numel():
        if spec.finite and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds non-finite values (NaN or inf)")
        if bool(torch.isnan(t).any()):  # inf may be declared meaningful, NaN never is
            raise ValueError(f"{name} holds non-finite values (NaN)")


def _bind(dims: dict[str, tuple[int, str]], symbol: str, size: int, who: str) -> None:
    if symbol in dims and dims[symbol][0] != size:
        raise ValueError(f"{who} gives {symbol} = {size}, but {dims[symbol][1]} gives {symbol} = {dims[symbol][0]}")
    dims.setdefault(symbol, (size, who))


def check_learned(spec: Mapping[str, Learned], values: Mapping[str, Any], required: bool = True) -> dict[str, Any]:
    """``values`` (name -> value) checked against ``spec`` (integral floats of integer values made
    ints); a ValueError names the first problem.

    Unknown names are refused (``calibration_*_`` scalars excepted), the non-optional names must
    be present (unless ``required`` is False: an unfitted detector), each value must have its
    declared kind, dtype and number of dimensions, and every shape symbol must have one size
    across all values."""
    unknown = sorted(k for k in values if k not in spec and not _is_calibration(k, values[k]))
    if unknown:
        known = ", ".join(spec) or "(none)"
        raise ValueError(f"unknown learned name(s) {', '.join(map(repr, unknown))}; this detector learns: {known}")
    missing = [k for k, s in spec.items() if required and not s.optional and values.get(k) is None]
    if missing:
        raise ValueError(f"missing learned value(s) {', '.join(map(repr, missing))}")
    dims: dict[str, tuple[int, str]] = {}
    checked = dict(values)
    for name, s in spec.items():
        value = values.get(name)
        if value is None:
            continue
        if s.kind == "tensor":
            _check_tensor(name, s, value, None if s.shape is None else len(s.shape))
            for d, size in zip(s.shape or (), value.shape):
                if isinstance(d, int):
                    if size != d:
                        raise ValueError(f"{name} has shape {tuple(value.shape)}; expected {s.describe()}")
                    continue
                symbol, offset = _DIM.match(d).groups()
                _bind(dims, symbol, int(size) - int(offset or 0), f"{name} of shape {tuple(value.shape)}")
        elif s.kind == "tensors":
            if not isinstance(value, dict) or not value or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{name} must be {s.describe()} (a non-empty dict), got {type(value).__name__}")
            for key, t in value.items():
                _check_tensor(f"{name}[{key!r}]", s, t, s.ndim)
        else:
            value = checked[name] = _check_plain(name, s, value)
            if s.binds is not None:
                _bind(dims, s.binds, value, f"{name} = {value}")
    return checked


def _is_calibration(name: str, value: Any) -> bool:
    """``calibration_*_`` values (set by ``calibrate`` for every detector) are plain scalars."""
    if not (name.startswith(CALIBRATION_PREFIX) and name.endswith("_")):
        return False
    if value is None or isinstance(value, (str, bool)):
        return True
    return isinstance(value, (int, float)) and math.isfinite(value)


# ----- the file form: a saved detector's header and learned values ----------------------------------

#: the keys of a saved detector's header (``format_version`` and ``sha256`` belong to the state file)
HEADER_KEYS = ("format", "ebood_version", "detector", "hyperparameters", "threshold", "fitted", "learned")


def learned_values(tensors: dict[str, torch.Tensor], plain: dict[str, Any], path: Path) -> dict[str, Any]:
    """The learned values of a file: plain header values, tensors, and dicts of tensors (saved as
    ``name/key`` tensors and listed in the header)."""
    tensors = dict(tensors)
    values: dict[str, Any] = {}
    for key, value in plain.items():
        if isinstance(value, dict) and "__tensor_dict__" in value:  # other objects are plain (a configuration)
            keys = value.get("__tensor_dict__")
            if set(value) != {"__tensor_dict__"} or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise StateError(f"{path}: learned value {key!r} is a JSON object that is not a list of tensors")
            missing = [k for k in keys if f"{key}/{k}" not in tensors]
            if missing:
                raise StateError(f"{path}: learned value {key!r} lists tensor(s) {', '.join(map(repr, missing))} that the file does not hold")
            value = {k: tensors.pop(f"{key}/{k}") for k in keys}
        values[key] = value
    for key, t in tensors.items():
        if key in values:
            raise StateError(f"{path}: {key!r} is stored both as a tensor and as a header value")
        values[key] = t
    return values


def check_header(header: dict[str, Any], path: Path, known: Container[str], version: str) -> None:
    """Every key of a detector header present, nothing else, each of the right type."""
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise StateError(f"{path}: the detector header lacks {', '.join(map(repr, missing))}")
    unknown = sorted(set(header) - set(HEADER_KEYS) - {"format_version"})
    if unknown:
        raise StateError(f"{path}: unknown header key(s) {', '.join(map(repr, unknown))}")
    name = header["detector"]
    if not isinstance(name, str) or name not in known:
        raise StateError(f"{path}: detector {name!r} is not known to this ebood ({version})")
    expected = {"ebood_version": str, "hyperparameters": dict, "learned": dict, "fitted": bool}
    for key, kind in expected.items():
        if not isinstance(header[key], kind):
            raise StateError(f"{path}: header value {key!r} must be a {kind.__name__}, got {type(header[key]).__name__}")
    thr = header["threshold"]
    if thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float)) or not math.isfinite(thr)):
        raise StateError(f"{path}: invalid threshold {thr!r}")

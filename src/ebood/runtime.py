"""Devices and model inputs: torch's low-level errors as one-line errors that say what to change.

``torch.device("gpu9")`` and a 3-channel batch given to a 1-channel model raise ``RuntimeError``
with torch's wording (or a C++ location); :func:`parse_device` and :func:`model_inputs` turn
them into ``ValueError`` subclasses naming the input and the fix, which the CLI prints as one line.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch

__all__ = ["DeviceError", "ModelInputError", "parse_device", "input_error", "model_inputs"]

DEVICE_NAMES = "cpu, cuda, cuda:N or mps"


class DeviceError(ValueError):
    """A device name that torch does not know, or a device this machine does not have."""


class ModelInputError(ValueError):
    """Inputs the model cannot take (channels, image size, feature count)."""


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine, or a :class:`DeviceError`."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device {str(device)!r} is not a device name; use {DEVICE_NAMES}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r}: CUDA is not available on this machine; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"device {str(device)!r}: MPS is not available on this machine; use cpu")
    if dev.type not in ("cpu", "cuda", "mps", "xpu", "meta"):
        raise DeviceError(f"device {str(device)!r}: ebood runs on {DEVICE_NAMES}")
    return dev


_CHANNELS = re.compile(r"expected input\[[^\]]*\] to have (\d+) channels, but got (\d+) channels")
# torch's wordings for a batch of the wrong layout (conv / linear / pooling / view layers)
_SHAPE_WORDS = re.compile(
    r"mat1 and mat2 shapes cannot be multiplied|size mismatch|Sizes of tensors must match|shape '\[.*\]' is invalid"
    r"|must match the size of tensor|Expected \d+D|input size|Kernel size can't be greater|channels"
)


def input_error(exc: BaseException, inputs: torch.Tensor) -> ModelInputError | None:
    """The :class:`ModelInputError` that ``exc`` (raised by the model on ``inputs``) means, if it is one."""
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    shape = tuple(inputs.shape)
    m = _CHANNELS.search(text)
    if m:
        want, got = int(m.group(1)), int(m.group(2))
        return ModelInputError(
            f"the model takes {want}-channel inputs but the data give {got} channel(s) (a batch of shape {shape}): "
            f"give {want}-channel data (convert the images, or give one --mean/--std value per model channel)"
        )
    if _SHAPE_WORDS.search(text):
        return ModelInputError(
            f"the model cannot take inputs of shape {shape} ({first}): give data of the size and channels the "
            f"model was built for (e.g. --image-size)"
        )
    return None


@contextlib.contextmanager
def model_inputs(inputs: torch.Tensor) -> Iterator[None]:
    """Run a forward pass on ``inputs`` inside this block: a shape error becomes a :class:`ModelInputError`."""
    try:
        yield
    except RuntimeError as exc:
        err = input_error(exc, inputs)
        if err is None:
            raise
        raise err from exc

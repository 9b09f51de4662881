"""Image transforms written for ebood (no torchvision): decode -> channels -> resize -> crop -> normalise.

The geometry follows what torchvision's ``Resize(size)`` + ``CenterCrop(size)`` do, since that is
how the energy paper (Liu et al., NeurIPS 2020) and OpenOOD (Zhang et al., 2023) prepare their OOD sets:

* resize so that the *shorter* side equals ``size`` (the longer one becomes ``int(size * long / short)``),
  bilinear with antialiasing;
* crop the central ``size x size`` window, its top-left corner at ``round((H - size) / 2)``;
* scale to [0, 1] and normalise per channel: ``x' = (x - mean[c]) / std[c]``.

Grey images become RGB by repeating the channel; RGB images become grey with the ITU-R 601-2 luma
weights ``L = 0.299 R + 0.587 G + 0.114 B`` (the weights Pillow's ``convert("L")`` uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ImageTransform", "resize_shorter", "center_crop", "to_channels", "image_to_tensor"]

_LUMA = (0.299, 0.587, 0.114)


def _check_stats(values: Sequence[float] | None, name: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    try:
        out = tuple(float(v) for v in (values if isinstance(values, (list, tuple, np.ndarray, torch.Tensor)) else [values]))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or a list of numbers, got {values!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be a non-empty list of finite numbers, got {values!r}")
    return out


def image_to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float32 (C, H, W) tensor in [0, 1] from a uint8 image (H, W), (H, W, C) numpy array or a (C, H, W) tensor.

    uint8 values are divided by 255; float input is taken as already in [0, 1].
    """
    if isinstance(image, np.ndarray):
        arr = image[:, :, None] if image.ndim == 2 else image
        if arr.ndim != 3:
            raise ValueError(f"an image must be (H, W) or (H, W, C), got shape {image.shape}")
        t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    else:
        t = image if image.ndim == 3 else image.unsqueeze(0)
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    return t.to(torch.float32)


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(C, H, W) -> (channels, H, W): grey -> RGB by repetition, RGB -> grey by ITU-R 601-2 luma."""
    c = x.shape[0]
    if c == channels:
        return x
    if c == 1:
        return x.expand(channels, -1, -1).clone()
    if c == 3 and channels == 1:
        w = torch.tensor(_LUMA, dtype=x.dtype).view(3, 1, 1)
        return (x * w).sum(dim=0, keepdim=True)
    if c == 4:  # RGBA: drop alpha first
        return to_channels(x[:3], channels)
    raise ValueError(f"cannot convert an image with {c} channels to {channels} channels")


def resize_shorter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (C, H, W) so that its shorter side is ``size`` (bilinear, antialiased, aspect ratio kept)."""
    _, h, w = x.shape
    if min(h, w) == size:
        return x
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    out = F.interpolate(x.unsqueeze(0), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    return out.squeeze(0)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size x size`` window of (C, H, W) (zero-padded first when the image is smaller)."""
    _, h, w = x.shape
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        _, h, w = x.shape
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return x[:, top:top + size, left:left + size]


@dataclass(frozen=True)
class ImageTransform:
    """uint8 or [0, 1] image -> normalised float32 (C, size, size) tensor.

    ``size=None`` keeps the image's size, ``channels=None`` its channels; ``mean``/``std`` (one value
    per output channel, or one for all) normalise as ``(x - mean) / std``.
    """

    size: int | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def build(cls, size: int | None = None, channels: int | None = None,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> "ImageTransform":
        """Validated construction; ``channels`` defaults to ``len(mean)`` when a per-channel mean is given."""
        mean_t, std_t = _check_stats(mean, "mean"), _check_stats(std, "std")
        if (mean_t is None) != (std_t is None):
            raise ValueError("give both mean and std for normalisation, or neither")
        if std_t is not None and any(s <= 0 for s in std_t):
            raise ValueError(f"std must be > 0, got {list(std_t)}")
        if mean_t is not None and len(mean_t) != len(std_t):  # type: ignore[arg-type]
            raise ValueError(f"mean has {len(mean_t)} values but std has {len(std_t)}")  # type: ignore[arg-type]
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"image_size must be a positive integer, got {size!r}")
        if channels is not None and channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if mean_t is not None and len(mean_t) > 1:
            if channels is None:
                channels = len(mean_t)
            elif channels != len(mean_t):
                raise ValueError(f"mean/std have {len(mean_t)} values but channels={channels}")
        return cls(size=size, channels=channels, mean=mean_t, std=std_t)

    @property
    def is_identity(self) -> bool:
        return self.size is None and self.channels is None and self.mean is None

    def describe(self) -> str:
        """A stable text for fingerprints."""
        return f"size={self.size},channels={self.channels},mean={self.mean},std={self.std}"

    def __call__(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = image_to_tensor(image)
        if self.channels is not None:
            x = to_channels(x, self.channels)
        if self.size is not None and x.shape[1:] != (self.size, self.size):
            x = center_crop(resize_shorter(x, self.size), self.size)
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
            if mean.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"mean/std have {mean.shape[0]} values but the image has {x.shape[0]} channels")
            x = (x - mean) / std
        return x.contiguous()

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """The transform applied to every image of an (N, C, H, W) tensor."""
        if self.is_identity:
            return images.to(torch.float32)
        return torch.stack([self(img) for img in images]) if len(images) else images.to(torch.float32)

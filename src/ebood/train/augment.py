"""Batch data augmentation for training, seeded per step (so resumed runs draw the same crops).

The CIFAR recipe of the WideResNet / Outlier Exposure / energy-OOD code trains on random 32x32
crops of the image zero-padded by 4 pixels, flipped horizontally with probability 1/2, for the
in-distribution images and the auxiliary outliers alike. :class:`RandomCropFlip` does the same on a
whole batch at once. The padding is black: when the data are already normalised as
``(x - mean) / std``, pass ``fill = -mean / std`` (see :meth:`RandomCropFlip.for_normalized`).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F

__all__ = ["BatchAugment", "RandomCropFlip"]


class BatchAugment(Protocol):
    """A random transform of a batch ``(N, C, H, W)`` drawing its randomness from ``generator`` (on CPU)."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...

    def config(self) -> dict[str, Any]: ...


class RandomCropFlip:
    """Random ``H x W`` crops of the batch padded by ``padding`` pixels of ``fill``, then random horizontal flips.

    ``fill`` is a number or one value per channel (the padded pixels' value).
    """

    def __init__(self, padding: int = 4, flip: bool = True, fill: float | Sequence[float] = 0.0):
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
        self.padding, self.flip = padding, bool(flip)
        self.fill = [float(v) for v in fill] if isinstance(fill, (list, tuple)) else float(fill)

    @classmethod
    def for_normalized(cls, mean: Sequence[float], std: Sequence[float], padding: int = 4,
                       flip: bool = True) -> "RandomCropFlip":
        """Black padding for data normalised as ``(x - mean) / std``: ``fill = -mean / std`` per channel."""
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need one value per channel and std > 0, got {mean!r} and {std!r}")
        return cls(padding, flip, [-m / s for m, s in zip(mean, std)])

    def config(self) -> dict[str, Any]:
        return {"augment": "random_crop_flip", "padding": self.padding, "flip": self.flip, "fill": self.fill}

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip}, fill={self.fill})"

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if isinstance(self.fill, float):
            return F.pad(x, (p, p, p, p), value=self.fill)
        if len(self.fill) != x.shape[1]:
            raise ValueError(f"fill has {len(self.fill)} values but the images have {x.shape[1]} channels")
        n, c, h, w = x.shape
        fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        canvas = fill.expand(n, c, h + 2 * p, w + 2 * p).clone()
        canvas[:, :, p:p + h, p:p + w] = x
        return canvas

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"RandomCropFlip needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
        n, _, h, w = x.shape
        p = self.padding
        offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        if p:
            rows = (offsets[:, :1] + torch.arange(h)).to(x.device)  # (N, H)
            cols = (offsets[:, 1:] + torch.arange(w)).to(x.device)  # (N, W)
            padded = self._padded(x)
            idx = torch.arange(n, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if self.flip:
            x = torch.where(flips.to(x.device)[:, None, None, None], x.flip(3), x)
        return x.contiguous()

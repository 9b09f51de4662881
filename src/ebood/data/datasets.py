"""The dataset types every ``ebood.data`` loader returns, their errors and fingerprints.

Every dataset is a ``torch.utils.data.Dataset`` of ``(x, y)``: ``x`` a float32 (C, H, W) tensor,
``y`` an ``int`` class label or ``-1`` when the set has no labels (OOD sets). Each has a
``fingerprint`` string (name, split, options and a hash of the content or the source files) that
``ebood.extract`` uses as cache key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import ImageTransform

__all__ = [
    "DatasetNotFoundError", "DatasetFormatError", "ArrayDataset", "ImageArrayDataset", "ImageFileDataset",
    "content_hash", "files_hash", "read_image", "open_set_splits",
]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset whose files are not where they were looked for; the message lists the expected files."""


class DatasetFormatError(ValueError):
    """A dataset file that exists but is truncated, corrupt or not in the official format."""


def content_hash(*arrays: np.ndarray | torch.Tensor, digest_size: int = 8) -> str:
    """Hex blake2b hash of the arrays' bytes, shapes and dtypes."""
    h = hashlib.blake2b(digest_size=digest_size)
    for a in arrays:
        arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.view(np.uint8).reshape(-1).data if arr.size else b"")
    return h.hexdigest()


_EDGE = 1 << 16


def files_hash(paths: Iterable[Path], base: Path | None = None, sample: int | None = None) -> str:
    """A cheap identity of source files: their names (relative to ``base``) and sizes, plus the first and
    last 64 KiB of every file (``sample=None``) or of ``sample`` evenly spaced files (large image trees)."""
    paths = list(paths)
    h = hashlib.blake2b(digest_size=8)
    if sample is None:
        chosen = set(range(len(paths)))
    else:
        chosen = set(np.linspace(0, len(paths) - 1, min(sample, len(paths))).round().astype(int).tolist()) if paths else set()
    for i, p in enumerate(paths):
        size = p.stat().st_size
        name = str(p.relative_to(base)) if base is not None else p.name
        h.update(f"{name}\0{size}\0".encode())
        if i in chosen:
            with open(p, "rb") as f:
                h.update(f.read(_EDGE))
                if size > 2 * _EDGE:
                    f.seek(size - _EDGE)
                    h.update(f.read(_EDGE))
    return h.hexdigest()


def read_image(path: Path) -> np.ndarray:
    """Decode an image file with Pillow as RGB uint8 (H, W, 3); damaged files raise DatasetFormatError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetFormatError(f"{path}: cannot decode image ({msg})") from None


class _Base(Dataset):
    """Shared attributes: ``name``, ``fingerprint``, ``group``, ``description``, per-sample ``meta``."""

    name: str
    fingerprint: str
    group: str | None
    description: str
    meta: dict[str, np.ndarray]
    labels: torch.Tensor

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n={len(self)}, group={self.group!r})"

    def _set_images_info(self, n: int, labels: Any, transform: ImageTransform, *, name: str, fingerprint: str,
                         classes: list[str] | None, group: str | None, description: str) -> None:
        """The attributes image datasets share: labels (-1 = unlabelled), transform, names and a
        fingerprint that includes the transform."""
        self.labels = torch.full((n,), -1, dtype=torch.int64) if labels is None else torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.transform = transform
        self.classes = classes or []
        self.name = name
        self.fingerprint = f"{fingerprint}|{transform.describe()}"
        self.group = group
        self.description = description

    @property
    def num_classes(self) -> int:
        """Number of distinct non-negative labels (0 for an unlabelled set)."""
        lab = self.labels[self.labels >= 0]
        return int(lab.unique().numel())


class ArrayDataset(_Base):
    """A dataset held in memory as ready-to-use tensors (``inputs`` (N, C, H, W) float32 -- or (N, D) features -- and ``labels`` (N,) int64)."""

    def __init__(self, inputs: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None, *,
                 name: str, fingerprint: str | None = None, group: str | None = None, description: str = "",
                 meta: Mapping[str, Any] | None = None) -> None:
        x = torch.as_tensor(np.asarray(inputs) if isinstance(inputs, np.ndarray) else inputs).to(torch.float32)
        if x.ndim < 2:
            raise ValueError(f"{name}: inputs must be (N, ...) with one row per sample, e.g. (N, C, H, W); got shape {tuple(x.shape)}")
        n = x.shape[0]
        y = torch.full((n,), -1, dtype=torch.int64) if labels is None else torch.as_tensor(np.asarray(labels)).to(torch.int64)
        if y.shape != (n,):
            raise ValueError(f"{name}: labels must be (N,) = ({n},), got shape {tuple(y.shape)}")
        self.inputs = x.contiguous()
        self.labels = y.contiguous()
        self.name = name
        self.group = group
        self.description = description
        self.meta = {k: np.asarray(v) for k, v in (meta or {}).items()}
        for k, v in self.meta.items():
            if len(v) != n:
                raise ValueError(f"{name}: meta[{k!r}] has {len(v)} entries for {n} samples")
        self.fingerprint = fingerprint or f"{name}|n={n}|sha={content_hash(self.inputs, self.labels)}"

    def __len__(self) -> int:
        return self.inputs.shape[0]

    #: ``self[indices]`` with a list / tensor of indices returns a whole batch ``(inputs, labels)``: data loaders
    #: slice the tensors instead of stacking one sample at a time (see ``ebood.extraction.as_loader``).
    batch_indexing = True

    def __getitem__(self, index: int | list[int] | torch.Tensor) -> tuple[torch.Tensor, Any]:
        if isinstance(index, (list, torch.Tensor, np.ndarray)):
            idx = torch.as_tensor(index, dtype=torch.int64)
            return self.inputs[idx], self.labels[idx]
        return self.inputs[index], int(self.labels[index])

    def subset(self, indices: np.ndarray | torch.Tensor | list[int], *, name: str | None = None,
               labels: torch.Tensor | np.ndarray | None = None, group: str | None = None,
               description: str | None = None) -> "ArrayDataset":
        """A new ArrayDataset of the chosen samples (and their meta), with its own fingerprint."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        new_name = name or self.name
        return ArrayDataset(
            self.inputs[idx], self.labels[idx] if labels is None else labels, name=new_name,
            fingerprint=f"{new_name}|from={self.fingerprint}|idx={content_hash(idx)}",
            group=self.group if group is None else group,
            description=self.description if description is None else description,
            meta={k: v[idx.numpy()] for k, v in self.meta.items()},
        )


def open_set_splits(splits: Mapping[str, ArrayDataset], known: int, *, id_name: str, id_description: str, ood_name: str,
                    ood_description: str, class_key: str) -> dict[str, ArrayDataset]:
    """Open-set recognition from labelled ``splits`` (``train``, ``val``, ``test``): each keeps the samples
    of classes ``0..known-1`` (labels unchanged), named ``id_name`` and described by ``id_description``
    (both formatted with ``split``); ``ood`` holds the test samples of the other classes, labelled -1
    (their class kept in ``meta[class_key]``)."""
    out: dict[str, ArrayDataset] = {}
    for split in ("train", "val", "test"):
        ds = splits[split]
        keep = torch.nonzero(ds.labels < known).squeeze(1)
        out[split] = ds.subset(keep, name=id_name.format(split=split), group="id", description=id_description.format(split=split))
    test = splits["test"]
    unknown = torch.nonzero(test.labels >= known).squeeze(1)
    ood = test.subset(unknown, name=ood_name, labels=torch.full((len(unknown),), -1, dtype=torch.int64), group="near",
                      description=ood_description)
    ood.meta[class_key] = test.labels[unknown].numpy()
    out["ood"] = ood
    return out


class ImageArrayDataset(_Base):
    """Images held in memory as a uint8 (N, C, H, W) array, transformed one at a time when read."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, transform: ImageTransform, *,
                 name: str, fingerprint: str, group: str | None = None, description: str = "",
                 meta: Mapping[str, Any] | None = None, classes: list[str] | None = None) -> None:
        if images.ndim != 4:
            raise ValueError(f"{name}: images must be (N, C, H, W), got shape {images.shape}")
        images = np.ascontiguousarray(images)
        self.images = torch.from_numpy(images if images.flags.writeable else images.copy())  # torch wants writable memory
        self._set_images_info(self.images.shape[0], labels, transform, name=name, fingerprint=fingerprint,
                              classes=classes, group=group, description=description)
        self.meta = {k: np.asarray(v) for k, v in (meta or {}).items()}

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


class ImageFileDataset(_Base):
    """Image files decoded with Pillow when read (image-folder trees: Textures, Places365, LSUN, iSUN, TinyImageNet)."""

    def __init__(self, files: list[Path], labels: np.ndarray | None, transform: ImageTransform, *,
                 name: str, fingerprint: str, classes: list[str] | None = None, group: str | None = None,
                 description: str = "", loader: Callable[[Path], np.ndarray] | None = None) -> None:
        self.files = list(files)
        self._set_images_info(len(self.files), labels, transform, name=name, fingerprint=fingerprint,
                              classes=classes, group=group, description=description)
        self.meta = {"file": np.array([str(f) for f in self.files], dtype=object)}
        self._loader = loader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        image = (self._loader or read_image)(path)
        return self.transform(image), int(self.labels[index])

"""Idx files (LeCun et al.'s MNIST format) and the data sets released in it: MNIST, Fashion-MNIST, KMNIST, EMNIST.

An idx file is two zero bytes, a type code (``0x08``: unsigned bytes, the only type these sets use),
the number of dimensions, one big-endian int32 per dimension, then the data in C order. Images are
``idx3`` (N, rows, cols), labels ``idx1`` (N,); either may be gzipped (``.gz``), as distributed.

File names are the releases' own: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (MNIST, Fashion-MNIST, KMNIST) and
``emnist-<subset>-<train|test>-<images-idx3|labels-idx1>-ubyte`` (EMNIST). They are looked for
directly in the root, in a folder named after the set (``fashion-mnist``, ``mnist``, ...) and in
torchvision's layout (``ROOT/FashionMNIST/raw/``, ``ROOT/MNIST/raw/``, ``ROOT/KMNIST/raw/``,
``ROOT/EMNIST/raw/``). Without a root, ``$EBOOD_DATA`` is searched, then the folders where a system
package installs the set (Debian's ``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist``).

EMNIST's images are stored transposed (Cohen et al. 2017 kept NIST's column-major order); they are
transposed back here, so every set comes out upright.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._files import existing, read_bytes, split as check_split
from .datasets import DatasetFormatError, DatasetNotFoundError, ImageArrayDataset, files_hash
from .transforms import ImageTransform

__all__ = ["IdxSet", "IDX_SETS", "EMNIST_SUBSETS", "read_idx", "read_idx_pair", "idx_files", "idx_dataset", "mnist",
           "fashion_mnist", "kmnist", "emnist"]

_UBYTE = 0x08


@dataclass(frozen=True)
class IdxSet:
    """Where one idx data set is found and how to get it."""

    name: str
    title: str
    torchvision: str
    source: str
    classes: tuple[str, ...] | None = None
    #: folders searched when no root is given (after ``$EBOOD_DATA``): where a system package installs it
    system: tuple[str, ...] = ()


IDX_SETS: dict[str, IdxSet] = {
    "mnist": IdxSet("mnist", "MNIST", "MNIST", "the idx files from http://yann.lecun.com/exdb/mnist/, or a torchvision root "
                    "(ROOT/MNIST/raw/)", tuple(str(d) for d in range(10))),
    "fashion-mnist": IdxSet(
        "fashion-mnist", "Fashion-MNIST", "FashionMNIST",
        "install Debian's package dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or pass a folder holding "
        "the idx files from https://github.com/zalandoresearch/fashion-mnist, or a torchvision root (ROOT/FashionMNIST/raw/)",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        system=("/usr/share/datasets/fashion-mnist",)),
    "kmnist": IdxSet("kmnist", "KMNIST", "KMNIST", "the idx files from https://github.com/rois-codh/kmnist, or a torchvision "
                     "root (ROOT/KMNIST/raw/)", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
    "emnist": IdxSet("emnist", "EMNIST", "EMNIST", "gzip.zip from https://www.nist.gov/itl/products-and-services/emnist-dataset "
                     "(its gzip/ folder), or a torchvision root (ROOT/EMNIST/raw/)"),
}

#: EMNIST's subsets, as in its file names.
EMNIST_SUBSETS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (plain or ``.gz``) as a read-only uint8 array of the shape its header gives.

    A truncated or corrupt file, a bad magic number, or a file longer than its header says is a
    :class:`DatasetFormatError` naming the file and the problem.
    """
    path = Path(path)
    raw = read_bytes(path)
    if len(raw) < 4:
        raise DatasetFormatError(f"{path}: truncated idx file ({len(raw)} bytes, no header)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code != _UBYTE:
        raise DatasetFormatError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()}, expected 000008xx)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated idx header ({len(raw)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) if dims else 1
    if len(raw) - header != expected:
        problem = "truncated" if len(raw) - header < expected else "has trailing bytes"
        raise DatasetFormatError(f"{path}: truncated or corrupt idx file ({problem}): header says {dims} = {expected} bytes "
                                 f"of data, file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, rows, cols) uint8 and labels (N,) int64 from an idx3 / idx1 pair, checked against each other."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DatasetFormatError(f"{images_path}: expected idx3 images (N, rows, cols), got shape {images.shape}")
    if labels.ndim != 1:
        raise DatasetFormatError(f"{labels_path}: expected idx1 labels (N,), got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {Path(images_path).name}")
    return images, labels.astype(np.int64)


def _spec(name: str) -> IdxSet:
    key = name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist"}.get(key, key)
    if key not in IDX_SETS:
        raise ValueError(f"unknown idx data set {name!r}; expected one of {', '.join(IDX_SETS)}")
    return IDX_SETS[key]


def _file_names(spec: IdxSet, split: str, subset: str | None) -> list[str]:
    if spec.name == "emnist":
        return [f"emnist-{subset}-{split}-images-idx3-ubyte", f"emnist-{subset}-{split}-labels-idx1-ubyte"]
    prefix = "train" if split == "train" else "t10k"
    return [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]


def _folders(spec: IdxSet) -> list[str]:
    names = dict.fromkeys([".", spec.name, spec.name.replace("-", "_"), spec.name.replace("-", ""), spec.title,
                           f"{spec.torchvision}/raw", spec.torchvision])
    return list(names)


def _roots(spec: IdxSet, root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DatasetNotFoundError(f"{spec.name}: data root {path} is not a directory -- {spec.source}")
        return [path]
    env = os.environ.get("EBOOD_DATA")
    return ([Path(env).expanduser()] if env else []) + [Path(p) for p in spec.system]


def idx_files(name: str, split: str, root: str | os.PathLike | None = None, *, subset: str | None = None) -> tuple[Path, Path]:
    """The (images, labels) idx files of ``name``'s ``split`` (``train`` / ``test``), plain or gzipped.

    Searched under ``root`` (see the module docstring for the folders), or without a root in
    ``$EBOOD_DATA`` and then where a system package installs the set. Not found: a one-line
    :class:`DatasetNotFoundError` naming the files, where they were looked for and how to get them.
    """
    spec = _spec(name)
    check_split(split, ("train", "test"), spec.name)
    if spec.name == "emnist" and subset not in EMNIST_SUBSETS:
        raise ValueError(f"emnist: unknown subset {subset!r}; expected one of {', '.join(EMNIST_SUBSETS)}")
    files = _file_names(spec, split, subset)
    roots = _roots(spec, root)
    looked: list[str] = []
    for base in roots:
        for folder in _folders(spec):
            where = (base / folder) if folder != "." else base
            found = [existing(where, f, gz=True) for f in files]
            if all(found):
                return found[0], found[1]  # type: ignore[return-value]
            looked.append(str(where))
    what = f"{spec.name}{'-' + subset if subset else ''} {split}"
    expected = " and ".join(f + "[.gz]" for f in files)
    if not roots:
        raise DatasetNotFoundError(f"{what} not found: no data root given and $EBOOD_DATA is not set (expected {expected}) -- "
                                   f"{spec.source}")
    shown = ", ".join(looked[:3]) + (f" and {len(looked) - 3} more" if len(looked) > 3 else "")
    raise DatasetNotFoundError(f"{what} not found: expected {expected} in one of {shown} -- {spec.source}")


def idx_dataset(name: str, split: str, root: str | os.PathLike | None = None, transform: ImageTransform | None = None, *,
                subset: str | None = None) -> ImageArrayDataset:
    """``name`` (``mnist``, ``fashion-mnist``, ``kmnist``, ``emnist`` with ``subset``) ``split`` as 1x28x28 uint8 images.

    Labels are checked against the set's classes; ``classes`` holds their names.
    """
    spec = _spec(name)
    images_path, labels_path = idx_files(spec.name, split, root, subset=subset)
    images, labels = read_idx_pair(images_path, labels_path)
    if spec.name == "emnist":
        images = np.ascontiguousarray(images.transpose(0, 2, 1))
    if spec.classes is not None and labels.size and labels.max() >= len(spec.classes):
        raise DatasetFormatError(f"{labels_path}: label {int(labels.max())} is not a class of {spec.title} (0..{len(spec.classes) - 1})")
    label = f"{spec.name}{'-' + subset if subset else ''}"
    files = [images_path, labels_path]
    return ImageArrayDataset(images[:, None], labels, transform or ImageTransform(), name=f"{label}-{split}",
                             fingerprint=f"{label}:{split}|n={len(labels)}|files={files_hash(files)}",
                             description=f"{spec.title}{' ' + subset if subset else ''} {split} ({len(labels)} images, "
                                         f"{images_path.parent})",
                             classes=list(spec.classes) if spec.classes else None)


def mnist(root: str | os.PathLike | None, split: str, transform: ImageTransform | None = None) -> ImageArrayDataset:
    """MNIST (LeCun et al. 1998): ``train`` (60,000) or ``test`` (10,000) 1x28x28 digits."""
    return idx_dataset("mnist", split, root, transform)


def fashion_mnist(root: str | os.PathLike | None, split: str, transform: ImageTransform | None = None) -> ImageArrayDataset:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): ``train`` (60,000) or ``test`` (10,000) 1x28x28 images, 10 classes.

    Without ``root`` (and ``$EBOOD_DATA``), Debian's ``dataset-fashion-mnist`` is found by itself.
    """
    return idx_dataset("fashion-mnist", split, root, transform)


def kmnist(root: str | os.PathLike | None, split: str, transform: ImageTransform | None = None) -> ImageArrayDataset:
    """Kuzushiji-MNIST (Clanuwat et al., 2018): ``train`` (60,000) or ``test`` (10,000) 1x28x28 images, 10 classes."""
    return idx_dataset("kmnist", split, root, transform)


def emnist(root: str | os.PathLike | None, split: str, transform: ImageTransform | None = None, *,
           subset: str = "balanced") -> ImageArrayDataset:
    """EMNIST (Cohen et al., 2017) ``subset`` (``EMNIST_SUBSETS``), ``train`` or ``test``; images transposed upright."""
    return idx_dataset("emnist", split, root, transform, subset=subset)


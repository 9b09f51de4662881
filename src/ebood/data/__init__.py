"""ebood.data: the built-in offline benchmark sets and loaders for the real benchmark sets.

``open_dataset(spec)`` is the one entry point the CLI, training and benchmarks use. Every dataset is a
``torch.utils.data.Dataset`` of ``(x, y)`` -- ``x`` a float32 (C, H, W) tensor, ``y`` an int label or -1 --
with a ``fingerprint`` string for caching.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .builtin import (AUXILIARY_DESCRIPTION, BuiltinBenchmark, auxiliary_outliers, available_builtin, builtin_benchmark,
                      builtin_dataset, digits_splits, font_digits, letters, noise, open_set_split, photos)
from .datasets import (ArrayDataset, DatasetFormatError, DatasetNotFoundError, ImageArrayDataset, ImageFileDataset)
from .formats import NAMED_FOLDERS, array_file, cifar10, cifar100, image_folder, named_folder, svhn, tinyimagenet
from .idx import EMNIST_SUBSETS, IDX_SETS, emnist, fashion_mnist, idx_dataset, kmnist, mnist, read_idx
from .transforms import ImageTransform

__all__ = [
    "open_dataset", "SPEC_FORMS", "builtin_benchmark", "BuiltinBenchmark", "builtin_dataset", "available_builtin",
    "digits_splits", "letters", "photos", "noise", "font_digits", "open_set_split", "auxiliary_outliers",
    "AUXILIARY_DESCRIPTION", "ArrayDataset", "ImageArrayDataset", "ImageFileDataset", "DatasetNotFoundError",
    "DatasetFormatError", "ImageTransform", "idx_dataset", "read_idx", "mnist", "fashion_mnist", "kmnist", "emnist",
    "IDX_SETS", "EMNIST_SUBSETS",
]

#: The accepted spec forms, for error messages and help texts.
SPEC_FORMS = (
    "builtin:NAME", "cifar10:train|test", "cifar100:train|test", "svhn:train|test|extra", "mnist:train|test",
    "fashion-mnist:train|test", "kmnist:train|test", "emnist-SUBSET:train|test",
    "folder:PATH", "array:FILE(.npz|.npy|.safetensors|.pt)", "textures", "places365", "lsun_crop", "lsun_resize",
    "isun", "tinyimagenet[:train|val|test]",
)

_SPLIT_SETS = {"cifar10": cifar10, "cifar100": cifar100, "svhn": svhn, "mnist": mnist, "fashion_mnist": fashion_mnist,
               "fashionmnist": fashion_mnist, "kmnist": kmnist}


def open_dataset(spec: str, *, root: str | os.PathLike | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, image_size: int | None = None, channels: int | None = None,
                 seed: int = 0):
    """The dataset named by ``spec`` (see ``SPEC_FORMS``).

    ``root`` is the folder holding the real sets in their official layouts (default: ``$EBOOD_DATA``; the
    idx sets are also found where a system package installs them, e.g. Debian's ``dataset-fashion-mnist``);
    ``image_size`` resizes the shorter side and centre-crops to a square; ``channels`` (1 or 3) converts
    grey <-> RGB (default: ``len(mean)`` when a per-channel mean is given, else the set's own);
    ``mean`` / ``std`` normalise as ``(x - mean) / std`` on [0, 1] pixels; ``seed`` picks the draw of the
    generated ``builtin:`` sets.

    Examples: ``open_dataset("builtin:letters")``, ``open_dataset("cifar10:test", root="/data",
    mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616])``, ``open_dataset("svhn:test", root="/data")``, ``open_dataset("fashion-mnist:test")``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a dataset spec must be a non-empty string, got {spec!r}; forms: {', '.join(SPEC_FORMS)}")
    transform = ImageTransform.build(size=image_size, channels=channels, mean=mean, std=std)
    kind, sep, arg = spec.strip().partition(":")
    key = kind.strip().lower().replace("-", "_")
    if key == "builtin":
        return builtin_dataset(arg, seed=seed, transform=transform)
    if key == "folder":
        path = Path(arg).expanduser()
        if not path.is_absolute() and not path.exists() and root is not None:
            path = Path(root).expanduser() / path
        return image_folder(path, transform)
    if key == "array":
        path = Path(arg).expanduser()
        if not path.is_absolute() and not path.exists() and root is not None:
            path = Path(root).expanduser() / path
        return array_file(path, transform)
    if key in _SPLIT_SETS:
        if not sep or not arg:
            raise ValueError(f"{kind} needs a split, e.g. {kind}:train or {kind}:test")
        return _SPLIT_SETS[key](root, arg.strip().lower(), transform)
    if key.startswith("emnist_") or key == "emnist":
        subset = key[len("emnist_"):]
        if not subset or not sep or not arg:
            raise ValueError(f"emnist needs a subset and a split, e.g. emnist-balanced:train; subsets: {', '.join(EMNIST_SUBSETS)}")
        return emnist(root, arg.strip().lower(), transform, subset=subset)
    if key in ("tinyimagenet", "tin", "tiny_imagenet"):
        return tinyimagenet(root, arg.strip().lower() or "val", transform)
    if key in NAMED_FOLDERS and not arg:
        return named_folder(key, root, transform)
    raise ValueError(f"unknown dataset spec {spec!r}; expected one of: {', '.join(SPEC_FORMS)}")

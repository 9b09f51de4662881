"""Loaders for the real benchmark sets, reading local files in their *official* formats.

No downloads, no unpickling, no torchvision:

* CIFAR-10 / CIFAR-100 -- the "binary version" from https://www.cs.toronto.edu/~kriz/cifar.html:
  ``cifar-10-batches-bin/data_batch_{1..5}.bin`` and ``test_batch.bin`` (records of 1 label byte + 3072
  pixel bytes, R then G then B planes, rows top to bottom); ``cifar-100-binary/train.bin`` and
  ``test.bin`` (records of 1 coarse + 1 fine label byte + 3072 pixel bytes).
* SVHN -- the cropped-digits ``train_32x32.mat`` / ``test_32x32.mat`` / ``extra_32x32.mat`` (MATLAB v5,
  read with ``scipy.io.loadmat``): ``X`` is (32, 32, 3, N) uint8, ``y`` is (N, 1) with 10 meaning digit 0.
* MNIST -- the idx files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, plain or ``.gz``.
* Image-folder trees, decoded with Pillow: Textures (``dtd/images/<class>/*.jpg``), Places365, LSUN-Crop,
  LSUN-Resize, iSUN (folders of images as released with ODIN, Liang et al. ICLR 2018), TinyImageNet
  (``tiny-imagenet-200/train/<wnid>/images/*.JPEG``, ``val/images`` + ``val/val_annotations.txt``), and any
  ``folder:PATH``.

A missing set raises :class:`DatasetNotFoundError` listing the files expected and where; a truncated or
corrupt file raises :class:`DatasetFormatError` naming the file and the problem. Both are one-line
messages (the CLI prints them as they are).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ._files import locate as _locate, read_bytes as _read_bytes, resolve_root, split as _split
from .datasets import (ArrayDataset, DatasetFormatError, DatasetNotFoundError, ImageArrayDataset,
                       ImageFileDataset, content_hash, files_hash, read_image)
from .idx import mnist, read_idx
from .transforms import ImageTransform

__all__ = [
    "cifar10", "cifar100", "svhn", "mnist", "image_folder", "tinyimagenet", "named_folder", "array_file",
    "read_cifar_bin", "read_idx", "read_svhn_mat", "read_image", "resolve_root", "NAMED_FOLDERS",
    "IMAGE_EXTENSIONS", "DEFAULT_FOLDER_SIZE",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
#: Image folders hold images of many sizes, so without ``image_size`` they are brought to 32x32 (the CIFAR protocols).
DEFAULT_FOLDER_SIZE = 32
_CIFAR_PIXELS = 3 * 32 * 32


# ----- CIFAR ----------------------------------------------------------------------------------------------

def read_cifar_bin(path: Path, label_bytes: int, num_labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``label_bytes`` label bytes + 3072 pixel bytes -> images (N, 3, 32, 32) uint8, labels (N, label_bytes)."""
    data = np.frombuffer(_read_bytes(path), dtype=np.uint8)
    record = label_bytes + _CIFAR_PIXELS
    if data.size == 0:
        raise DatasetFormatError(f"{path}: empty file; expected {record}-byte records")
    if data.size % record:
        raise DatasetFormatError(
            f"{path}: truncated or not a CIFAR binary file: {data.size} bytes is not a multiple of the {record}-byte record "
            f"({label_bytes} label byte(s) + 3072 pixel bytes)")
    rows = data.reshape(-1, record)
    labels = rows[:, :label_bytes].astype(np.int64)
    for j, k in enumerate(num_labels):
        bad = np.flatnonzero(labels[:, j] >= k)
        if bad.size:
            raise DatasetFormatError(f"{path}: record {bad[0]} has label {labels[bad[0], j]} (expected 0..{k - 1}); not a CIFAR binary file?")
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def _class_names(path: Path | None, n: int) -> list[str]:
    if path is not None and path.is_file():
        names = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if len(names) == n:
            return names
    return [str(i) for i in range(n)]


def cifar10(root: str | os.PathLike | None, split: str, transform: ImageTransform | None = None) -> ImageArrayDataset:
    """CIFAR-10 from the binary version (``cifar-10-batches-bin``); ``split`` is ``train`` (50,000) or ``test`` (10,000)."""
    _split(split, ("train", "test"), "cifar10")
    base = resolve_root(root, "cifar10")
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    files = _locate(base, "cifar10", ["cifar-10-batches-bin", "cifar10/cifar-10-batches-bin", "cifar10", "."], names,
                    "the 'CIFAR-10 binary version' (cifar-10-binary.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html")
    parts = [read_cifar_bin(f, 1, [10]) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1][:, 0] for p in parts])
    return ImageArrayDataset(images, labels, transform or ImageTransform(), name=f"cifar10-{split}",
                             fingerprint=f"cifar10:{split}|n={len(labels)}|files={files_hash(files)}",
                             description=f"CIFAR-10 {split} ({len(labels)} images)",
                             classes=_class_names(files[0].parent / "batches.meta.txt", 10))


def cifar100(root: str | os.PathLike | None, split: str, transform: ImageTransform | None = None) -> ImageArrayDataset:
    """CIFAR-100 from the binary version (``cifar-100-binary``); fine labels (coarse ones in ``meta["coarse_label"]``)."""
    _split(split, ("train", "test"), "cifar100")
    base = resolve_root(root, "cifar100")
    files = _locate(base, "cifar100", ["cifar-100-binary", "cifar100/cifar-100-binary", "cifar100", "."], [f"{split}.bin"],
                    "the 'CIFAR-100 binary version' (cifar-100-binary.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html")
    images, labels = read_cifar_bin(files[0], 2, [20, 100])
    return ImageArrayDataset(images, labels[:, 1], transform or ImageTransform(), name=f"cifar100-{split}",
                             fingerprint=f"cifar100:{split}|n={len(labels)}|files={files_hash(files)}",
                             description=f"CIFAR-100 {split} ({len(labels)} images)", meta={"coarse_label": labels[:, 0]},
                             classes=_class_names(files[0].parent / "fine_label_names.txt", 100))


# ----- SVHN -----------------------------------------------------------------------------------------------

def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN cropped-digits .mat file -> images (N, 3, 32, 32) uint8 and labels 0..9 (the file's 10 is digit 0)."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), variable_names=["X", "y"])
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise DatasetFormatError(f"{path}: unsupported .mat version ({exc}); expected the official SVHN MATLAB v5 file") from None
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError, zlib errors ... on damaged files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatasetFormatError(f"{path}: corrupt or truncated .mat file ({msg})") from None
    if "X" not in mat or "y" not in mat:
        raise DatasetFormatError(f"{path}: expected variables 'X' and 'y' (SVHN cropped digits), found {sorted(k for k in mat if not k.startswith('__'))}")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DatasetFormatError(f"{path}: 'X' has shape {x.shape}; expected (32, 32, 3, N)")
    if x.shape[3] != y.shape[0]:
        raise DatasetFormatError(f"{path}: 'X' holds {x.shape[3]} images but 'y' {y.shape[0]} labels")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DatasetFormatError(f"{path}: labels must be 1..10 (10 = digit 0), found {int(y.min())}..{int(y.max())}")
    images = np.ascontiguousarray(np.asarray(x, dtype=np.uint8).transpose(3, 2, 0, 1))
    return images, (y.astype(np.int64) % 10)


def svhn(root: str | os.PathLike | None, split: str, transform: ImageTransform | None = None) -> ImageArrayDataset:
    """SVHN cropped digits; ``split`` is ``train`` (73,257), ``test`` (26,032) or ``extra``."""
    _split(split, ("train", "test", "extra"), "svhn")
    base = resolve_root(root, "svhn")
    files = _locate(base, "svhn", ["svhn", "SVHN", "."], [f"{split}_32x32.mat"],
                    "the cropped digits (Format 2) from http://ufldl.stanford.edu/housenumbers/")
    images, labels = read_svhn_mat(files[0])
    return ImageArrayDataset(images, labels, transform or ImageTransform(), name=f"svhn-{split}",
                             fingerprint=f"svhn:{split}|n={len(labels)}|files={files_hash(files)}",
                             description=f"SVHN {split} ({len(labels)} images)")


# ----- image folders --------------------------------------------------------------------------------------

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        files += [Path(dirpath) / f for f in sorted(filenames) if _is_image(f) and not f.startswith(".")]
    return files


def _folder_transform(transform: ImageTransform | None) -> ImageTransform:
    t = transform or ImageTransform()
    if t.size is None:
        return ImageTransform(size=DEFAULT_FOLDER_SIZE, channels=t.channels or 3, mean=t.mean, std=t.std)
    return t if t.channels is not None else ImageTransform(size=t.size, channels=3, mean=t.mean, std=t.std)


def image_folder(path: str | os.PathLike, transform: ImageTransform | None = None, *, name: str | None = None,
                 what: str | None = None) -> ImageFileDataset:
    """Every image under ``path`` (sorted), decoded with Pillow when read.

    Labels follow torchvision's ImageFolder: when every image lies inside a sub-folder, the label is the
    index of its top-level sub-folder in sorted order (``classes``); otherwise the set is unlabelled (-1).
    Without ``image_size`` images are resized (shorter side) and centre-cropped to 32x32, RGB.
    """
    folder = Path(path).expanduser()
    label = what or f"folder {folder}"
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{label}: {folder} is not a directory")
    files = _scan(folder)
    if not files:
        raise DatasetNotFoundError(f"{label}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    rel = [f.relative_to(folder) for f in files]
    labels = classes = None
    if all(len(r.parts) > 1 for r in rel):
        classes = sorted({r.parts[0] for r in rel})
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[r.parts[0]] for r in rel], dtype=np.int64)
    set_name = name or folder.name
    # names, sizes and a content sample; the absolute path too, so that two unrelated folders never share a cache entry
    fp = f"{set_name}|n={len(files)}|path={folder.resolve()}|files={files_hash(files, base=folder, sample=16)}"
    return ImageFileDataset(files, labels, _folder_transform(transform), name=set_name, fingerprint=fp, classes=classes,
                            description=f"{set_name} ({len(files)} images from {folder})")


@dataclass(frozen=True)
class _NamedFolder:
    folders: tuple[str, ...]
    layout: str
    source: str


#: Sets used by the presets, each searched for under the data root in these sub-folders (first found wins).
NAMED_FOLDERS: dict[str, _NamedFolder] = {
    "textures": _NamedFolder(("dtd/images", "textures/images", "textures", "Textures", "dtd"), "<class>/*.jpg",
                             "the Describable Textures Dataset (dtd-r1.0.1.tar.gz) from https://www.robots.ox.ac.uk/~vgg/data/dtd/"),
    "places365": _NamedFolder(("places365", "Places365", "places365_standard/val", "val_256", "test_256"), "[<class>/]*.jpg",
                              "Places365 images (e.g. val_256.tar) from http://places2.csail.mit.edu/download.html"),
    "lsun_crop": _NamedFolder(("LSUN_C", "LSUN", "LSUN-Crop", "lsun_crop", "LSUN_crop"), "*.jpg",
                              "LSUN.tar.gz (LSUN crop) as released with ODIN, https://github.com/facebookresearch/odin"),
    "lsun_resize": _NamedFolder(("LSUN_resize", "LSUN-Resize", "lsun_resize"), "*.jpg",
                                "LSUN_resize.tar.gz as released with ODIN, https://github.com/facebookresearch/odin"),
    "isun": _NamedFolder(("iSUN", "isun", "iSUN-Resize"), "*.jpeg",
                         "iSUN.tar.gz as released with ODIN, https://github.com/facebookresearch/odin"),
}


def named_folder(name: str, root: str | os.PathLike | None, transform: ImageTransform | None = None) -> ImageFileDataset:
    """One of ``NAMED_FOLDERS`` under the data root (unlabelled: used as OOD sets).

    Like the energy paper's code, Textures and Places365 are resized (shorter side) and centre-cropped
    to ``image_size``. That code feeds LSUN-Crop, LSUN-Resize and iSUN without any resize; images whose
    shorter side already equals ``image_size`` pass through unchanged here too, others are resized.
    """
    spec = NAMED_FOLDERS[name]
    base = resolve_root(root, name)
    for sub in spec.folders:
        folder = base / sub
        if folder.is_dir() and _scan_has_image(folder):
            ds = image_folder(folder, transform, name=name, what=name)
            ds.labels.fill_(-1)  # class folders of an OOD set are not classes of the model
            return ds
    expected = ", ".join(f"{base / sub}/{spec.layout}" for sub in spec.folders)
    raise DatasetNotFoundError(f"{name} not found under {base}: expected images at one of {expected} -- {spec.source}")


def _scan_has_image(folder: Path) -> bool:
    for _, _, filenames in os.walk(folder, followlinks=True):
        if any(_is_image(f) for f in filenames):
            return True
    return False


# ----- TinyImageNet ---------------------------------------------------------------------------------------

def tinyimagenet(root: str | os.PathLike | None, split: str = "val", transform: ImageTransform | None = None) -> ImageFileDataset:
    """Tiny ImageNet (``tiny-imagenet-200``): ``train`` (``train/<wnid>/images/*.JPEG``), ``val`` (``val/images`` labelled by
    ``val/val_annotations.txt``) or ``test`` (``test/images``, unlabelled). Labels index ``wnids.txt`` (else sorted wnids)."""
    _split(split, ("train", "val", "test"), "tinyimagenet")
    base = resolve_root(root, "tinyimagenet")
    source = "tiny-imagenet-200.zip from http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    candidates = ("tiny-imagenet-200", "tinyimagenet", "TinyImageNet", "tin")
    top = next((base / c for c in candidates if (base / c / split).is_dir()), None)
    if top is None:
        need = {"train": "train/<wnid>/images/*.JPEG", "val": "val/images/*.JPEG and val/val_annotations.txt",
                "test": "test/images/*.JPEG"}[split]
        raise DatasetNotFoundError(f"tinyimagenet not found under {base}: expected {base / candidates[0]}/{need} -- {source}")
    wnids_file = top / "wnids.txt"
    if split == "train":
        files = [p for p in _scan(top / "train") if p.parent.name == "images"]
        wnids = [p.parent.parent.name for p in files]
    elif split == "val":
        ann = top / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DatasetNotFoundError(f"tinyimagenet: {ann} not found (it labels val/images) -- {source}")
        files, wnids = [], []
        for i, line in enumerate(ann.read_text(errors="replace").splitlines()):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise DatasetFormatError(f"{ann}: line {i + 1} is not '<file>\\t<wnid>\\t...': {line[:60]!r}")
            path = top / "val" / "images" / parts[0]
            if not path.is_file():
                raise DatasetFormatError(f"{ann}: line {i + 1} names {path}, which does not exist")
            files.append(path)
            wnids.append(parts[1])
    else:
        files, wnids = _scan(top / "test"), []
    if not files:
        raise DatasetNotFoundError(f"tinyimagenet: no images in {top / split} -- {source}")
    labels = None
    classes = None
    if wnids:
        classes = [w for w in wnids_file.read_text().split() if w] if wnids_file.is_file() else sorted(set(wnids))
        index = {w: i for i, w in enumerate(classes)}
        unknown = sorted(set(wnids) - set(index))
        if unknown:
            raise DatasetFormatError(f"{wnids_file}: does not list the class(es) {', '.join(unknown[:5])} used in {split}")
        labels = np.array([index[w] for w in wnids], dtype=np.int64)
    fp = f"tinyimagenet:{split}|n={len(files)}|path={top.resolve()}|files={files_hash(files, base=top, sample=16)}"
    return ImageFileDataset(files, labels, _folder_transform(transform), name=f"tinyimagenet-{split}", fingerprint=fp,
                            classes=classes, description=f"Tiny ImageNet {split} ({len(files)} images)")


# ----- arrays ---------------------------------------------------------------------------------------------

def array_file(path: str | os.PathLike, transform: ImageTransform | None = None) -> ArrayDataset:
    """Inputs (key ``inputs`` or ``x``) and optional labels (``labels`` or ``y``) from .npz / .npy / .safetensors / .pt.

    (N, H, W) inputs get a channel axis; uint8 inputs are 8-bit images and are divided by 255.
    """
    from ..io import read_arrays

    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetNotFoundError(f"array file {p} not found")
    arrays = read_arrays(p)
    x_key = next((k for k in ("inputs", "x", "array") if k in arrays), None)
    if x_key is None:
        raise DatasetFormatError(f"{p}: no inputs; expected an array named 'inputs' or 'x', the file has: {', '.join(arrays) or 'nothing'}")
    x = arrays[x_key]
    y = next((arrays[k] for k in ("labels", "y") if k in arrays), None)
    if x.ndim < 2 or x.shape[0] == 0:
        raise DatasetFormatError(f"{p}: inputs must be (N, ...) with N >= 1, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DatasetFormatError(f"{p}: inputs have dtype {x.dtype}; expected numbers")
    if y is not None:
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise DatasetFormatError(f"{p}: labels must be N = {x.shape[0]} integers, got shape {y.shape} dtype {y.dtype}")
    scaled = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if scaled.ndim == 3:
        scaled = scaled[:, None]
    if not np.isfinite(scaled).all():
        raise DatasetFormatError(f"{p}: inputs contain NaN or infinite values")
    import torch

    inputs = torch.from_numpy(scaled)
    if transform is not None and not transform.is_identity:
        if inputs.ndim != 4:
            raise ValueError(f"{p}: image options (size / channels / mean / std) need (N, C, H, W) inputs, got shape {tuple(inputs.shape)}")
        inputs = transform.batch(inputs)
    fp = f"array:{p.name}|sha={content_hash(np.frombuffer(p.read_bytes(), dtype=np.uint8))}|{(transform or ImageTransform()).describe()}"
    return ArrayDataset(inputs, y, name=p.stem, fingerprint=fp, description=f"arrays from {p}")


"""The sets of the Fashion-MNIST benchmark (``ebood bench fashion-mnist``): real ID images, local OOD sets.

* **In-distribution** -- Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017), read from its idx files
  (:func:`ebood.data.fashion_mnist`; Debian's ``dataset-fashion-mnist`` is found by itself). The
  60,000 training images are split 54,000 / 6,000 into train / val (stratified, seeded); the 10,000
  test images are the ID test set. Pixels are scaled to [0, 1].
* **Near-OOD** -- ``mnist-like``: scikit-learn's 1,797 handwritten digits brought to MNIST's
  preprocessing (cropped to their ink, resized so the longer side is 20 px, anti-aliased, placed in
  28x28 with the centre of mass at the centre; LeCun et al. 1998). There is no real MNIST offline:
  this stands in for the MNIST OOD set of the literature. ``notmnist-like``: letters A-J rendered
  grey from matplotlib's DejaVu fonts with small affine jitter (notMNIST, Bulatov 2011, is letters A-J
  in many fonts). ``open-set``: a model trained on classes 0-5 (T-shirt/top ... Sandal) meets the
  test images of classes 6-9 (Shirt, Sneaker, Bag, Ankle boot).
* **Far-OOD** -- ``photos``: grey crops of scikit-learn's ``china.jpg``; ``gaussian``, ``uniform``,
  ``rademacher``: Outlier Exposure's synthetic sets (Hendrycks et al., ICLR 2019) at 1x28x28.
* **Covariate shift** (reported apart from the means) -- ``corrupt-1``..``corrupt-3``: the same 1,000
  test images under rotation, Gaussian blur, contrast loss and Gaussian noise (a quarter each) at
  increasing severity, in the spirit of MNIST-C (Mu & Gilmer, 2019); labelled.
* **Auxiliary outliers** for energy / OE fine-tuning, disjoint from every test set by construction:
  see ``AUXILIARY_DESCRIPTION``.

Every set is an :class:`~ebood.data.datasets.ArrayDataset` of float32 (1, 28, 28) images in [0, 1]
(``-1`` labels for OOD sets), generated deterministically from the seed and cached per process.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from . import _render
from .builtin import AUXILIARY_PHOTO, BuiltinBenchmark, TEST_FONTS, TEST_PHOTO, auxiliary_glyph_pairs, noise_images
from .datasets import ArrayDataset, content_hash, open_set_splits
from .idx import IDX_SETS, fashion_mnist

__all__ = [
    "FashionMNISTBenchmark", "fashion_mnist_benchmark", "fashion_splits", "mnist_like_digits", "notmnist_like_letters",
    "photo_crops", "noise_set", "corrupted", "open_set_split", "auxiliary_outliers", "CORRUPTIONS", "SEVERITIES",
    "AUXILIARY_DESCRIPTION", "CLASSES", "KNOWN_CLASSES",
]

#: Bumped whenever generation changes, so fingerprints (and extraction caches) change with it.
GENERATOR_VERSION = 1
VAL_SIZE = 6000
OOD_SIZE = 1000
SHIFT_SIZE = 1000
AUXILIARY_SIZE = 8000
SIZE = 28
CLASSES: tuple[str, ...] = IDX_SETS["fashion-mnist"].classes  # type: ignore[assignment]
#: The open-set model knows classes 0..KNOWN_CLASSES-1; the others are its near-OOD.
KNOWN_CLASSES = 6
NOTMNIST_LETTERS = "ABCDEFGHIJ"
NOISE_KINDS = ("gaussian", "uniform", "rademacher")
CORRUPTIONS = ("rotate", "blur", "contrast", "noise")
#: Per corruption, its parameter at severities 1, 2, 3: rotation (degrees), blur sigma (px),
#: contrast factor (x -> m + c (x - m)), noise standard deviation.
SEVERITIES: dict[str, tuple[float, float, float]] = {
    "rotate": (20.0, 40.0, 60.0), "blur": (0.8, 1.3, 1.8), "contrast": (0.5, 0.3, 0.15), "noise": (0.1, 0.2, 0.3),
}

AUXILIARY_DESCRIPTION = (
    f"Auxiliary outliers ({AUXILIARY_SIZE} grey 28x28 images) come from sources disjoint from every test set by construction: "
    f"{AUXILIARY_SIZE // 2} glyphs rendered from matplotlib's STIX General and Computer Modern fonts (the notMNIST-like "
    "test letters use only the DejaVu fonts) showing lower-case letters (a d e h m n y), Greek letters and math symbols, "
    "never an upper-case Latin letter or a digit; "
    f"{AUXILIARY_SIZE // 4} crops of scikit-learn's {AUXILIARY_PHOTO} photograph (the photo test set uses {TEST_PHOTO} only); "
    f"and {AUXILIARY_SIZE - AUXILIARY_SIZE // 2 - AUXILIARY_SIZE // 4} images of Outlier Exposure's Blobs noise (the "
    "synthetic test sets are Gaussian, uniform and Rademacher noise). No Fashion-MNIST image and no handwritten digit is among them."
)

DESCRIPTIONS: dict[str, str] = {
    "fashion-mnist": "Fashion-MNIST (Xiao et al. 2017), 28x28 grey, pixels / 255; 54,000 train / 6,000 val (stratified) / 10,000 test",
    "mnist-like": "scikit-learn's 1,797 handwritten digits in MNIST's preprocessing (20x20 box, centre of mass at the centre of 28x28); stands in for MNIST",
    "notmnist-like": "letters A-J rendered grey from 12 DejaVu fonts with affine jitter, notMNIST-style",
    "photos": f"grey crops (28-200 px, area-resized to 28x28) of scikit-learn's {TEST_PHOTO}",
    "gaussian": "i.i.d. N(0.5, 1) pixels clipped to [0, 1] (Outlier Exposure's Gaussian)",
    "uniform": "i.i.d. U(0, 1) pixels",
    "rademacher": "i.i.d. pixels 0 or 1 with probability 1/2 (Outlier Exposure's Rademacher on [0, 1])",
    "open-set": f"test images of classes {KNOWN_CLASSES}-9 ({', '.join(CLASSES[KNOWN_CLASSES:])}), unseen by a model trained on classes 0-{KNOWN_CLASSES - 1}",
}


def _shift_description(severity: int) -> str:
    params = ", ".join(f"{k} {v[severity - 1]:g}" for k, v in SEVERITIES.items())
    return (f"{SHIFT_SIZE} ID test images, a quarter each under rotation (degrees), blur (sigma), contrast (factor), "
            f"noise (std) at severity {severity}: {params} (covariate shift, labelled)")


def _rng(seed: int, name: str) -> np.random.Generator:
    """An independent stream per (seed, set name), so one set never shifts another."""
    return np.random.default_rng([int(seed), zlib.crc32(("fashion-mnist/" + name).encode())])


def _as_dataset(x: np.ndarray | torch.Tensor, labels: np.ndarray | None, *, name: str, seed: int, group: str,
                description: str, meta: dict[str, np.ndarray] | None = None, source: str | None = None) -> ArrayDataset:
    inputs = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, SIZE, SIZE)
    identity = source or f"sha={content_hash(inputs)}"
    fp = f"fashion-bench:{name}|seed={seed}|v={GENERATOR_VERSION}|n={len(inputs)}|{identity}"
    return ArrayDataset(inputs, labels, name=name, fingerprint=fp, group=group, description=description, meta=meta)


# ----- in-distribution ---------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def fashion_splits(seed: int = 0, root: str | None = None) -> dict[str, ArrayDataset]:
    """Fashion-MNIST as ``train`` (54,000) / ``val`` (6,000, stratified by class) / ``test`` (10,000).

    ``meta["index"]`` is the position in the official training (or test) file.
    """
    from sklearn.model_selection import train_test_split

    train_file, test_file = fashion_mnist(root, "train"), fashion_mnist(root, "test")
    labels = train_file.labels.numpy()
    idx = np.arange(len(labels))
    train, val = train_test_split(idx, test_size=VAL_SIZE, stratify=labels, random_state=seed)
    out = {}
    for split, source, part in (("train", train_file, np.sort(train)), ("val", train_file, np.sort(val)),
                                ("test", test_file, np.arange(len(test_file)))):
        images = source.images[torch.from_numpy(part)].to(torch.float32).div_(255.0)
        out[split] = _as_dataset(images, source.labels.numpy()[part], name=f"fashion-mnist-{split}", seed=seed, group="id",
                                 description=f"{DESCRIPTIONS['fashion-mnist']}: {split}", meta={"index": part},
                                 source=f"from={source.fingerprint}|idx={content_hash(part)}")
    return out


# ----- near-OOD -----------------------------------------------------------------------------------------

def mnist_preprocess(images: np.ndarray, box: int = 20, size: int = SIZE) -> np.ndarray:
    """Grey images (N, H, W) in [0, 1] -> (N, size, size) the way MNIST was made (LeCun et al. 1998).

    Each image is cropped to its ink, resized (bilinear, anti-aliased) so that its longer side is
    ``box`` pixels with the aspect ratio kept, and placed in a ``size`` x ``size`` image so that its
    centre of mass (rounded to whole pixels) lies at the centre.
    """
    out = np.zeros((len(images), size, size), dtype=np.float32)
    centre = (size - 1) / 2.0
    for i, img in enumerate(images):
        rows, cols = np.flatnonzero(img.any(axis=1)), np.flatnonzero(img.any(axis=0))
        if rows.size == 0:
            continue
        crop = img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        h, w = crop.shape
        scale = box / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        t = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None]
        small = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0, 0].clamp_(0, 1).numpy()
        mass = small.sum()
        cy = (small.sum(axis=1) * np.arange(nh)).sum() / mass
        cx = (small.sum(axis=0) * np.arange(nw)).sum() / mass
        top = int(np.clip(round(centre - cy), 0, size - nh))
        left = int(np.clip(round(centre - cx), 0, size - nw))
        out[i, top:top + nh, left:left + nw] = small
    return out


@lru_cache(maxsize=4)
def mnist_like_digits(seed: int = 0) -> ArrayDataset:
    """Near-OOD: scikit-learn's 1,797 digits (values / 16) in MNIST's preprocessing; the digit in ``meta["digit"]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = mnist_preprocess(digits.images / 16.0)
    return _as_dataset(x, None, name="mnist-like", seed=seed, group="near", description=DESCRIPTIONS["mnist-like"],
                       meta={"digit": digits.target.astype(np.int64)})


@lru_cache(maxsize=4)
def notmnist_like_letters(seed: int = 0, n: int = OOD_SIZE) -> ArrayDataset:
    """Near-OOD: letters A-J drawn uniformly over the DejaVu ``TEST_FONTS``, grey 28x28."""
    rng = _rng(seed, "notmnist-like")
    fonts = [TEST_FONTS[i] for i in rng.integers(0, len(TEST_FONTS), n)]
    chars = [NOTMNIST_LETTERS[i] for i in rng.integers(0, len(NOTMNIST_LETTERS), n)]
    x, params = _render.render_grey_glyphs(fonts, chars, rng, SIZE)
    return _as_dataset(x, None, name="notmnist-like", seed=seed, group="near", description=DESCRIPTIONS["notmnist-like"],
                       meta={"font": np.array(fonts), "char": np.array(chars), **params})


# ----- far-OOD ------------------------------------------------------------------------------------------

def photo_crops(photo: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` grey crops (28-200 px) of a scikit-learn sample photograph, area-resized to 28x28, in [0, 1]."""
    grey, boxes = _render.photo_crops(photo, n, rng, SIZE, 28, 200)
    return grey.astype(np.float32) / 255.0, boxes


@lru_cache(maxsize=4)
def photos(seed: int = 0, n: int = OOD_SIZE) -> ArrayDataset:
    """Far-OOD: grey crops of ``TEST_PHOTO``."""
    x, boxes = photo_crops(TEST_PHOTO, n, _rng(seed, "photos"))
    return _as_dataset(x, None, name="photos", seed=seed, group="far", description=DESCRIPTIONS["photos"], meta=boxes)


@lru_cache(maxsize=8)
def noise_set(kind: str, seed: int = 0, n: int = OOD_SIZE) -> ArrayDataset:
    """Far-OOD: Outlier Exposure's ``kind`` noise (``gaussian``, ``uniform``, ``rademacher``) at 1x28x28."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {', '.join(NOISE_KINDS)}")
    x = noise_images(kind, n, _rng(seed, kind), channels=1, size=SIZE)
    return _as_dataset(x, None, name=kind, seed=seed, group="far", description=DESCRIPTIONS[kind])


# ----- covariate shift ----------------------------------------------------------------------------------

def corrupt(x: torch.Tensor, kind: str, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Images (N, 1, H, W) in [0, 1] under corruption ``kind`` (``CORRUPTIONS``) at ``severity`` 1..3."""
    level = SEVERITIES[kind][severity - 1]
    n = x.shape[0]
    if kind == "rotate":
        angle = np.deg2rad(level * rng.choice(np.array([-1.0, 1.0]), n))
        c, s = np.cos(angle), np.sin(angle)
        theta = torch.from_numpy(np.stack([np.stack([c, -s, np.zeros(n)], 1), np.stack([s, c, np.zeros(n)], 1)], 1)).float()
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0, 1)
    if kind == "blur":
        from scipy import ndimage

        return torch.from_numpy(ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, level, level))).clamp_(0, 1)
    if kind == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (mean + level * (x - mean)).clamp_(0, 1)
    if kind == "noise":
        return (x + torch.from_numpy(rng.normal(0.0, level, tuple(x.shape)).astype(np.float32))).clamp_(0, 1)
    raise ValueError(f"unknown corruption {kind!r}; expected one of {', '.join(CORRUPTIONS)}")


def corrupted(test: ArrayDataset, severity: int, seed: int = 0, n: int = SHIFT_SIZE) -> ArrayDataset:
    """Covariate shift: ``n`` test images (the same ones at every severity), a quarter under each corruption."""
    if severity not in (1, 2, 3):
        raise ValueError(f"severity must be 1, 2 or 3, got {severity!r}")
    pick = np.sort(_rng(seed, "corrupt-pick").choice(len(test), n, replace=False))
    kinds = np.array(CORRUPTIONS)[_rng(seed, "corrupt-kind").permutation(np.arange(n) % len(CORRUPTIONS))]
    x = test.inputs[torch.from_numpy(pick)].clone()
    rng = _rng(seed, f"corrupt-{severity}")
    for kind in CORRUPTIONS:
        rows = torch.from_numpy(np.flatnonzero(kinds == kind))
        x[rows] = corrupt(x[rows], kind, severity, rng)
    return _as_dataset(x, test.labels.numpy()[pick], name=f"corrupt-{severity}", seed=seed, group="covariate",
                       description=_shift_description(severity), meta={"index": pick, "corruption": kinds})


# ----- open set -----------------------------------------------------------------------------------------

def open_set_split(splits: dict[str, ArrayDataset], known: int = KNOWN_CLASSES) -> dict[str, ArrayDataset]:
    """``train``/``val``/``test`` with classes ``0..known-1`` (labels unchanged) and ``ood``: the test images of the
    other classes, labelled -1 (the class kept in ``meta["class"]``)."""
    return open_set_splits(splits, known, id_name="open-set-{split}",
                           id_description=f"Fashion-MNIST classes 0-{known - 1} ({{split}}), open-set in-distribution",
                           ood_name="open-set", ood_description=DESCRIPTIONS["open-set"], class_key="class")


# ----- auxiliary outliers -------------------------------------------------------------------------------

@lru_cache(maxsize=4)
def auxiliary_outliers(seed: int = 0, n: int = AUXILIARY_SIZE) -> ArrayDataset:
    """Outliers for energy / OE fine-tuning, disjoint from every test set (``AUXILIARY_DESCRIPTION``).

    ``meta["source"]`` is ``glyph`` / ``photo`` / ``blobs``.
    """
    rng = _rng(seed, "outliers")
    pairs = auxiliary_glyph_pairs()
    n_g, n_p = n // 2, n // 4
    n_b = n - n_g - n_p
    pick = rng.integers(0, len(pairs), n_g)
    glyphs, _ = _render.render_grey_glyphs([pairs[i][0] for i in pick], [pairs[i][1] for i in pick], rng, SIZE)
    crops, _ = photo_crops(AUXILIARY_PHOTO, n_p, rng)
    blobs = _render.blobs(n_b, SIZE, rng)[:, 0].astype(np.float32)
    x = np.concatenate([glyphs, crops, blobs])
    source = np.array(["glyph"] * n_g + ["photo"] * n_p + ["blobs"] * n_b)
    order = rng.permutation(n)  # mixed, so any batch holds every source
    return _as_dataset(x[order], None, name="outliers", seed=seed, group="auxiliary", description=AUXILIARY_DESCRIPTION,
                       meta={"source": source[order]})


# ----- the benchmark ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FashionMNISTBenchmark(BuiltinBenchmark):
    """Every set of the Fashion-MNIST benchmark for one seed: the fields of ``BuiltinBenchmark`` plus the class names."""

    auxiliary_description: str = AUXILIARY_DESCRIPTION
    classes: tuple[str, ...] = CLASSES


def fashion_mnist_benchmark(seed: int = 0, root: str | os.PathLike | None = None) -> FashionMNISTBenchmark:
    """Every set of the benchmark for ``seed``; Fashion-MNIST read from ``root`` (default: found by itself)."""
    seed = int(seed)
    splits = fashion_splits(seed, None if root is None else str(root))
    ood = {"mnist-like": mnist_like_digits(seed), "notmnist-like": notmnist_like_letters(seed), "photos": photos(seed),
           **{k: noise_set(k, seed) for k in NOISE_KINDS}}
    covariate = {f"corrupt-{s}": corrupted(splits["test"], s, seed) for s in (1, 2, 3)}
    return FashionMNISTBenchmark(
        seed=seed, train=splits["train"], val=splits["val"], test=splits["test"], ood=ood,
        groups={k: v.group for k, v in ood.items()},  # type: ignore[misc]
        covariate=covariate, open_set=open_set_split(splits), auxiliary=auxiliary_outliers(seed),
        descriptions={**{k: v.description for k, v in {**ood, **covariate}.items()}, "fashion-mnist": DESCRIPTIONS["fashion-mnist"],
                      "open-set": DESCRIPTIONS["open-set"]},
    )

"""The built-in offline benchmark: scikit-learn's digits as in-distribution, everything else rendered.

Nothing is downloaded; everything is generated deterministically from a seed using what ships with
ebood's dependencies (scikit-learn's digits and sample photographs, matplotlib's fonts, Pillow):

* **In-distribution** -- ``sklearn.datasets.load_digits`` (1797 8x8 images, integers 0..16, from the UCI
  "Optical Recognition of Handwritten Digits" set, Alpaydin & Kaynak 1998), divided by 16, split
  60/20/20 into train / val / test, stratified by class.
* **Near-OOD** -- ``letters``: upper-case Latin letters rendered from matplotlib's DejaVu fonts (Sans,
  Serif, Sans Mono; regular, bold, oblique, bold oblique) with random affine and stroke jitter, then
  put through the UCI preprocessing (32x32 binary bitmap, on-pixels counted in 4x4 blocks). The digits
  analogue of MNIST vs notMNIST. Letters that look like digits are left out (see ``EXCLUDED_LETTERS``).
* **Far-OOD** -- ``photos``: patches of ``china.jpg`` under the same preprocessing (Otsu-binarised);
  ``gaussian``, ``uniform``, ``rademacher`` and ``blobs``: the synthetic sets of Outlier Exposure
  (Hendrycks, Mazeika & Dietterich, ICLR 2019), on the digits' value grid.
* **Covariate shift** (reported separately, not OOD) -- ``font-digits``: digits 0-9 rendered from the same
  fonts, with their labels.
* **Open-set split** -- ID = digits 0-5 (train / val / test from the splits above), OOD = test digits 6-9.
* **Auxiliary outliers** for energy / OE fine-tuning -- ``outliers``: sources disjoint from every test set by
  construction: other fonts (STIX, Computer Modern), other glyphs (selected lower-case, Greek letters, math
  symbols), the *other* photograph (``flower.jpg``) and random pen scribbles. ``AUXILIARY_DESCRIPTION`` says so
  in one paragraph for reports.

Every set is an :class:`~ebood.data.datasets.ArrayDataset` of float32 (1, 8, 8) images with values
``k / 16``, ``k = 0..16`` (exactly the digits' grid), label ``y`` (``-1`` for OOD sets) and per-sample
provenance in ``meta`` (font, glyph, photo and box, noise kind). Generation is cached per process.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from . import _render
from .datasets import ArrayDataset, content_hash, open_set_splits
from .transforms import ImageTransform

__all__ = [
    "BuiltinBenchmark", "builtin_benchmark", "builtin_dataset", "available_builtin", "digits_splits",
    "letters", "photos", "noise", "font_digits", "open_set_split", "auxiliary_outliers", "auxiliary_glyph_pairs",
    "NEAR_LETTERS", "EXCLUDED_LETTERS", "TEST_FONTS", "AUXILIARY_FONTS", "AUXILIARY_GLYPHS",
    "TEST_PHOTO", "AUXILIARY_PHOTO", "NOISE_KINDS", "AUXILIARY_DESCRIPTION", "SPLIT_FRACTIONS",
]

#: Bumped whenever generation changes, so fingerprints (and extraction caches) change with it.
GENERATOR_VERSION = 1
#: Fractions of the 1797 digits in train / val / test.
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
#: Samples per generated set.
OOD_SIZE = 1000
AUXILIARY_SIZE = 4000  # half glyphs, a quarter photo patches, a quarter scribbles

#: Fonts of every *test* set rendered from fonts (letters and font-digits): matplotlib's DejaVu files.
TEST_FONTS: tuple[str, ...] = tuple(
    f"{family}{style}.ttf"
    for family, styles in (("DejaVuSans", ("", "-Bold", "-Oblique", "-BoldOblique")),
                           ("DejaVuSerif", ("", "-Bold", "-Italic", "-BoldItalic")),
                           ("DejaVuSansMono", ("", "-Bold", "-Oblique", "-BoldOblique")))
    for style in styles
)
#: Fonts of the auxiliary outliers only: matplotlib's STIX General and Computer Modern files.
AUXILIARY_FONTS: tuple[str, ...] = (
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf", "cmb10.ttf", "cmmi10.ttf",
)
#: The Computer Modern files use TeX's own encoding for symbols, so only their lower-case letters are used.
_LATIN_ONLY_FONTS = frozenset(f for f in AUXILIARY_FONTS if f.startswith("cm"))

#: Upper-case letters left out of the near-OOD set because they look like a digit at 8x8, letter -> digit.
EXCLUDED_LETTERS: dict[str, str] = {"B": "8", "D": "0", "G": "6", "I": "1", "O": "0", "Q": "0", "S": "5", "T": "7", "Z": "2"}
#: The near-OOD letters: the other 17 upper-case letters.
NEAR_LETTERS = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in EXCLUDED_LETTERS)

#: Glyphs of the auxiliary outliers. None is an upper-case Latin letter or a digit; lower-case letters
#: shaped like a test letter once stretched to full height (c f k p u v w x) or like a digit (b g q i j l
#: o r s t z) are left out, and so are
#: Greek letters and symbols shaped like a digit or a Latin letter (beta, delta, theta, sigma, zeta, xi,
#: kappa, rho, tau, chi, $, section, &, @, ?, !, integral).
AUXILIARY_GLYPHS = "adehmny" + "αγεηλμπφψωΓΔΛΞΠΣΦΨΩ" + "+=%#*±×÷√∞≈≠<>¶"
_LOWER_LATIN = frozenset("adehmny")

TEST_PHOTO = "china.jpg"
AUXILIARY_PHOTO = "flower.jpg"
NOISE_KINDS = ("gaussian", "uniform", "rademacher", "blobs")

AUXILIARY_DESCRIPTION = (
    "Auxiliary outliers (4000 images, the same preprocessing as the digits: 32x32 binary bitmap counted in 4x4 "
    "blocks, values 0..16) come from sources disjoint from every test set by construction: 2000 glyphs rendered "
    "from matplotlib's STIX General (regular, bold, italic, bold italic) and Computer Modern (cmr10, cmss10, "
    "cmtt10, cmti10, cmb10, cmmi10) fonts -- the test letters and font digits use only the DejaVu fonts -- "
    "showing lower-case letters (a d e h m n y), Greek letters and math symbols, never an upper-case Latin "
    "letter or a digit; 1000 patches of scikit-learn's flower.jpg photograph (the photo test set uses china.jpg "
    "only); and 1000 random pen scribbles (2-4 Bezier strokes; the synthetic test sets are Gaussian, uniform, "
    "Rademacher and blob noise)."
)

DESCRIPTIONS: dict[str, str] = {
    "digits": "scikit-learn's handwritten digits (UCI optdigits, 8x8, 0..16 / 16), stratified 60/20/20 split",
    "letters": f"upper-case letters {NEAR_LETTERS} from 12 DejaVu fonts with affine/stroke jitter, digits preprocessing",
    "photos": f"patches (24-160 px) of scikit-learn's {TEST_PHOTO}, Otsu-binarised, digits preprocessing",
    "gaussian": "i.i.d. N(0.5, 1) pixels clipped to [0, 1] (Outlier Exposure's Gaussian), on the 1/16 grid",
    "uniform": "i.i.d. U(0, 1) pixels, on the 1/16 grid",
    "rademacher": "i.i.d. pixels 0 or 1 with probability 1/2 (Outlier Exposure's Rademacher on [0, 1])",
    "blobs": "Outlier Exposure's Blobs (Bernoulli(0.7), Gaussian blur 1.5, < 0.75 -> 0) at 32x32, binarised, 4x4 block counts",
    "font-digits": "digits 0-9 from 12 DejaVu fonts with affine/stroke jitter, digits preprocessing (covariate shift, labelled)",
    "openset": "digits 0-5 as in-distribution, test digits 6-9 as near-OOD",
    "outliers": AUXILIARY_DESCRIPTION,
}


def _rng(seed: int, name: str) -> np.random.Generator:
    """An independent stream per (seed, set name), so one set never shifts another."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def _as_dataset(counts: np.ndarray, labels: np.ndarray | None, *, name: str, seed: int, group: str | None,
                description: str, meta: dict[str, np.ndarray]) -> ArrayDataset:
    x = torch.from_numpy(counts.astype(np.float32)[:, None] / 16.0)
    y = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
    fp = f"builtin:{name}|seed={seed}|v={GENERATOR_VERSION}|n={len(x)}|sha={content_hash(x, y if y is not None else torch.empty(0))}"
    return ArrayDataset(x, y, name=name, fingerprint=fp, group=group, description=description, meta=meta)


# ----- in-distribution ---------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def digits_splits(seed: int = 0) -> dict[str, ArrayDataset]:
    """scikit-learn's digits split 60/20/20 into ``train`` / ``val`` / ``test``, stratified by class.

    Images are (1, 8, 8) float32 ``k / 16``; ``meta["index"]`` is the position in ``load_digits()``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    counts = digits.images.astype(np.int64)
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_f, val_f, test_f = SPLIT_FRACTIONS
    train, rest = train_test_split(idx, train_size=train_f, stratify=labels, random_state=seed)
    val, test = train_test_split(rest, test_size=test_f / (val_f + test_f), stratify=labels[rest], random_state=seed)
    out = {}
    for split, part in (("train", train), ("val", val), ("test", test)):
        part = np.sort(part)
        out[split] = _as_dataset(counts[part], labels[part], name=f"digits-{split}", seed=seed, group="id",
                                 description=f"{DESCRIPTIONS['digits']}: {split}", meta={"index": part})
    return out


# ----- OOD and covariate sets ---------------------------------------------------------------------------

def _glyph_set(fonts: list[str], chars: list[str], rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    counts, params = _render.render_glyphs(fonts, chars, rng)
    meta = {"font": np.array(fonts), "char": np.array(chars), **params}
    return counts, meta


@lru_cache(maxsize=8)
def letters(seed: int = 0, n: int = OOD_SIZE) -> ArrayDataset:
    """Near-OOD: upper-case letters (``NEAR_LETTERS``) drawn uniformly over ``TEST_FONTS`` x letters."""
    rng = _rng(seed, "letters")
    fonts = [TEST_FONTS[i] for i in rng.integers(0, len(TEST_FONTS), n)]
    chars = [NEAR_LETTERS[i] for i in rng.integers(0, len(NEAR_LETTERS), n)]
    counts, meta = _glyph_set(fonts, chars, rng)
    return _as_dataset(counts, None, name="letters", seed=seed, group="near", description=DESCRIPTIONS["letters"], meta=meta)


@lru_cache(maxsize=8)
def font_digits(seed: int = 0, n: int = OOD_SIZE) -> ArrayDataset:
    """Covariate shift: digits 0-9 (balanced) rendered from ``TEST_FONTS``, labelled with their digit."""
    rng = _rng(seed, "font-digits")
    labels = rng.permutation(np.arange(n) % 10)
    fonts = [TEST_FONTS[i] for i in rng.integers(0, len(TEST_FONTS), n)]
    counts, meta = _glyph_set(fonts, [str(d) for d in labels], rng)
    return _as_dataset(counts, labels, name="font-digits", seed=seed, group="covariate",
                       description=DESCRIPTIONS["font-digits"], meta=meta)


@lru_cache(maxsize=8)
def photos(seed: int = 0, n: int = OOD_SIZE) -> ArrayDataset:
    """Far-OOD: patches of ``TEST_PHOTO`` under the digits preprocessing."""
    counts, boxes = _render.photo_patches(TEST_PHOTO, n, _rng(seed, "photos"))
    meta = {"photo": np.array([TEST_PHOTO] * n), **boxes}
    return _as_dataset(counts, None, name="photos", seed=seed, group="far", description=DESCRIPTIONS["photos"], meta=meta)


def noise_images(kind: str, n: int, rng: np.random.Generator, channels: int = 1, size: int = 8) -> np.ndarray:
    """Outlier Exposure's synthetic images (Hendrycks et al., ICLR 2019) as (N, C, S, S) floats in [0, 1].

    gaussian: N(0.5, 1) clipped to [0, 1]; uniform: U(0, 1); rademacher: 0 or 1 with probability 1/2;
    blobs: Bernoulli(0.7) blurred (sigma 1.5) with values < 0.75 set to 0. At the digits' shape
    (1, 8, 8) blobs are drawn at 32x32, binarised and counted in 4x4 blocks like the digits. Values are
    rounded to the grid of the in-distribution images: k/16 at (1, 8, 8), k/255 otherwise.
    """
    digits_grid = (channels, size) == (1, 8)
    shape = (n, channels, size, size)
    if kind == "gaussian":
        x = np.clip(rng.normal(0.5, 1.0, shape), 0.0, 1.0)
    elif kind == "uniform":
        x = rng.uniform(0.0, 1.0, shape)
    elif kind == "rademacher":
        x = rng.integers(0, 2, shape).astype(np.float64)
    elif kind == "blobs":
        if digits_grid:
            field = _render.blobs(n, _render.BITMAP, rng)[:, 0]
            return _render.block_counts(field > 0)[:, None].astype(np.float64) / 16.0
        x = _render.blobs(n, size, rng, channels)
    else:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {', '.join(NOISE_KINDS)}")
    levels = 16.0 if digits_grid else 255.0
    return np.round(x * levels) / levels


@lru_cache(maxsize=16)
def noise(kind: str, seed: int = 0, n: int = OOD_SIZE) -> ArrayDataset:
    """Far-OOD synthetic set ``kind`` (one of ``NOISE_KINDS``) on the digits' grid."""
    x = noise_images(kind, n, _rng(seed, kind))
    counts = np.rint(x[:, 0] * 16).astype(np.int64)
    return _as_dataset(counts, None, name=kind, seed=seed, group="far", description=DESCRIPTIONS[kind],
                       meta={"kind": np.array([kind] * n)})


# ----- open set -----------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def open_set_split(seed: int = 0, known: int = 6) -> dict[str, ArrayDataset]:
    """Open-set recognition on digits: ``train``/``val``/``test`` hold digits ``0..known-1`` (labels
    unchanged), ``ood`` the test digits ``known..9`` with label -1 (the digit is kept in ``meta["digit"]``)."""
    if not 1 <= known <= 9:
        raise ValueError(f"known must be between 1 and 9 classes, got {known}")
    return open_set_splits(digits_splits(seed), known, id_name="openset-{split}",
                           id_description=f"digits 0-{known - 1} ({{split}}), open-set in-distribution", ood_name="openset-ood",
                           ood_description=f"test digits {known}-9, unseen classes of the open-set model", class_key="digit")


# ----- auxiliary outliers -------------------------------------------------------------------------------

def auxiliary_glyph_pairs() -> list[tuple[str, str]]:
    """The (font, glyph) pairs of the auxiliary glyphs: AUXILIARY_FONTS x AUXILIARY_GLYPHS that the font really draws."""
    pairs = []
    for font in AUXILIARY_FONTS:
        chars = _LOWER_LATIN if font in _LATIN_ONLY_FONTS else AUXILIARY_GLYPHS
        pairs += [(font, c) for c in AUXILIARY_GLYPHS if c in chars and _render.has_glyph(font, c)]
    return pairs


@lru_cache(maxsize=8)
def auxiliary_outliers(seed: int = 0, n: int = AUXILIARY_SIZE) -> ArrayDataset:
    """Outliers for energy / OE fine-tuning, disjoint from every test set (see ``AUXILIARY_DESCRIPTION``).

    ``meta["source"]`` is ``glyph`` / ``photo`` / ``scribble``; ``meta["font"]``, ``meta["char"]`` and
    ``meta["photo"]`` record the provenance ("" where it does not apply).
    """
    rng = _rng(seed, "outliers")
    pairs = auxiliary_glyph_pairs()
    n_g, n_p = n // 2, n // 4
    n_s = n - n_g - n_p
    pick = rng.integers(0, len(pairs), n_g)
    fonts = [pairs[i][0] for i in pick]
    chars = [pairs[i][1] for i in pick]
    g_counts, _ = _render.render_glyphs(fonts, chars, rng)
    p_counts, _ = _render.photo_patches(AUXILIARY_PHOTO, n_p, rng)
    s_counts, _ = _render.scribbles(n_s, rng)
    counts = np.concatenate([g_counts, p_counts, s_counts])
    meta = {
        "source": np.array(["glyph"] * n_g + ["photo"] * n_p + ["scribble"] * n_s),
        "font": np.array(fonts + [""] * (n_p + n_s)),
        "char": np.array(chars + [""] * (n_p + n_s)),
        "photo": np.array([""] * n_g + [AUXILIARY_PHOTO] * n_p + [""] * n_s),
    }
    order = rng.permutation(n)  # mixed, so any prefix or batch holds every source
    counts = counts[order]
    meta = {k: v[order] for k, v in meta.items()}
    return _as_dataset(counts, None, name="outliers", seed=seed, group="auxiliary", description=AUXILIARY_DESCRIPTION, meta=meta)


# ----- the benchmark ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuiltinBenchmark:
    """Every set of the built-in benchmark for one seed.

    ``ood`` maps set name -> dataset (``letters``, ``photos``, ``gaussian``, ``uniform``, ``rademacher``,
    ``blobs``) and ``groups`` name -> ``"near"`` / ``"far"``; ``covariate`` holds ``font-digits``;
    ``open_set`` holds ``train`` / ``val`` / ``test`` (digits 0-5) and ``ood`` (digits 6-9).
    """

    seed: int
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    ood: dict[str, ArrayDataset]
    groups: dict[str, str]
    covariate: dict[str, ArrayDataset]
    open_set: dict[str, ArrayDataset]
    auxiliary: ArrayDataset
    auxiliary_description: str = AUXILIARY_DESCRIPTION
    descriptions: dict[str, str] = field(default_factory=dict)
    num_classes: int = 10

    def ood_sets(self, group: str | None = None) -> dict[str, ArrayDataset]:
        """The OOD test sets, all or those of one group (``near`` / ``far``)."""
        return {k: v for k, v in self.ood.items() if group is None or self.groups[k] == group}


def builtin_benchmark(seed: int = 0) -> BuiltinBenchmark:
    """Build (or fetch from this process's cache) every built-in set for ``seed``."""
    seed = int(seed)
    splits = digits_splits(seed)
    ood = {"letters": letters(seed), "photos": photos(seed), **{k: noise(k, seed) for k in NOISE_KINDS}}
    return BuiltinBenchmark(
        seed=seed, train=splits["train"], val=splits["val"], test=splits["test"], ood=ood,
        groups={k: v.group for k, v in ood.items()},  # type: ignore[misc]
        covariate={"font-digits": font_digits(seed)}, open_set=open_set_split(seed),
        auxiliary=auxiliary_outliers(seed), descriptions={k: v.description for k, v in ood.items()} | {
            "font-digits": DESCRIPTIONS["font-digits"], "digits": DESCRIPTIONS["digits"], "openset": DESCRIPTIONS["openset"]},
    )


# ----- by name (``builtin:NAME`` specs) -----------------------------------------------------------------

def _by_name(name: str, seed: int) -> ArrayDataset:
    if name.startswith("digits-") and name[7:] in ("train", "val", "test"):
        return digits_splits(seed)[name[7:]]
    if name.startswith("openset-") and name[8:] in ("train", "val", "test", "ood"):
        return open_set_split(seed)[name[8:]]
    makers = {"letters": letters, "photos": photos, "font-digits": font_digits, "outliers": auxiliary_outliers}
    if name in makers:
        return makers[name](seed)
    if name in NOISE_KINDS:
        return noise(name, seed)
    raise KeyError(name)


_ALIASES = {"digits": "digits-train", "auxiliary": "outliers", "covariate": "font-digits", "digits-validation": "digits-val"}


def available_builtin() -> list[str]:
    """Every name accepted by ``builtin_dataset`` / ``open_dataset("builtin:NAME")``."""
    return (["digits-train", "digits-val", "digits-test", "letters", "photos", *NOISE_KINDS, "font-digits",
             "openset-train", "openset-val", "openset-test", "openset-ood", "outliers"])


def builtin_dataset(name: str, seed: int = 0, transform: ImageTransform | None = None) -> ArrayDataset:
    """A built-in set by name (``available_builtin()``), optionally resized / re-channelled / normalised.

    The noise sets are drawn natively at the requested shape (e.g. 3x32x32 Gaussian noise for a CIFAR
    model); the other sets are 8x8 images and are upsampled (bilinear) and channel-repeated.
    """
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    try:
        ds = _by_name(key, int(seed))
    except KeyError:
        raise ValueError(f"unknown built-in dataset {name!r}; available: {', '.join(available_builtin())}") from None
    if transform is None or transform.is_identity:
        return ds
    channels, size = transform.channels or 1, transform.size or 8
    if key in NOISE_KINDS and (channels, size) != (1, 8):
        x = torch.from_numpy(noise_images(key, len(ds), _rng(seed, key), channels, size).astype(np.float32))
        x = ImageTransform(mean=transform.mean, std=transform.std).batch(x)
    else:
        x = transform.batch(ds.inputs)
    return ArrayDataset(x, ds.labels, name=ds.name, fingerprint=f"{ds.fingerprint}|{transform.describe()}",
                        group=ds.group, description=ds.description, meta=ds.meta)

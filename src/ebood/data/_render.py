"""Rendering things into the UCI handwritten-digits format (the 8x8 images of ``sklearn.datasets.load_digits``).

The UCI "Optical Recognition of Handwritten Digits" preprocessing (Alpaydin & Kaynak, 1998; NIST
tools of Garris et al., 1997): a size-normalised, centred 32x32 *binary* bitmap is divided into
non-overlapping 4x4 blocks and the "on" pixels of each block are counted, giving an 8x8 image of
integers 0..16. Everything here ends with exactly that step (``block_counts``, ``finish_bitmap``), so letters,
photo patches and scribbles live on the same grid as the digits.

Glyphs are rendered once per (font, character), then warped (bilinear) straight onto the 32x32 grid and
binarised; a random threshold (a quarter to three quarters of full ink) and an optional 3x3 dilation vary
the stroke width, since pen strokes are thicker than most fonts'.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

BITMAP = 32  # the NIST bitmap, drawn at directly
_FONT_PX = 44  # glyphs are rendered once at this size (capitals ~32 px high) and cached, then warped per sample


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run small tensor ops on one thread: on a busy 2-core machine, thread hand-offs for
    millisecond-sized ops cost more than they save (measured 2x on the whole benchmark build)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def block_counts(bitmaps: np.ndarray) -> np.ndarray:
    """(N, 32, 32) binary bitmaps -> (N, 8, 8) uint8 counts of on-pixels in each 4x4 block (0..16)."""
    b = bitmaps.astype(np.uint8)
    rows = b[:, 0::4] + b[:, 1::4] + b[:, 2::4] + b[:, 3::4]  # strided adds: much faster than sum(axis=(2, 4))
    return rows[:, :, 0::4] + rows[:, :, 1::4] + rows[:, :, 2::4] + rows[:, :, 3::4]


def _affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, 1, size, size), align_corners=False)`` written as two broadcasts
    (the library's batched matmul with an inner dimension of 3 is many times slower on CPU)."""
    lin = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1  # pixel centres in [-1, 1]
    u, v = lin.view(1, 1, size), lin.view(1, size, 1)
    t = theta.view(-1, 6, 1, 1)
    gx = t[:, 0] * u + t[:, 1] * v + t[:, 2]
    gy = t[:, 3] * u + t[:, 4] * v + t[:, 5]
    return torch.stack([gx, gy], dim=-1)


def finish_bitmap(grey: torch.Tensor, pen: np.ndarray, threshold: np.ndarray | float = 127.5) -> np.ndarray:
    """(N, 1, 32, 32) float ink in 0..255 -> (N, 8, 8) uint8 digits-style counts.

    Image i is thickened by a ``pen[i] x pen[i]`` max filter (1 = unchanged), binarised as
    ``ink > threshold[i]`` (the 32x32 NIST bitmap), and its on-pixels are counted in 4x4 blocks.
    """
    out = grey
    for k in np.unique(pen):
        if k <= 1:
            continue
        if out is grey:
            out = grey.clone()
        idx = torch.from_numpy(np.flatnonzero(pen == k))
        out[idx] = F.max_pool2d(grey[idx], kernel_size=int(k), stride=1, padding=int(k) // 2)
    thr = torch.as_tensor(np.broadcast_to(np.asarray(threshold, dtype=np.float32), (len(out),)).copy()).view(-1, 1, 1, 1)
    bitmap = (out > thr).to(torch.float32)
    return (F.avg_pool2d(bitmap, 4) * 16).round_()[:, 0].to(torch.uint8).numpy()


# ----- fonts and glyphs ------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def font_dir() -> str:
    """matplotlib's bundled TrueType fonts (DejaVu, STIX, Computer Modern), found without importing matplotlib."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("matplotlib is not installed; its fonts are needed for the built-in letter sets")
    return os.path.join(os.path.dirname(spec.origin), "mpl-data", "fonts", "ttf")


@lru_cache(maxsize=None)
def _font(filename: str) -> ImageFont.FreeTypeFont:
    path = os.path.join(font_dir(), filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"font {filename} not found in {font_dir()} (it ships with matplotlib)")
    return ImageFont.truetype(path, _FONT_PX)


def _draw(filename: str, char: str) -> np.ndarray | None:
    font = _font(filename)
    left, top, right, bottom = font.getbbox(char)
    pad = 4
    img = Image.new("L", (max(right - left, 1) + 2 * pad, max(bottom - top, 1) + 2 * pad), 0)
    ImageDraw.Draw(img).text((pad - left, pad - top), char, font=font, fill=255)
    box = img.getbbox()
    return None if box is None else np.asarray(img.crop(box))


@lru_cache(maxsize=None)
def _notdef(filename: str) -> bytes | None:
    # U+FFFF is a non-character: every font draws its "missing glyph" (.notdef) for it.
    arr = _draw(filename, "\uffff")
    return None if arr is None else arr.tobytes() + bytes(arr.shape)


def has_glyph(filename: str, char: str) -> bool:
    """Whether the font draws ``char`` as a real glyph (not empty, not its .notdef box)."""
    try:
        arr = glyph(filename, char)
    except ValueError:
        return False
    return arr.tobytes() + bytes(arr.shape) != _notdef(filename)


@lru_cache(maxsize=None)
def glyph(filename: str, char: str) -> np.ndarray:
    """The glyph of ``char`` in a font, rendered once at 64 px and cropped to its ink (uint8, ink = 255)."""
    arr = _draw(filename, char)
    if arr is None:
        raise ValueError(f"font {filename} renders {char!r} (U+{ord(char):04X}) as an empty glyph")
    arr.setflags(write=False)
    return arr


def _glyph_bank(keys: list[tuple[str, str]]) -> tuple[torch.Tensor, np.ndarray]:
    """The distinct glyphs centred in one (G, 1, H, W) uint8 tensor, and their ink sizes (G, 2) = (h, w)."""
    glyphs = [glyph(f, c) for f, c in keys]
    h = max(g.shape[0] for g in glyphs) + 2
    w = max(g.shape[1] for g in glyphs) + 2
    h, w = h + h % 2, w + w % 2
    bank = np.zeros((len(glyphs), 1, h, w), dtype=np.uint8)
    for i, g in enumerate(glyphs):
        top, left = (h - g.shape[0]) // 2, (w - g.shape[1]) // 2
        bank[i, 0, top:top + g.shape[0], left:left + g.shape[1]] = g
    return torch.from_numpy(bank), np.array([g.shape for g in glyphs], dtype=np.float64)


def affine_thetas(bank_shape: tuple[int, ...], sx: np.ndarray, sy: np.ndarray, angle: np.ndarray, shear: np.ndarray,
                  shift: np.ndarray, size: int) -> torch.Tensor:
    """``grid_sample`` matrices (N, 2, 3) that draw a bank glyph onto a ``size`` x ``size`` grid.

    The forward map, in pixels about the centres, is ``out = R(angle) @ Shear @ diag(sx, sy) @ in + shift``.
    """
    n = len(angle)
    c, si = np.cos(angle), np.sin(angle)
    rot = np.stack([np.stack([c, -si], -1), np.stack([si, c], -1)], -2)
    shr = np.zeros((n, 2, 2))
    shr[:, 0, 0] = shr[:, 1, 1] = 1.0
    shr[:, 0, 1] = shear
    scale = np.zeros((n, 2, 2))
    scale[:, 0, 0], scale[:, 1, 1] = sx, sy
    inv = np.linalg.inv(rot @ shr @ scale)
    # grid_sample works in [-1, 1] coordinates: in_norm = D_in @ inv @ (D_out @ out_norm - shift)
    bank_h, bank_w = bank_shape[2], bank_shape[3]
    d_in = np.diag([2.0 / bank_w, 2.0 / bank_h])
    d_out = np.diag([size / 2.0, size / 2.0])
    return torch.from_numpy(np.concatenate([d_in @ inv @ d_out, -(d_in @ inv @ shift[:, :, None])], axis=2)).to(torch.float32)


def warp_glyphs(bank: torch.Tensor, index: np.ndarray, theta: torch.Tensor, size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(lo, hi, grey)``: samples ``lo:hi`` drawn bilinearly, (hi - lo, 1, size, size) float ink in 0..255."""
    n = len(index)
    with _one_torch_thread():
        for lo in range(0, n, 1024):  # bounded memory: 1024 gathered glyphs at a time
            hi = min(lo + 1024, n)
            src = bank[torch.from_numpy(index[lo:hi])].to(torch.float32)
            yield lo, hi, F.grid_sample(src, _affine_grid(theta[lo:hi], size), mode="bilinear", padding_mode="zeros",
                                        align_corners=False)


def render_glyphs(fonts: list[str], chars: list[str], rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw ``chars[i]`` in ``fonts[i]`` with random affine and stroke jitter, digits-style.

    Like the NIST normalisation, the glyph's height is scaled to (most of) the bitmap height, its
    aspect ratio kept (wide glyphs are limited by the width), and it is centred. Jitter per sample:
    height fraction U(0.86, 1.0) (the UCI digits span all 8 rows), aspect x exp(N(-0.08, 0.08)),
    rotation U(-12, 12) degrees, shear U(-0.2, 0.2), shift U(-1, 1) bitmap pixel; stroke width by the
    binarisation threshold U(64, 192) of 255 and, for 40% of the samples, a 3x3 dilation.

    The warp is one batched bilinear ``grid_sample`` over a bank of the distinct glyphs, each rendered
    once. Returns (N, 8, 8) uint8 block counts and the jitter parameters per sample.
    """
    n = len(chars)
    height = rng.uniform(0.86, 1.0, n)
    aspect = np.exp(rng.normal(-0.08, 0.08, n))
    angle = np.deg2rad(rng.uniform(-12.0, 12.0, n))
    shear = rng.uniform(-0.2, 0.2, n)
    shift = rng.uniform(-1.0, 1.0, (n, 2))
    pen = np.where(rng.random(n) < 0.4, 3, 1)
    threshold = rng.uniform(64.0, 192.0, n)
    keys = sorted(set(zip(fonts, chars)))
    where = {k: i for i, k in enumerate(keys)}
    index = np.array([where[k] for k in zip(fonts, chars)], dtype=np.int64)
    bank, sizes = _glyph_bank(keys)
    gh, gw = sizes[index, 0], sizes[index, 1]
    s = height * BITMAP / gh
    sx, sy = s * aspect, s
    fit = np.minimum(1.0, 0.94 * BITMAP / (gw * sx))  # wide glyphs (M, W, %) fit the box width instead
    sx, sy = sx * fit, sy * fit
    theta = affine_thetas(bank.shape, sx, sy, angle, shear, shift, BITMAP)
    counts = np.empty((n, 8, 8), dtype=np.uint8)
    for lo, hi, grey in warp_glyphs(bank, index, theta, BITMAP):
        counts[lo:hi] = finish_bitmap(grey, pen[lo:hi], threshold[lo:hi])
    params = {"height": height, "aspect": aspect, "angle_deg": np.rad2deg(angle), "shear": shear,
              "shift_x": shift[:, 0], "shift_y": shift[:, 1], "pen": pen, "threshold": threshold}
    return counts, params


def render_grey_glyphs(fonts: list[str], chars: list[str], rng: np.random.Generator,
                       size: int = 28) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Draw ``chars[i]`` in ``fonts[i]`` as anti-aliased grey ``size`` x ``size`` images, notMNIST-style.

    notMNIST (Bulatov, 2011) shows glyphs scaled to fill most of a 28x28 box, grey-level, centred. Jitter
    per sample: the glyph's longer side U(0.78, 0.95) of the box, aspect x exp(N(0, 0.06)), rotation
    U(-8, 8) degrees, shift U(-1.5, 1.5) pixels. Returns (N, size, size) float32 in [0, 1] and the jitter.
    """
    n = len(chars)
    fill = rng.uniform(0.78, 0.95, n)
    aspect = np.exp(rng.normal(0.0, 0.06, n))
    angle = np.deg2rad(rng.uniform(-8.0, 8.0, n))
    shift = rng.uniform(-1.5, 1.5, (n, 2))
    keys = sorted(set(zip(fonts, chars)))
    where = {k: i for i, k in enumerate(keys)}
    index = np.array([where[k] for k in zip(fonts, chars)], dtype=np.int64)
    bank, sizes = _glyph_bank(keys)
    gh, gw = sizes[index, 0], sizes[index, 1]
    s = fill * size / np.maximum(gh, gw * aspect)
    theta = affine_thetas(bank.shape, s * aspect, s, angle, np.zeros(n), shift, size)
    out = np.empty((n, size, size), dtype=np.float32)
    for lo, hi, ink in warp_glyphs(bank, index, theta, size):
        out[lo:hi] = (ink[:, 0] / 255.0).clamp_(0.0, 1.0).numpy()
    return out, {"fill": fill, "aspect": aspect, "angle_deg": np.rad2deg(angle), "shift_x": shift[:, 0], "shift_y": shift[:, 1]}


# ----- photographs -----------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def photo_grey(name: str) -> Image.Image:
    """One of scikit-learn's sample photographs (``china.jpg``, ``flower.jpg``) as a grey Pillow image."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name)).convert("L")


def otsu_threshold(hist: np.ndarray) -> np.ndarray:
    """Otsu's threshold (Otsu, IEEE Trans. SMC 1979) per row of (N, 256) grey-level histograms.

    Maximises the between-class variance w0 w1 (mu0 - mu1)^2 over thresholds t (class 0: values <= t).
    """
    levels = np.arange(hist.shape[1], dtype=np.float64)
    p = hist / np.maximum(hist.sum(axis=1, keepdims=True), 1)
    w0 = np.cumsum(p, axis=1)
    m0 = np.cumsum(p * levels, axis=1)
    mt = m0[:, -1:]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return between.argmax(axis=1)


def photo_crops(name: str, n: int, rng: np.random.Generator, size: int, min_side: int,
                max_side: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Random square crops (side ``min_side..max_side`` px) of a sample photograph, area-resized to
    ``size`` x ``size`` grey. Returns (N, size, size) uint8 and the boxes (``x``, ``y``, ``side``)."""
    img = photo_grey(name)
    width, height = img.size
    side = rng.integers(min_side, max_side + 1, n)
    x0 = (rng.random(n) * (width - side + 1)).astype(np.int64)
    y0 = (rng.random(n) * (height - side + 1)).astype(np.int64)
    grey = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        box = (int(x0[i]), int(y0[i]), int(x0[i] + side[i]), int(y0[i] + side[i]))
        grey[i] = np.asarray(img.resize((size, size), Image.Resampling.BOX, box=box))
    return grey, {"x": x0, "y": y0, "side": side}


def photo_patches(name: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Square patches (side 24..160 px) of a sample photograph, digits-style.

    Each patch is area-resized to the 32x32 bitmap, binarised with its own Otsu threshold (the darker
    class is "ink", as pen on paper), then counted in 4x4 blocks. Returns (N, 8, 8) uint8 and the boxes.
    """
    grey, boxes = photo_crops(name, n, rng, BITMAP, 24, 160)
    flat = grey.reshape(n, -1).astype(np.int64) + 256 * np.arange(n)[:, None]
    hist = np.bincount(flat.reshape(-1), minlength=256 * n).reshape(n, 256)
    t = otsu_threshold(hist)
    bitmaps = grey <= t[:, None, None]
    return block_counts(bitmaps), {**boxes, "threshold": t}


# ----- synthetic structure -----------------------------------------------------------------------------

def scribbles(n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Random pen scribbles: 2-4 quadratic Bezier strokes drawn with a square pen 3 or 5 bitmap pixels wide."""
    strokes = rng.integers(2, 5, n)
    ctrl = rng.uniform(2, BITMAP - 2, (n, 4, 3, 2))
    pen = rng.choice(np.array([3, 5]), n)
    t = np.linspace(0.0, 1.0, 64)[:, None]
    p0, p1, p2 = ctrl[:, :, 0, None], ctrl[:, :, 1, None], ctrl[:, :, 2, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2  # (n, 4, 64, 2)
    xy = np.clip(curve, 0, BITMAP - 1).astype(np.int64)
    active = np.broadcast_to((np.arange(4)[None, :] < strokes[:, None])[:, :, None], xy.shape[:3])
    sample = np.broadcast_to(np.arange(n)[:, None, None], xy.shape[:3])
    grey = torch.zeros((n, 1, BITMAP, BITMAP), dtype=torch.float32)
    grey[torch.from_numpy(sample[active]), 0, torch.from_numpy(xy[..., 1][active]), torch.from_numpy(xy[..., 0][active])] = 255.0
    with _one_torch_thread():
        counts = finish_bitmap(grey, pen)  # centre lines, thickened by the pen
    return counts, {"strokes": strokes, "pen": pen}


def blobs(n: int, size: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
    """Outlier Exposure's "Blobs" (Hendrycks et al., ICLR 2019): Bernoulli(0.7) pixels, Gaussian blur
    sigma = 1.5, values below 0.75 set to 0. Returns (N, channels, size, size) float in [0, 1]."""
    from scipy import ndimage

    field = rng.binomial(1, 0.7, (n, channels, size, size)).astype(np.float64)
    field = ndimage.gaussian_filter(field, sigma=(0, 0, 1.5, 1.5))
    field[field < 0.75] = 0.0
    return field

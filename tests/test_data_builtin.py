"""The built-in offline benchmark sets (ebood.data.builtin): determinism, the digits grid, splits, provenance."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ebood.data import builtin as B
from ebood.data import _render as R
from ebood.data import builtin_benchmark, open_dataset


@pytest.fixture(scope="module")
def bench() -> B.BuiltinBenchmark:
    return builtin_benchmark(0)


def _all_sets(b: B.BuiltinBenchmark) -> dict:
    return {"train": b.train, "val": b.val, "test": b.test, **b.ood, **b.covariate,
            **{f"openset-{k}": v for k, v in b.open_set.items()}, "outliers": b.auxiliary}


def _fresh(fn, *args):
    """Call a cached generator without its process cache (the real computation, not a memo)."""
    return fn.__wrapped__(*args)


# ----- shape, grid, protocol ------------------------------------------------------------------------

def test_every_set_is_on_the_digits_grid(bench):
    for name, ds in _all_sets(bench).items():
        x = ds.inputs
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8), name
        k = x.numpy() * 16
        assert np.array_equal(k, np.round(k)), f"{name}: values are not multiples of 1/16"
        assert k.min() >= 0 and k.max() <= 16, name
        assert len(ds) > 0 and isinstance(ds.fingerprint, str) and ds.fingerprint


def test_ood_sets_have_the_promised_sizes_and_groups(bench):
    assert set(bench.ood) == {"letters", "photos", "gaussian", "uniform", "rademacher", "blobs"}
    assert bench.groups == {"letters": "near", "photos": "far", "gaussian": "far", "uniform": "far",
                            "rademacher": "far", "blobs": "far"}
    for name, ds in bench.ood.items():
        assert 500 <= len(ds) <= 2000, name
        assert (ds.labels == -1).all(), name
        assert ds.group == bench.groups[name]
    assert set(bench.ood_sets("near")) == {"letters"}
    assert bench.covariate["font-digits"].group == "covariate"


def test_items_are_tensor_int_pairs_and_batch(bench):
    x, y = bench.test[3]
    assert isinstance(y, int) and y == int(bench.test.labels[3])
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    xb, yb = next(iter(DataLoader(bench.ood["letters"], batch_size=16)))
    assert xb.shape == (16, 1, 8, 8) and (yb == -1).all()


def test_fingerprints_are_distinct_and_track_seed(bench):
    fps = [ds.fingerprint for ds in _all_sets(bench).values()]
    assert len(set(fps)) == len(fps)
    assert B.letters(1).fingerprint != bench.ood["letters"].fingerprint


def test_digit_splits_are_the_sklearn_digits_divided_by_16(bench):
    from sklearn.datasets import load_digits

    digits = load_digits()
    for ds in (bench.train, bench.val, bench.test):
        idx = ds.meta["index"]
        np.testing.assert_array_equal(ds.inputs[:, 0].numpy(), (digits.images[idx] / 16.0).astype(np.float32))
        np.testing.assert_array_equal(ds.labels.numpy(), digits.target[idx])


def test_split_is_a_stratified_partition(bench):
    from sklearn.datasets import load_digits

    target = load_digits().target
    parts = [bench.train.meta["index"], bench.val.meta["index"], bench.test.meta["index"]]
    joined = np.concatenate(parts)
    assert len(joined) == len(target) == len(np.unique(joined))  # disjoint and complete
    for part, frac in zip(parts, B.SPLIT_FRACTIONS):
        assert abs(len(part) / len(target) - frac) < 0.01
        for c in range(10):
            n_c = (target == c).sum()
            assert abs((target[part] == c).sum() - frac * n_c) <= 1.5, (frac, c)


# ----- determinism -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fn,args", [
    (B.letters, ()), (B.photos, ()), (B.font_digits, ()), (B.auxiliary_outliers, ()), (B.noise, ("blobs",)),
    (B.noise, ("gaussian",)),
])
def test_same_seed_same_tensors_other_seed_differs(fn, args):
    a = _fresh(fn, *args, 0, 300)
    b = _fresh(fn, *args, 0, 300)
    c = _fresh(fn, *args, 1, 300)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert a.fingerprint == b.fingerprint
    assert not torch.equal(a.inputs, c.inputs)
    assert a.fingerprint != c.fingerprint


def test_split_depends_on_seed():
    a, b = _fresh(B.digits_splits, 0), _fresh(B.digits_splits, 1)
    assert not np.array_equal(a["test"].meta["index"], b["test"].meta["index"])
    assert np.array_equal(a["test"].meta["index"], _fresh(B.digits_splits, 0)["test"].meta["index"])


# ----- the preprocessing -----------------------------------------------------------------------------

def test_block_counts_against_a_loop():
    rng = np.random.default_rng(3)
    bitmaps = rng.random((5, 32, 32)) < 0.4
    out = R.block_counts(bitmaps)
    ref = np.zeros((5, 8, 8), dtype=np.int64)
    for n in range(5):
        for i in range(8):
            for j in range(8):
                ref[n, i, j] = bitmaps[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4].sum()
    np.testing.assert_array_equal(out, ref)


def test_finish_bitmap_thresholds_then_counts_blocks():
    rng = np.random.default_rng(4)
    grey = rng.integers(0, 256, (3, 32, 32)).astype(np.float64)
    thr = np.array([50.0, 127.5, 200.0])
    out = R.finish_bitmap(torch.from_numpy(grey[:, None]).float(), np.ones(3, dtype=np.int64), thr)
    ref = (grey > thr[:, None, None]).reshape(3, 8, 4, 8, 4).sum(axis=(2, 4))
    np.testing.assert_array_equal(out, ref)


def test_pen_is_a_square_max_filter():
    from scipy import ndimage

    grey = np.zeros((2, 32, 32))
    grey[:, 8:24, 15] = 255.0  # a vertical hairline, one pixel wide
    out = R.finish_bitmap(torch.from_numpy(grey[:, None]).float(), np.array([1, 3]))
    np.testing.assert_array_equal(out[0].sum(), 16)
    dilated = ndimage.maximum_filter(grey[1], size=3, mode="constant")
    ref = (dilated > 127.5).reshape(8, 4, 8, 4).sum(axis=(1, 3))
    np.testing.assert_array_equal(out[1], ref)
    assert out[1].sum() == 18 * 3


def test_affine_grid_matches_torch():
    theta = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(0))
    ref = F.affine_grid(theta, [6, 1, 64, 64], align_corners=False)
    torch.testing.assert_close(R._affine_grid(theta, 64), ref, atol=1e-5, rtol=0)


def test_otsu_matches_brute_force_between_class_variance():
    rng = np.random.default_rng(5)
    hist = rng.integers(0, 50, (4, 256)).astype(np.float64)
    hist[1, :100] = 0  # a gap at the low end
    got = R.otsu_threshold(hist)
    for h, t in zip(hist, got):
        best, arg = -1.0, None
        levels = np.arange(256.0)
        for k in range(255):
            lo, hi = h[:k + 1], h[k + 1:]
            if lo.sum() == 0 or hi.sum() == 0:
                continue
            w0, w1 = lo.sum() / h.sum(), hi.sum() / h.sum()
            m0 = (lo * levels[:k + 1]).sum() / lo.sum()
            m1 = (hi * levels[k + 1:]).sum() / hi.sum()
            var = w0 * w1 * (m0 - m1) ** 2
            if var > best + 1e-9:
                best, arg = var, k
        assert t == arg


def test_rendered_letters_look_like_digits_statistically(bench):
    """Ink coverage of rendered letters and font digits is in the range of the real digits (within 25%)."""
    real = bench.train.inputs.mean().item()
    for ds in (bench.ood["letters"], bench.covariate["font-digits"]):
        assert abs(ds.inputs.mean().item() - real) < 0.25 * real
        rows_used = (ds.inputs[:, 0].sum(dim=2) > 0).float().sum(dim=1).mean().item()
        assert rows_used > 7.0  # like the UCI digits, glyphs are size-normalised to the full height


# ----- content and provenance ------------------------------------------------------------------------

def test_letters_leave_out_digit_like_letters(bench):
    chars = set(bench.ood["letters"].meta["char"])
    assert chars <= set(B.NEAR_LETTERS)
    assert not chars & set(B.EXCLUDED_LETTERS)
    assert {"O", "I", "S", "Z", "B", "G"} <= set(B.EXCLUDED_LETTERS)
    assert len(chars) == len(B.NEAR_LETTERS)  # 1000 draws hit all 17 letters
    assert set(bench.ood["letters"].meta["font"]) <= set(B.TEST_FONTS)


def test_font_digits_are_labelled_with_their_glyph(bench):
    fd = bench.covariate["font-digits"]
    assert [str(v) for v in fd.labels.tolist()] == list(fd.meta["char"])
    assert np.bincount(fd.labels.numpy(), minlength=10).min() == len(fd) // 10


def test_auxiliary_outliers_share_no_source_with_any_test_set(bench):
    aux = bench.auxiliary
    src = aux.meta["source"]
    assert set(src) == {"glyph", "photo", "scribble"}
    assert not set(src) & set(B.NOISE_KINDS)
    test_fonts = set(bench.ood["letters"].meta["font"]) | set(bench.covariate["font-digits"].meta["font"])
    test_chars = set(bench.ood["letters"].meta["char"]) | set(bench.covariate["font-digits"].meta["char"])
    glyph = src == "glyph"
    aux_fonts, aux_chars = set(aux.meta["font"][glyph]), set(aux.meta["char"][glyph])
    assert aux_fonts and not aux_fonts & test_fonts
    assert aux_chars and not aux_chars & test_chars
    for ch in aux_chars:  # no upper-case Latin letter, no digit at all
        assert not ("A" <= ch <= "Z") and unicodedata.category(ch) != "Nd", ch
    assert set(aux.meta["photo"][src == "photo"]) == {B.AUXILIARY_PHOTO}
    assert set(bench.ood["photos"].meta["photo"]) == {B.TEST_PHOTO} != {B.AUXILIARY_PHOTO}
    assert len(aux_chars) > 30 and len(aux_fonts) == len(B.AUXILIARY_FONTS)
    assert "flower.jpg" in B.AUXILIARY_DESCRIPTION and "STIX" in B.AUXILIARY_DESCRIPTION


def test_glyph_detection_agrees_with_the_font_charmap():
    """has_glyph (render and compare with the .notdef box) against FreeType's character map via matplotlib."""
    import os

    from matplotlib import ft2font

    for font in B.AUXILIARY_FONTS + B.TEST_FONTS[:2]:
        cmap = ft2font.FT2Font(os.path.join(R.font_dir(), font)).get_charmap()
        for ch in B.AUXILIARY_GLYPHS + B.NEAR_LETTERS:
            assert R.has_glyph(font, ch) == (ord(ch) in cmap), (font, ch)
    assert not R.has_glyph("cmr10.ttf", "\u03c8")  # Computer Modern has no Greek code points


def test_open_set_split_labels(bench):
    os_ = bench.open_set
    for split, full in (("train", bench.train), ("val", bench.val), ("test", bench.test)):
        lab = os_[split].labels
        assert lab.min() >= 0 and lab.max() <= 5
        assert len(lab) == int((full.labels < 6).sum())
    ood = os_["ood"]
    assert (ood.labels == -1).all()
    assert set(ood.meta["digit"].tolist()) == {6, 7, 8, 9}
    assert len(ood) == int((bench.test.labels >= 6).sum())
    # the OOD images are exactly the test digits 6-9
    torch.testing.assert_close(ood.inputs, bench.test.inputs[bench.test.labels >= 6])


def test_a_digits_classifier_is_less_confident_off_distribution(bench):
    """Sanity: logistic regression on the digits is more confident on digit test images than on any OOD set,
    and the font digits (covariate shift) are still mostly recognised."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    flat = lambda ds: ds.inputs.reshape(len(ds), -1).numpy()  # noqa: E731
    with threadpool_limits(1):  # multi-threaded BLAS on a tiny problem is 50x slower on a shared machine
        clf = LogisticRegression(max_iter=2000).fit(flat(bench.train), bench.train.labels.numpy())
    conf = lambda ds: clf.predict_proba(flat(ds)).max(axis=1).mean()  # noqa: E731
    id_conf = conf(bench.test)
    assert clf.score(flat(bench.test), bench.test.labels.numpy()) > 0.9
    for name, ds in bench.ood.items():
        assert conf(ds) < id_conf - 0.1, name
    fd = bench.covariate["font-digits"]
    assert 0.3 < clf.score(flat(fd), fd.labels.numpy()) < 0.95


# ----- open_dataset("builtin:...") -------------------------------------------------------------------

def test_open_dataset_builtin_names(bench):
    assert open_dataset("builtin:digits-train") is bench.train
    assert open_dataset("builtin:letters") is bench.ood["letters"]
    assert open_dataset("builtin:outliers") is bench.auxiliary
    assert open_dataset("builtin:openset-ood") is bench.open_set["ood"]
    assert open_dataset("builtin:font_digits") is bench.covariate["font-digits"]
    with pytest.raises(ValueError, match="available: .*letters"):
        open_dataset("builtin:notmnist")


def test_builtin_noise_at_a_cifar_shape_is_drawn_natively_and_normalised():
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.1]
    ds = open_dataset("builtin:uniform", image_size=32, mean=mean, std=std)
    x = ds.inputs
    assert x.shape == (1000, 3, 32, 32)
    raw = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    k = raw.double() * 255
    assert (k - k.round()).abs().max() < 1e-3 and raw.min() > -1e-5 and raw.max() < 1 + 1e-5
    assert abs(raw.mean().item() - 0.5) < 0.01  # U(0, 1)
    assert ds.fingerprint != open_dataset("builtin:uniform").fingerprint


def test_builtin_image_set_upsampled_to_rgb(bench):
    ds = open_dataset("builtin:letters", image_size=16, channels=3)
    assert ds.inputs.shape == (1000, 3, 16, 16)
    torch.testing.assert_close(ds.inputs[:, 0], ds.inputs[:, 2])
    ref = F.interpolate(bench.ood["letters"].inputs, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(ds.inputs[:, :1], ref)

"""The sets of the Fashion-MNIST benchmark (ebood.data.fashion_bench), checked against independent references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from ebood.data import fashion_bench as fb
from ebood.data.builtin import AUXILIARY_FONTS, TEST_FONTS

HAVE_DATA = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Debian's dataset-fashion-mnist is not installed "
                                "(apt-get install dataset-fashion-mnist)")


def test_mnist_preprocessing_box_and_centre_of_mass():
    from sklearn.datasets import load_digits

    digits = load_digits().images[:200] / 16.0
    out = fb.mnist_preprocess(digits)
    assert out.shape == (200, 28, 28) and out.min() >= 0 and out.max() <= 1
    for img in out:
        rows, cols = np.flatnonzero(img.any(axis=1)), np.flatnonzero(img.any(axis=0))
        extent = (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
        assert max(extent) == 20  # the longer side fills the 20x20 box
        cy, cx = ndimage.center_of_mass(img)
        assert abs(cy - 13.5) <= 0.5 + 1e-9 and abs(cx - 13.5) <= 0.5 + 1e-9  # rounded to whole pixels


def test_mnist_like_digits_are_the_sklearn_digits():
    ds = fb.mnist_like_digits(0)
    assert len(ds) == 1797 and ds.inputs.shape[1:] == (1, 28, 28)
    assert bool((ds.labels == -1).all()) and np.bincount(ds.meta["digit"]).min() >= 170


def test_corruptions_grow_with_severity():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 6:22, 10:18] = 1.0  # an upright bar
    for kind in fb.CORRUPTIONS:
        dist = [float((fb.corrupt(x.clone(), kind, s, np.random.default_rng(0)) - x).abs().mean()) for s in (1, 2, 3)]
        assert 0 < dist[0] < dist[1] < dist[2], (kind, dist)
    rotated = fb.corrupt(x.clone(), "rotate", 3, np.random.default_rng(0))  # 60 degrees: compare with scipy's rotation
    errors = [np.abs(rotated[0, 0].numpy() - ndimage.rotate(x[0, 0].numpy(), a, reshape=False, order=1)).mean() for a in (60, -60)]
    assert min(errors) < 0.03 < max(errors), errors


def test_auxiliary_outliers_are_disjoint_by_construction():
    aux = fb.auxiliary_outliers(0)
    assert len(aux) == fb.AUXILIARY_SIZE and aux.inputs.min() >= 0 and aux.inputs.max() <= 1
    sources, counts = np.unique(aux.meta["source"], return_counts=True)
    assert dict(zip(sources, counts)) == {"glyph": 4000, "photo": 2000, "blobs": 2000}
    chars = {c for _, c in fb.auxiliary_glyph_pairs()}
    fonts = {f for f, _ in fb.auxiliary_glyph_pairs()}
    assert not chars & set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") and fonts <= set(AUXILIARY_FONTS)
    assert not fonts & set(TEST_FONTS)
    assert "flower.jpg" in fb.AUXILIARY_DESCRIPTION and "china.jpg" in fb.photos(0).description


def test_generated_sets_are_deterministic():
    a = fb.notmnist_like_letters.__wrapped__(3, 50)
    b = fb.notmnist_like_letters.__wrapped__(3, 50)
    c = fb.notmnist_like_letters.__wrapped__(4, 50)
    assert torch.equal(a.inputs, b.inputs) and a.fingerprint == b.fingerprint and not torch.equal(a.inputs, c.inputs)
    assert set(a.meta["char"]) <= set("ABCDEFGHIJ")


@needs_data
def test_splits_are_stratified_and_disjoint():
    s = fb.fashion_splits(0)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (54_000, 6_000, 10_000)
    np.testing.assert_array_equal(np.bincount(s["val"].labels.numpy()), np.full(10, 600))
    train_idx, val_idx = s["train"].meta["index"], s["val"].meta["index"]
    assert not set(train_idx) & set(val_idx) and len(set(train_idx) | set(val_idx)) == 60_000
    assert s["train"].inputs.dtype == torch.float32 and float(s["train"].inputs.max()) == 1.0


@needs_data
def test_open_set_and_covariate_sets():
    bm = fb.fashion_mnist_benchmark(0)
    known = fb.KNOWN_CLASSES
    assert int(bm.open_set["train"].labels.max()) == known - 1 and len(bm.open_set["ood"]) == 4000
    assert set(bm.open_set["ood"].meta["class"]) == set(range(known, 10))
    same = [bm.covariate[f"corrupt-{s}"].meta["index"] for s in (1, 2, 3)]
    np.testing.assert_array_equal(same[0], same[2])  # the same test images at every severity
    shift = bm.covariate["corrupt-1"]
    np.testing.assert_array_equal(shift.labels.numpy(), bm.test.labels.numpy()[shift.meta["index"]])
    assert bm.groups == {"mnist-like": "near", "notmnist-like": "near", "photos": "far", "gaussian": "far",
                         "uniform": "far", "rademacher": "far"}


def test_array_dataset_batches_are_slices_equal_to_per_sample_collation():
    from torch.utils.data import DataLoader, TensorDataset

    from ebood.data.datasets import ArrayDataset
    from ebood.extraction import as_loader

    x, y = torch.rand(70, 1, 5, 5), torch.arange(70) % 7
    fast = list(as_loader(ArrayDataset(x, y, name="a"), 32))
    slow = list(DataLoader(TensorDataset(x, y), batch_size=32))
    assert [len(b[0]) for b in fast] == [32, 32, 6]
    for (xf, yf), (xs, ys) in zip(fast, slow):
        assert torch.equal(xf, xs) and torch.equal(yf, ys) and yf.dtype == ys.dtype
    assert ArrayDataset(x, y, name="a")[3][1] == 3  # a single index still gives (input, int label)

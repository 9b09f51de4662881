"""Loaders for the official dataset formats (ebood.data.formats), on tiny files written here in each format."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ebood.data import DatasetFormatError, DatasetNotFoundError, open_dataset
from ebood.data.transforms import ImageTransform, center_crop, resize_shorter

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch):
    """Loading must never unpickle."""
    def boom(*a, **k):
        raise AssertionError("a loader unpickled something")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)


# ----- writers for the official formats (independent of the code under test) -----------------------

def _cifar_records(n: int, label_bytes: int, label_max: list[int]):
    labels = np.stack([RNG.integers(0, m, n) for m in label_max], axis=1).astype(np.uint8)
    images = RNG.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # (row, col, RGB), as a viewer sees it
    raw = b""
    for i in range(n):
        # record: label byte(s), then the red plane, green plane, blue plane, each row by row
        raw += bytes(labels[i]) + b"".join(images[i, :, :, c].tobytes() for c in range(3))
    assert len(raw) == n * (label_bytes + 3072)
    return raw, labels, images


def _expected(images_hwc: np.ndarray) -> np.ndarray:
    return images_hwc.transpose(0, 3, 1, 2).astype(np.float64) / 255.0


def _stack(ds) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs).double().numpy(), np.array(ys)


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


@pytest.fixture
def cifar10_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    parts = []
    for i in range(1, 6):
        raw, labels, images = _cifar_records(3, 1, [10])
        (folder / f"data_batch_{i}.bin").write_bytes(raw)
        parts.append((labels, images))
    raw, labels, images = _cifar_records(4, 1, [10])
    (folder / "test_batch.bin").write_bytes(raw)
    return tmp_path, parts, (labels, images)


# ----- CIFAR --------------------------------------------------------------------------------------

def test_cifar10_binary_reads_pixels_and_labels_exactly(cifar10_root):
    root, train_parts, (test_labels, test_images) = cifar10_root
    test = open_dataset("cifar10:test", root=root)
    x, y = _stack(test)
    np.testing.assert_array_equal(y, test_labels[:, 0])
    np.testing.assert_allclose(x, _expected(test_images), atol=1e-7)
    train = open_dataset("cifar10:train", root=root)
    x, y = _stack(train)
    assert len(train) == 15  # batches 1..5 in order
    np.testing.assert_array_equal(y, np.concatenate([p[0][:, 0] for p in train_parts]))
    np.testing.assert_allclose(x, _expected(np.concatenate([p[1] for p in train_parts])), atol=1e-7)
    assert isinstance(test[0][1], int) and test[0][0].dtype == torch.float32


def test_cifar_normalisation_matches_the_formula(cifar10_root):
    root, _, (_, images) = cifar10_root
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    x, _ = _stack(open_dataset("cifar10:test", root=root, mean=mean, std=std))
    ref = (_expected(images) - np.array(mean)[None, :, None, None]) / np.array(std)[None, :, None, None]
    np.testing.assert_allclose(x, ref, atol=1e-5)


def test_cifar100_binary_fine_and_coarse_labels(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    raw, labels, images = _cifar_records(5, 2, [20, 100])
    (folder / "test.bin").write_bytes(raw)
    ds = open_dataset("cifar100:test", root=tmp_path)
    x, y = _stack(ds)
    np.testing.assert_array_equal(y, labels[:, 1])
    np.testing.assert_array_equal(ds.meta["coarse_label"], labels[:, 0])
    np.testing.assert_allclose(x, _expected(images), atol=1e-7)


def test_cifar_truncated_file_is_a_clear_error(cifar10_root):
    root = cifar10_root[0]
    path = root / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetFormatError, match=r"test_batch\.bin: truncated .*3073-byte record"):
        open_dataset("cifar10:test", root=root)


def test_cifar_bad_label_is_a_clear_error(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    raw, _, _ = _cifar_records(2, 2, [20, 100])
    raw = bytes([0, 150]) + raw[2:]  # fine label 150 does not exist
    (folder / "train.bin").write_bytes(raw)
    with pytest.raises(DatasetFormatError, match="label 150"):
        open_dataset("cifar100:train", root=tmp_path)


def test_cifar_missing_lists_the_expected_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        open_dataset("cifar10:train", root=tmp_path)
    msg = str(err.value)
    for i in range(1, 6):
        assert str(tmp_path / "cifar-10-batches-bin" / f"data_batch_{i}.bin") in msg
    assert "binary version" in msg and "\n" not in msg
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-binary/test\.bin"):
        open_dataset("cifar100:test", root=tmp_path)


# ----- SVHN ---------------------------------------------------------------------------------------

def test_svhn_mat_reads_pixels_and_maps_label_10_to_0(tmp_path):
    from scipy.io import savemat

    n = 6
    X = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array([[10], [1], [2], [9], [10], [5]], dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": X, "y": y})
    x, labels = _stack(open_dataset("svhn:test", root=tmp_path))
    np.testing.assert_array_equal(labels, [0, 1, 2, 9, 0, 5])
    for k in range(n):
        for c in range(3):
            np.testing.assert_allclose(x[k, c], X[:, :, c, k] / 255.0, atol=1e-7)


def test_svhn_truncated_and_missing(tmp_path):
    from scipy.io import savemat

    path = tmp_path / "test_32x32.mat"
    savemat(path, {"X": RNG.integers(0, 256, (32, 32, 3, 40), dtype=np.uint8), "y": np.ones((40, 1), np.uint8)})
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DatasetFormatError, match=r"test_32x32\.mat"):
        open_dataset("svhn:test", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"svhn/train_32x32\.mat.*housenumbers"):
        open_dataset("svhn:train", root=tmp_path)


def test_svhn_wrong_variables(tmp_path):
    from scipy.io import savemat

    savemat(tmp_path / "test_32x32.mat", {"images": np.zeros((2, 2))})
    with pytest.raises(DatasetFormatError, match="'X' and 'y'"):
        open_dataset("svhn:test", root=tmp_path)


# ----- MNIST --------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_plain_and_gz(tmp_path, gz):
    images = RNG.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = RNG.integers(0, 10, 7).astype(np.uint8)
    folder = tmp_path / "MNIST" / "raw"  # torchvision's layout is found too
    folder.mkdir(parents=True)
    for name, arr in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        data = _idx(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    ds = open_dataset("mnist:test", root=tmp_path)
    x, y = _stack(ds)
    assert x.shape == (7, 1, 28, 28)
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x[:, 0], images / 255.0, atol=1e-7)


def test_mnist_as_rgb_32_for_a_cifar_model(tmp_path):
    images = RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.array([1, 2, 3], np.uint8)))
    x, _ = _stack(open_dataset("mnist:test", root=tmp_path, image_size=32, mean=[0.5] * 3, std=[0.5] * 3))
    assert x.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(x[:, 0], x[:, 1])
    ref = resize_shorter(torch.from_numpy(images[:, None] / 255.0).float()[0], 32)  # 28 -> 32, bilinear
    np.testing.assert_allclose(x[0, 0], (ref[0].double().numpy() - 0.5) / 0.5, atol=1e-5)


def test_mnist_truncated_and_corrupt(tmp_path):
    images = RNG.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(images)[:-30])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(4, np.uint8)))
    with pytest.raises(DatasetFormatError, match=r"t10k-images-idx3-ubyte: truncated or corrupt idx file"):
        open_dataset("mnist:test", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images))[:-20])
    with pytest.raises(DatasetFormatError, match="corrupt or truncated gzip"):
        open_dataset("mnist:test", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + bytes(20)))
    with pytest.raises(DatasetFormatError, match="not an unsigned-byte idx file"):
        open_dataset("mnist:test", root=tmp_path)


def test_mnist_label_count_mismatch(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(np.zeros((3, 28, 28), np.uint8)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(2, np.uint8)))
    with pytest.raises(DatasetFormatError, match="2 labels for 3 images"):
        open_dataset("mnist:train", root=tmp_path)


def test_mnist_missing_lists_plain_and_gz(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"train-images-idx3-ubyte\[\.gz\] and train-labels-idx1-ubyte\[\.gz\]"):
        open_dataset("mnist:train", root=tmp_path)


# ----- image folders ------------------------------------------------------------------------------

def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def test_folder_with_classes_reads_png_exactly_and_labels_sorted(tmp_path):
    imgs = {}
    for cls in ("zebra", "apple"):
        for k in range(2):
            arr = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            _png(tmp_path / "tree" / cls / f"{k}.png", arr)
            imgs[(cls, k)] = arr
    ds = open_dataset(f"folder:{tmp_path / 'tree'}")
    assert ds.classes == ["apple", "zebra"]
    x, y = _stack(ds)
    np.testing.assert_array_equal(y, [0, 0, 1, 1])
    order = [("apple", 0), ("apple", 1), ("zebra", 0), ("zebra", 1)]
    np.testing.assert_allclose(x, _expected(np.stack([imgs[k] for k in order])), atol=1e-7)


def test_folder_grey_png_becomes_rgb_and_flat_folder_is_unlabelled(tmp_path):
    grey = RNG.integers(0, 256, (32, 32), dtype=np.uint8)
    _png(tmp_path / "flat" / "a.png", grey)
    ds = open_dataset(f"folder:{tmp_path / 'flat'}")
    x, y = _stack(ds)
    assert y.tolist() == [-1] and x.shape == (1, 3, 32, 32)
    for c in range(3):
        np.testing.assert_allclose(x[0, c], grey / 255.0, atol=1e-7)


def test_folder_resize_shorter_side_then_centre_crop(tmp_path):
    """A 40x64 image: shorter side 40 -> 32 (64 -> 51), then the central 32 columns; compared with Pillow's
    bilinear (antialiased) resize of the same image, cropped at round((51 - 32) / 2) = 10."""
    from scipy import ndimage

    arr = ndimage.gaussian_filter(RNG.integers(0, 256, (40, 64, 3)).astype(float), (2, 2, 0)).astype(np.uint8)
    _png(tmp_path / "r" / "img.png", arr)
    x, _ = _stack(open_dataset(f"folder:{tmp_path / 'r'}", image_size=32))
    ref = np.asarray(Image.fromarray(arr).resize((51, 32), Image.Resampling.BILINEAR)) / 255.0
    ref = ref[:, 10:42].transpose(2, 0, 1)
    assert x.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(x[0], ref, atol=0.01)


def test_center_crop_takes_the_middle_window():
    x = torch.arange(3 * 36 * 40, dtype=torch.float32).view(3, 36, 40)
    out = center_crop(x, 32)
    torch.testing.assert_close(out, x[:, 2:34, 4:36])
    assert resize_shorter(x, 36) is x  # nothing to do


def test_folder_jpeg_is_decoded_and_loader_batches_mixed_sizes(tmp_path):
    for k, size in enumerate([(50, 70), (32, 32), (64, 48)]):
        path = tmp_path / "j" / f"{k}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(RNG.integers(0, 256, size + (3,), dtype=np.uint8)).save(path, quality=95)
    ds = open_dataset(f"folder:{tmp_path / 'j'}")
    xb, yb = next(iter(DataLoader(ds, batch_size=3)))
    assert xb.shape == (3, 3, 32, 32) and (yb == -1).all()
    # the 32x32 JPEG is not resized: it equals Pillow's own decode
    ref = np.asarray(Image.open(tmp_path / "j" / "1.jpg").convert("RGB")).transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(xb[1].double().numpy(), ref, atol=1e-7)


def test_folder_corrupt_image_names_the_file(tmp_path):
    _png(tmp_path / "c" / "good.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "c" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = open_dataset(f"folder:{tmp_path / 'c'}")
    bad = [i for i, f in enumerate(ds.files) if f.name == "bad.jpg"][0]
    with pytest.raises(DatasetFormatError, match=r"bad\.jpg: cannot decode image"):
        ds[bad]


def test_folder_truncated_jpeg_is_a_clear_error(tmp_path):
    path = tmp_path / "t" / "x.jpg"
    path.parent.mkdir()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(DatasetFormatError, match=r"x\.jpg: cannot decode image"):
        open_dataset(f"folder:{path.parent}")[0]


def test_folder_missing_or_empty(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="is not a directory"):
        open_dataset(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DatasetNotFoundError, match="no image files"):
        open_dataset(f"folder:{tmp_path / 'empty'}")


@pytest.mark.parametrize("name,sub", [("textures", "dtd/images/banded"), ("lsun_crop", "LSUN_C"), ("lsun_resize", "LSUN_resize"),
                                      ("isun", "iSUN"), ("places365", "places365/a/airfield")])
def test_named_folders_under_root(tmp_path, name, sub):
    arr = RNG.integers(0, 256, (36, 36, 3), dtype=np.uint8)
    _png(tmp_path / sub / "0001.png", arr)
    ds = open_dataset(name, root=tmp_path, image_size=32)
    x, y = _stack(ds)
    assert y.tolist() == [-1] and x.shape == (1, 3, 32, 32)
    assert ds.fingerprint.startswith(name)


def test_named_folder_missing_lists_where_it_looked(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        open_dataset("textures", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "dtd" / "images") + "/<class>/*.jpg" in msg and "Describable Textures" in msg
    with pytest.raises(DatasetNotFoundError, match="LSUN_resize"):
        open_dataset("lsun_resize", root=tmp_path)


def test_root_from_environment(tmp_path, monkeypatch):
    _png(tmp_path / "iSUN" / "a.png", np.zeros((32, 32, 3), np.uint8))
    monkeypatch.setenv("EBOOD_DATA", str(tmp_path))
    assert len(open_dataset("isun")) == 1
    monkeypatch.delenv("EBOOD_DATA")
    with pytest.raises(DatasetNotFoundError, match="no data root"):
        open_dataset("isun")


# ----- TinyImageNet -------------------------------------------------------------------------------

def _tin(tmp_path):
    top = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # wnids.txt order, deliberately not sorted
    (top).mkdir()
    (top / "wnids.txt").write_text("\n".join(wnids) + "\n")
    pix = {}
    for w in wnids:
        for k in range(2):
            arr = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            _png(top / "train" / w / "images" / f"{w}_{k}.JPEG", arr)  # PNG bytes under the official name: lossless
            pix[f"{w}_{k}"] = arr
        (top / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for k, w in enumerate(["n01", "n02", "n01"]):
        arr = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        _png(top / "val" / "images" / f"val_{k}.JPEG", arr)
        pix[f"val_{k}"] = arr
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (top / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return top, pix


def test_tinyimagenet_train_and_val_labels(tmp_path):
    top, pix = _tin(tmp_path)
    val = open_dataset("tinyimagenet:val", root=tmp_path, image_size=64)
    x, y = _stack(val)
    np.testing.assert_array_equal(y, [1, 0, 1])  # n01 is second in wnids.txt
    np.testing.assert_allclose(x, _expected(np.stack([pix[f"val_{k}"] for k in range(3)])), atol=1e-7)
    train = open_dataset("tinyimagenet:train", root=tmp_path, image_size=64)
    _, y = _stack(train)
    names = [f.stem for f in train.files]
    assert y.tolist() == [0 if n.startswith("n02") else 1 for n in names]
    assert len(train) == 4  # the *_boxes.txt files are not images
    small = open_dataset("tinyimagenet", root=tmp_path)  # default: val, 32x32
    assert small[0][0].shape == (3, 32, 32)


def test_tinyimagenet_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"tiny-imagenet-200/val/images.*val_annotations\.txt"):
        open_dataset("tinyimagenet:val", root=tmp_path)
    top, _ = _tin(tmp_path)
    (top / "val" / "val_annotations.txt").write_text("val_9.JPEG\tn01\t0\t0\t1\t1\n")
    with pytest.raises(DatasetFormatError, match="val_9.JPEG, which does not exist"):
        open_dataset("tinyimagenet:val", root=tmp_path)
    (top / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DatasetFormatError, match="n99"):
        open_dataset("tinyimagenet:val", root=tmp_path)


# ----- arrays, specs, fingerprints ----------------------------------------------------------------

def test_array_file_uint8_images_and_labels(tmp_path):
    x = RNG.integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)
    y = np.arange(5)
    np.savez(tmp_path / "a.npz", inputs=x, labels=y)
    xs, ys = _stack(open_dataset(f"array:{tmp_path / 'a.npz'}"))
    np.testing.assert_allclose(xs, x / 255.0, atol=1e-7)
    np.testing.assert_array_equal(ys, y)
    np.savez(tmp_path / "b.npz", features=np.zeros((2, 3)))
    with pytest.raises(DatasetFormatError, match="'inputs' or 'x'"):
        open_dataset(f"array:{tmp_path / 'b.npz'}")
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 4), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(DatasetFormatError, match="labels must be N = 3"):
        open_dataset(f"array:{tmp_path / 'c.npz'}")


def test_fingerprints_follow_content_split_and_options(cifar10_root):
    root = cifar10_root[0]
    a = open_dataset("cifar10:test", root=root).fingerprint
    assert a == open_dataset("cifar10:test", root=root).fingerprint
    assert a != open_dataset("cifar10:train", root=root).fingerprint
    assert a != open_dataset("cifar10:test", root=root, mean=[0.5] * 3, std=[0.2] * 3).fingerprint
    path = root / "cifar-10-batches-bin" / "test_batch.bin"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF  # same size, one pixel changed
    path.write_bytes(bytes(raw))
    assert a != open_dataset("cifar10:test", root=root).fingerprint


def test_bad_specs_and_options(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset spec 'imagenet:val'.*cifar10:train"):
        open_dataset("imagenet:val", root=tmp_path)
    with pytest.raises(ValueError, match="needs a split"):
        open_dataset("cifar10", root=tmp_path)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        open_dataset("svhn:valid", root=tmp_path)
    with pytest.raises(ValueError, match="std must be > 0"):
        open_dataset("cifar10:test", root=tmp_path, mean=[0.5] * 3, std=[0.0, 1, 1])
    with pytest.raises(ValueError, match="mean/std have 3 values but channels=1"):
        ImageTransform.build(channels=1, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(DatasetNotFoundError, match="is not a directory"):
        open_dataset("cifar10:test", root=tmp_path / "missing")


def test_folder_fingerprint_sees_a_same_size_content_change(tmp_path):
    for k in range(3):
        _png(tmp_path / "f" / f"{k}.png", np.zeros((8, 8, 3), np.uint8))
    bmp = tmp_path / "f" / "3.bmp"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bmp)
    before = open_dataset(f"folder:{tmp_path / 'f'}").fingerprint
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(bmp)  # BMP: same size, other pixels
    assert open_dataset(f"folder:{tmp_path / 'f'}").fingerprint != before

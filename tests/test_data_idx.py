"""Idx files (ebood.data.idx): MNIST, Fashion-MNIST, KMNIST and EMNIST, on files written here and on Debian's copy."""

from __future__ import annotations

import dataclasses
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from ebood.data import DatasetFormatError, DatasetNotFoundError, open_dataset
from ebood.data import idx as idx_module
from ebood.data.idx import IDX_SETS, fashion_mnist, idx_files, read_idx

RNG = np.random.default_rng(0)
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian_copy = pytest.mark.skipif(not (DEBIAN / "t10k-images-idx3-ubyte.gz").is_file(),
                                       reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")


def _idx(array: np.ndarray) -> bytes:
    """An idx file written from the format's definition: 0, 0, 0x08, ndim, big-endian int32 dims, the bytes."""
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


def _parse(raw: bytes) -> np.ndarray:
    """An independent idx parse: the header with struct, the data with numpy."""
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=">u1").reshape(dims)


def _write(folder: Path, names_arrays, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in names_arrays:
        data = _idx(arr)
        (folder / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)


def _pair(n: int, classes: int = 10):
    return RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8), RNG.integers(0, classes, n).astype(np.uint8)


@pytest.fixture
def no_system_copy(monkeypatch, tmp_path):
    """No $EBOOD_DATA and no system-wide Fashion-MNIST: the state of a machine without the data."""
    monkeypatch.delenv("EBOOD_DATA", raising=False)
    spec = IDX_SETS["fashion-mnist"]
    monkeypatch.setitem(IDX_SETS, "fashion-mnist", dataclasses.replace(spec, system=(str(tmp_path / "absent"),)))


# ----- layouts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [".", "FashionMNIST/raw", "fashion-mnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_layouts(tmp_path, layout, gz):
    images, labels = _pair(5)
    _write(tmp_path / layout, [("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)], gz)
    ds = open_dataset("fashion-mnist:test", root=tmp_path)
    assert len(ds) == 5 and ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    np.testing.assert_array_equal(ds.images.numpy()[:, 0], images)
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    x, y = ds[3]
    np.testing.assert_allclose(x.numpy()[0], images[3] / 255.0, atol=1e-7)
    assert y == labels[3]


def test_kmnist_and_mnist_names(tmp_path):
    images, labels = _pair(3)
    _write(tmp_path / "KMNIST" / "raw", [("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)], True)
    np.testing.assert_array_equal(open_dataset("kmnist:train", root=tmp_path).images.numpy()[:, 0], images)
    _write(tmp_path / "MNIST" / "raw", [("train-images-idx3-ubyte", images[::-1]), ("train-labels-idx1-ubyte", labels)], False)
    np.testing.assert_array_equal(open_dataset("mnist:train", root=tmp_path).images.numpy()[:, 0], images[::-1])


def test_emnist_names_and_upright_images(tmp_path):
    upright = np.zeros((2, 28, 28), np.uint8)
    upright[:, 2:6, :] = 255  # a horizontal bar at the top
    stored = upright.transpose(0, 2, 1)  # EMNIST stores images transposed
    labels = np.array([1, 26], np.uint8)  # EMNIST letters are labelled 1..26
    _write(tmp_path / "EMNIST" / "raw", [("emnist-letters-test-images-idx3-ubyte", stored),
                                         ("emnist-letters-test-labels-idx1-ubyte", labels)], True)
    ds = open_dataset("emnist-letters:test", root=tmp_path)
    np.testing.assert_array_equal(ds.images.numpy()[:, 0], upright)
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    with pytest.raises(ValueError, match="subset"):
        open_dataset("emnist-nope:test", root=tmp_path)


def test_environment_root(tmp_path, monkeypatch):
    images, labels = _pair(2)
    _write(tmp_path, [("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)], False)
    monkeypatch.setenv("EBOOD_DATA", str(tmp_path))
    assert len(open_dataset("kmnist:train")) == 2


# ----- missing and damaged files -------------------------------------------------------------------

def test_missing_fashion_mnist_says_how_to_get_it(no_system_copy, tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        open_dataset("fashion-mnist:train")
    msg = str(info.value)
    assert "\n" not in msg and "dataset-fashion-mnist" in msg and "FashionMNIST/raw" in msg
    assert "train-images-idx3-ubyte[.gz]" in msg and str(tmp_path / "absent") in msg
    with pytest.raises(DatasetNotFoundError, match=r"dataset-fashion-mnist") as info:
        open_dataset("fashion-mnist:test", root=tmp_path)
    assert "\n" not in str(info.value)


def test_missing_root_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="is not a directory"):
        fashion_mnist(tmp_path / "nowhere", "test")


def test_missing_kmnist_without_root(monkeypatch):
    monkeypatch.delenv("EBOOD_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match=r"no data root given.*KMNIST/raw"):
        open_dataset("kmnist:test")


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-10], r"truncated or corrupt idx file \(truncated\): header says \(5, 28, 28\)"),
    (lambda raw: raw + b"\x00\x01", r"truncated or corrupt idx file \(has trailing bytes\)"),
    (lambda raw: b"\x00\x00\x0b" + raw[3:], r"not an unsigned-byte idx file \(magic 00000b03"),
    (lambda raw: b"\x08\x03\x00\x00" + raw[4:], r"not an unsigned-byte idx file"),
    (lambda raw: raw[:9], r"truncated idx header"),
    (lambda raw: raw[:2], r"truncated idx file \(2 bytes, no header\)"),
])
def test_damaged_images_file_is_named(tmp_path, damage, message):
    images, labels = _pair(5)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(damage(_idx(images)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(labels))
    with pytest.raises(DatasetFormatError, match=r"t10k-images-idx3-ubyte: " + message):
        open_dataset("fashion-mnist:test", root=tmp_path)


def test_corrupt_gzip_and_mismatched_lengths(tmp_path):
    images, labels = _pair(5)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images))[:-12])
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    with pytest.raises(DatasetFormatError, match=r"train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        fashion_mnist(tmp_path, "train")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels[:4])))
    with pytest.raises(DatasetFormatError, match=r"train-labels-idx1-ubyte.gz: 4 labels for 5 images"):
        fashion_mnist(tmp_path, "train")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(images[:, 0, :5])))  # 2-d "labels"
    with pytest.raises(DatasetFormatError, match=r"expected idx1 labels"):
        fashion_mnist(tmp_path, "train")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.array([0, 1, 2, 3, 10], np.uint8))))
    with pytest.raises(DatasetFormatError, match=r"label 10 is not a class of Fashion-MNIST"):
        fashion_mnist(tmp_path, "train")


# ----- Debian's copy --------------------------------------------------------------------------------

@needs_debian_copy
@pytest.mark.parametrize("split, prefix, n", [("test", "t10k", 10_000), ("train", "train", 60_000)])
def test_debian_copy_matches_an_independent_parse(monkeypatch, split, prefix, n):
    monkeypatch.delenv("EBOOD_DATA", raising=False)
    images_file, labels_file = idx_files("fashion-mnist", split)
    assert images_file == DEBIAN / f"{prefix}-images-idx3-ubyte.gz"
    expected_images = _parse(gzip.decompress(images_file.read_bytes()))
    expected_labels = _parse(gzip.decompress(labels_file.read_bytes()))
    ds = fashion_mnist(None, split)
    assert expected_images.shape == (n, 28, 28) and len(ds) == n
    np.testing.assert_array_equal(ds.images.numpy()[:, 0], expected_images)
    np.testing.assert_array_equal(ds.labels.numpy(), expected_labels)
    np.testing.assert_array_equal(np.bincount(expected_labels), np.full(10, n // 10))  # Fashion-MNIST is balanced
    np.testing.assert_array_equal(read_idx(labels_file), expected_labels)


def test_no_import_cycle_between_datasets_and_formats():
    import ast
    import inspect

    from ebood.data import datasets

    tree = ast.parse(inspect.getsource(datasets))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "formats" not in imported and "idx" not in imported, imported
    assert idx_module.__name__ == "ebood.data.idx"

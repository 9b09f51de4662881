"""Finding and reading the files of the real data sets: the data root, expected files (plain or gzipped), splits.

Shared by the loaders in ``formats`` (CIFAR, SVHN, image folders) and ``idx`` (MNIST-style idx files).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Sequence

from .datasets import DatasetFormatError, DatasetNotFoundError

__all__ = ["resolve_root", "existing", "locate", "read_bytes", "split"]


def resolve_root(root: str | os.PathLike | None, what: str) -> Path:
    """The data root: ``root``, else the ``EBOOD_DATA`` environment variable; an error when neither is set."""
    if root is None:
        env = os.environ.get("EBOOD_DATA")
        if not env:
            raise DatasetNotFoundError(f"{what}: no data root given; pass root= (--root DIR) or set EBOOD_DATA")
        root = env
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(f"{what}: data root {path} is not a directory")
    return path


def existing(folder: Path, name: str, gz: bool = False) -> Path | None:
    """``folder/name``, or ``folder/name.gz`` when gzip is accepted."""
    for candidate in ([name, name + ".gz"] if gz else [name]):
        p = folder / candidate
        if p.is_file():
            return p
    return None


def locate(root: Path, what: str, folders: Sequence[str], files: Sequence[str], source: str, gz: bool = False) -> list[Path]:
    """The ``files`` in the first of ``root/folder`` that holds all of them, else a not-found error listing them."""
    for folder in folders:
        base = root / folder
        found = [existing(base, f, gz) for f in files]
        if all(found):
            return found  # type: ignore[return-value]
    base = root / folders[0]
    listed = ", ".join(str(base / f) + ("[.gz]" if gz else "") for f in files)
    also = [str(root / f) for f in folders[1:]]
    where = f" (also looked in {', '.join(also)})" if also else ""
    raise DatasetNotFoundError(f"{what} not found under {root}: expected {listed}{where} -- {source}")


def read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DatasetFormatError(f"{path}: corrupt or truncated gzip file ({exc})") from None
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None



def split(split: str, allowed: Sequence[str], what: str) -> str:
    if split not in allowed:
        raise ValueError(f"{what}: unknown split {split!r}; expected one of {', '.join(allowed)}")
    return split

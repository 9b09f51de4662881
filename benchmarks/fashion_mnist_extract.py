"""Extraction on Fashion-MNIST's 70,000 images vs a bare forward pass over the same tensors.

``ebood.extract`` runs the benchmark's CNN (:class:`ebood.models.FashionCNN`) once over the 60,000
training and 10,000 test images (as the benchmark holds them: float32 ArrayDatasets read through a
DataLoader), keeping logits and penultimate features. The baseline is the least any tool can do: the
model applied to slices of the image tensor under ``torch.inference_mode``, outputs thrown away.
Both run in this process on the same data, interleaved, the fastest of ``--repeats`` kept.

Target (issue 11): ``extract / bare <= 1.2``.

    python benchmarks/fashion_mnist_extract.py                 # weights from the benchmark's cache, else random
    python benchmarks/fashion_mnist_extract.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import ebood
from ebood.data.datasets import ArrayDataset
from ebood.data.idx import fashion_mnist
from ebood.models import FashionCNN


def load_images(root: str | None) -> list[ArrayDataset]:
    sets = []
    for split in ("train", "test"):
        raw = fashion_mnist(root, split)
        sets.append(ArrayDataset(raw.images.to(torch.float32).div_(255.0), raw.labels, name=f"fashion-mnist-{split}",
                                 fingerprint=raw.fingerprint))
    return sets


def bare(model: torch.nn.Module, sets: list[ArrayDataset], batch_size: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for ds in sets:
            for x in ds.inputs.split(batch_size):
                model(x)
    return time.perf_counter() - start


def extracted(model: torch.nn.Module, sets: list[ArrayDataset], batch_size: int) -> float:
    start = time.perf_counter()
    for ds in sets:
        out = ebood.extract(model, ds, batch_size=batch_size, progress=False)
        assert out.logits.shape[0] == len(ds) and out.features is not None
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="folder of the Fashion-MNIST idx files (default: found by itself)")
    parser.add_argument("--batch-size", type=int, default=256, help="the benchmark's extraction batch size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the benchmark uses 1)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = FashionCNN().eval()
    sets = load_images(args.root)
    n = sum(len(s) for s in sets)
    bare(model, sets[1:], args.batch_size)  # warm-up (allocator, oneDNN primitives)
    times: dict[str, list[float]] = {"bare": [], "extract": []}
    for _ in range(args.repeats):
        times["bare"].append(bare(model, sets, args.batch_size))
        times["extract"].append(extracted(model, sets, args.batch_size))
    best = {k: min(v) for k, v in times.items()}
    report = {"images": n, "threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats,
              "bare_s": round(best["bare"], 3), "extract_s": round(best["extract"], 3),
              "ratio_extract_over_bare": round(best["extract"] / best["bare"], 3),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    print(json.dumps(report, indent=2))
    print(f"extract / bare forward = {report['ratio_extract_over_bare']:.3f} (target <= 1.2)")


if __name__ == "__main__":
    main()

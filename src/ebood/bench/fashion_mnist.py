"""``ebood bench fashion-mnist``: the built-in benchmark's protocol on 70,000 real images.

In-distribution: Fashion-MNIST (Xiao et al. 2017) with a small CNN (:class:`ebood.models.FashionCNN`)
trained by ebood on the CPU; OOD sets, covariate shift, the open-set split and the auxiliary outliers
are described in :mod:`ebood.data.fashion_bench`. Models: the pre-trained CNN with every registered
detector, its energy- and OE-fine-tuned copies with the logit scores, and a CNN trained on classes 0-5
with every detector. Training, caching and evaluation are :mod:`ebood.bench.suite`, as for the
built-in benchmark.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..data.fashion_bench import CLASSES, KNOWN_CLASSES, fashion_mnist_benchmark
from ..models import FashionCNN
from ..train import get_preset
from .config import DetectorSpec
from .results import BenchResult
from .runner import default_detectors
from .suite import OpenSet, Suite, default_cache_dir, run_suite, standard_models, torch_threads

__all__ = ["run_fashion_mnist", "FINETUNE_SIZE", "MSMA", "DETECTOR_SETTINGS", "THREADS"]

#: ID images of the fine-tuning epoch (a seeded, class-stratified subset of the training split): the energy
#: and OE losses reshape the energies within a few hundred steps, and a full epoch would double the cold run.
FINETUNE_SIZE = 18_000

#: torch threads of the run. Two: a training step runs 1.4x faster than on one thread on an idle 2-core machine
#: (benchmarks/fashion_threads.py), and a fixed count keeps the trained weights (reductions split over threads)
#: the same on machines with more cores.
THREADS = 2

#: msma trains a score network per fit: at most 40 epochs on 10,000 of the 54,000 training features (seeded).
#: On all of them it took 4 of the cold run's 10 minutes for the same mean FPR95 (46.5 % vs 41.9 % on 10,000
#: and 43.7 % on 5,000, seed 0): the mixture on ten score norms needs far fewer samples than the classifier.
MSMA = DetectorSpec("msma", {"epochs": 40, "max_samples": 10_000})
#: the benchmark's settings of registered detectors (the others run with their defaults)
DETECTOR_SETTINGS = {"msma": MSMA}


def _finetune_subset(train, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(train))
    part, _ = train_test_split(idx, train_size=FINETUNE_SIZE, stratify=train.labels.numpy(), random_state=seed)
    return train.subset(np.sort(part), name="fashion-mnist-finetune",
                        description=f"{FINETUNE_SIZE} training images (stratified, seed {seed}) for fine-tuning")


def run_fashion_mnist(
    *,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    cache_dir: str | Path | None = None,
    detectors: Sequence[DetectorSpec] | None = None,
    finetuned: bool = True,
    open_set: bool = True,
    threads: int | None = THREADS,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> BenchResult:
    """Run the Fashion-MNIST benchmark and return its results (not yet saved).

    ``root``: where the Fashion-MNIST idx files are (default: ``$EBOOD_DATA``, then Debian's
    ``dataset-fashion-mnist``). ``threads``: torch threads (``None`` leaves torch's setting alone). Other
    arguments as :func:`ebood.bench.builtin.run_builtin`.
    """
    with torch_threads(threads):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        preset = get_preset("fashion-mnist")
        bm = fashion_mnist_benchmark(seed, root)
        log(f"data: {len(bm.train)} train / {len(bm.val)} val / {len(bm.test)} test Fashion-MNIST images, {len(bm.ood)} OOD sets, "
            f"{len(bm.covariate)} covariate-shift sets, {len(bm.auxiliary)} auxiliary outliers ({time.perf_counter() - t0:.1f} s)")
        split = bm.open_set
        unseen = ", ".join(CLASSES[KNOWN_CLASSES:])
        suite = Suite(
            name="fashion-mnist", data=bm, preset=preset, build=lambda k: FashionCNN(num_classes=k), model_name="FashionCNN",
            id_description="Fashion-MNIST (28x28)",
            models=standard_models(bm.train, bm.auxiliary, preset, "FashionCNN", "Fashion-MNIST", seed, progress, finetuned,
                                   finetune_data=_finetune_subset(bm.train, seed)),
            open_set=OpenSet(split["train"], split["val"], split["test"], split["ood"], "open-set",
                             f"Fashion-MNIST test images of classes {KNOWN_CLASSES}-9 ({unseen}), unseen by the open-set model",
                             f"FashionCNN trained on classes 0-{KNOWN_CLASSES - 1} only ({', '.join(CLASSES[:KNOWN_CLASSES])})",
                             KNOWN_CLASSES) if open_set else None,
            config={"finetune_size": FINETUNE_SIZE},
        )
        chosen = list(detectors) if detectors else [DETECTOR_SETTINGS.get(d.name, d) for d in default_detectors()]
        return run_suite(suite, seed=seed, cache=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
                         detectors=chosen, progress=progress, log=log, started=t0)

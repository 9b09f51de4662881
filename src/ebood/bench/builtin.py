"""The built-in offline benchmark behind ``ebood bench``: digits as ID, everything generated locally.

In-distribution: scikit-learn's handwritten digits with a small CNN (:class:`ebood.models.DigitsCNN`)
trained by ebood. OOD test sets: letters rendered from matplotlib's fonts (near), patches of
scikit-learn's sample photographs and synthetic noise (far), font-rendered digits (covariate shift,
reported separately), and an open-set split (a model trained on digits 0-5, with 6-9 as near-OOD).
Models evaluated: the pre-trained CNN with every registered detector, and the energy-fine-tuned and
OE-fine-tuned CNNs (auxiliary outliers disjoint from every test set) with the logit scores, which gives
the table of the energy paper's shape.

Trained models are cached (``cache_dir``, default ``$EBOOD_CACHE`` or ``~/.cache/ebood``) under a key
of the training settings and the data's fingerprint, so a second run only evaluates. The machinery
(training, caching, evaluation) is :mod:`ebood.bench.suite`, shared with the Fashion-MNIST benchmark.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..data.builtin import builtin_benchmark
from ..models import DigitsCNN
from ..train import get_preset
from .config import DetectorSpec
from .results import BenchResult
from .suite import FINETUNED_DETECTORS, OpenSet, Suite, default_cache_dir, run_suite, standard_models, torch_threads

__all__ = ["run_builtin", "default_cache_dir", "torch_threads", "FINETUNED_DETECTORS"]


def run_builtin(
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    detectors: Sequence[DetectorSpec] | None = None,
    finetuned: bool = True,
    open_set: bool = True,
    threads: int | None = 1,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> BenchResult:
    """Run the built-in benchmark and return its results (not yet saved).

    ``detectors``: those evaluated on the pre-trained and open-set models (default: every registered
    one); the fine-tuned models are evaluated with the logit scores. ``threads``: torch threads for
    the run (``None`` leaves torch's setting alone).
    """
    with torch_threads(threads):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        preset = get_preset("builtin")
        bm = builtin_benchmark(seed)
        log(f"data: {len(bm.train)} train / {len(bm.val)} val / {len(bm.test)} test digits, {len(bm.ood)} OOD sets, "
            f"{len(bm.auxiliary)} auxiliary outliers ({time.perf_counter() - t0:.1f} s)")
        split = bm.open_set
        known = int(split["train"].labels.max()) + 1
        suite = Suite(
            name="builtin", data=bm, preset=preset, build=lambda k: DigitsCNN(num_classes=k), model_name="DigitsCNN",
            id_description="scikit-learn digits (8x8)",
            models=standard_models(bm.train, bm.auxiliary, preset, "DigitsCNN", "digits", seed, progress, finetuned),
            open_set=OpenSet(split["train"], split["val"], split["test"], split["ood"], f"digits_{known}-9",
                             f"digits {known}-9, unseen by a model trained on digits 0-{known - 1}",
                             f"DigitsCNN trained on digits 0-{known - 1} only (open-set split)", known) if open_set else None,
        )
        return run_suite(suite, seed=seed, cache=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
                         detectors=detectors, progress=progress, log=log, started=t0)

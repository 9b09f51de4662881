"""The built-in offline benchmark behind ``ebood bench``: digits as ID, everything generated locally.

In-distribution: scikit-learn's handwritten digits with a small CNN (:class:`ebood.models.DigitsCNN`)
trained by ebood. OOD test sets: letters rendered from matplotlib's fonts (near), patches of
scikit-learn's sample photographs and synthetic noise (far), font-rendered digits (covariate shift,
reported separately), and an open-set split (a model trained on digits 0-5, with 6-9 as near-OOD).
Models evaluated: the pre-trained CNN with every registered detector (and ``msma`` on the input images
as ``msma_inputs``), the energy-fine-tuned and OE-fine-tuned CNNs (auxiliary outliers disjoint from
every test set) with the logit scores, which gives the table of the energy paper's shape, and CNNs
trained from scratch with LogitNorm (logit scores) and PALM (``knn`` / ``mahalanobis`` on the
penultimate features, as the PALM paper scores).

Trained models are cached (``cache_dir``, default ``$EBOOD_CACHE`` or ``~/.cache/ebood``) under a key
of the training settings and the data's fingerprint, so a second run only evaluates. The machinery
(training, caching, evaluation) is :mod:`ebood.bench.suite`, shared with the Fashion-MNIST benchmark.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..data.builtin import BuiltinBenchmark, builtin_benchmark
from ..models import DigitsCNN
from ..train import FinetunePreset, LogitNormLoss, PALMLoss, get_preset, train_classifier, train_palm
from .config import DetectorSpec
from .results import BenchResult
from .runner import default_detectors
from .suite import (FINETUNED_DETECTORS, ModelSpec, OpenSet, Suite, default_cache_dir, run_suite, standard_models,
                    torch_threads)

__all__ = ["run_builtin", "default_cache_dir", "torch_threads", "FINETUNED_DETECTORS"]

#: detectors evaluated on the PALM-trained model (the paper scores its features with these)
PALM_DETECTORS = ("knn", "mahalanobis")
#: msma on the features and on the input images, with epoch caps that keep each fit within a minute on a
#: busy 2-core machine (early stopping on the held-out loss may end them sooner)
MSMA_FEATURES = DetectorSpec("msma", {"epochs": 40})
MSMA_INPUTS = DetectorSpec("msma", {"on": "inputs", "hidden": 16, "epochs": 25}, label="msma_inputs")
#: ViM and Residual with a principal space of 16 of DigitsCNN's 64 feature dimensions: the trained features
#: span about 24 (ReLU units that never fire), fewer than the default D / 2 = 32, which leaves the principal
#: space undetermined (a degenerate fit: no scores)
PRINCIPAL_DIM = 16
#: the benchmark's settings of registered detectors (the others run with their defaults)
DETECTOR_SETTINGS = {"msma": MSMA_FEATURES, "vim": DetectorSpec("vim", {"dim": PRINCIPAL_DIM}),
                     "residual": DetectorSpec("residual", {"dim": PRINCIPAL_DIM})}
#: LogitNorm's tau for the digits (the paper's CIFAR-10 value)
LOGITNORM_TAU = 0.04
#: PALM on the digits: the official settings except the EMA momentum, 0.99 instead of 0.999 (the
#: official runs take ~50k steps; these take ~300, in which 0.999 would leave the prototypes at their
#: random start) and the optimiser (the digits CNN's Adam recipe, no augmentation: one view).
PALM_RECIPE = {"epochs": 20, "lr": 1e-3, "batch_size": 64, "proto_m": 0.99}


def _other_losses(bm: BuiltinBenchmark, preset: FinetunePreset, seed: int, progress: bool) -> tuple[ModelSpec, ...]:
    """CNNs trained from scratch with LogitNorm and with PALM."""
    r = preset.pretrain
    assert r is not None

    def logitnorm(m: nn.Module, _: dict) -> nn.Module:
        return train_classifier(m, bm.train, epochs=r.epochs, lr=r.lr, optimizer=r.optimizer, batch_size=r.batch_size,
                                weight_decay=r.weight_decay, seed=seed, progress=progress, loss=LogitNormLoss(LOGITNORM_TAU))

    def palm(m: nn.Module, _: dict) -> nn.Module:
        loss = PALMLoss(10, proto_m=PALM_RECIPE["proto_m"], seed=seed)
        return train_palm(m, bm.train, loss=loss, epochs=PALM_RECIPE["epochs"], lr=PALM_RECIPE["lr"], optimizer="adam",
                          batch_size=PALM_RECIPE["batch_size"], weight_decay=0.0, seed=seed, progress=progress)

    return (
        ModelSpec("logitnorm", f"DigitsCNN trained from scratch with LogitNorm (tau={LOGITNORM_TAU}), the pre-training recipe",
                  logitnorm, key=(asdict(preset), LOGITNORM_TAU), detectors=FINETUNED_DETECTORS, report_training=True),
        ModelSpec("palm", f"DigitsCNN trained from scratch with PALM ({PALM_RECIPE}, other settings the official code's), "
                          "classifier head fitted on the frozen features", palm, key=(asdict(preset), PALM_RECIPE),
                  detectors=PALM_DETECTORS, report_training=True),
    )


def run_builtin(
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    detectors: Sequence[DetectorSpec] | None = None,
    finetuned: bool = True,
    open_set: bool = True,
    other_losses: bool = True,
    threads: int | None = 1,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> BenchResult:
    """Run the built-in benchmark and return its results (not yet saved).

    ``detectors``: those evaluated on the pre-trained and open-set models (default: every registered
    one, plus ``msma`` on the input images as ``msma_inputs``); the fine-tuned models are evaluated
    with the logit scores. ``other_losses``: also train and evaluate the LogitNorm and PALM models.
    ``threads``: torch threads for the run (``None`` leaves torch's setting alone).
    """
    with torch_threads(threads):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        preset = get_preset("builtin")
        bm = builtin_benchmark(seed)
        log(f"data: {len(bm.train)} train / {len(bm.val)} val / {len(bm.test)} test digits, {len(bm.ood)} OOD sets, "
            f"{len(bm.auxiliary)} auxiliary outliers ({time.perf_counter() - t0:.1f} s)")
        chosen = list(detectors) if detectors else [DETECTOR_SETTINGS.get(d.name, d) for d in default_detectors()] + [MSMA_INPUTS]
        split = bm.open_set
        known = int(split["train"].labels.max()) + 1
        models = standard_models(bm.train, bm.auxiliary, preset, "DigitsCNN", "digits", seed, progress, finetuned)
        if other_losses:
            models += _other_losses(bm, preset, seed, progress)
        suite = Suite(
            name="builtin", data=bm, preset=preset, build=lambda k: DigitsCNN(num_classes=k), model_name="DigitsCNN",
            id_description="scikit-learn digits (8x8)", models=models,
            open_set=OpenSet(split["train"], split["val"], split["test"], split["ood"], f"digits_{known}-9",
                             f"digits {known}-9, unseen by a model trained on digits 0-{known - 1}",
                             f"DigitsCNN trained on digits 0-{known - 1} only (open-set split)", known) if open_set else None,
            config={"palm_detectors": list(PALM_DETECTORS), "palm_recipe": PALM_RECIPE, "logitnorm_tau": LOGITNORM_TAU},
        )
        return run_suite(suite, seed=seed, cache=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
                         detectors=chosen, progress=progress, log=log, started=t0)

"""The built-in offline benchmark behind ``ebood bench``: digits as ID, everything generated locally.

In-distribution: scikit-learn's handwritten digits with a small CNN (:class:`ebood.models.DigitsCNN`)
trained by ebood. OOD test sets: letters rendered from matplotlib's fonts (near), patches of
scikit-learn's sample photographs and synthetic noise (far), font-rendered digits (covariate shift,
reported separately), and an open-set split (a model trained on digits 0-5, with 6-9 as near-OOD).
Models evaluated: the pre-trained CNN with every registered detector, and the energy-fine-tuned and
OE-fine-tuned CNNs (auxiliary outliers disjoint from every test set) with the logit scores, which gives
the table of the energy paper's shape.

Trained models are cached (``cache_dir``, default ``$EBOOD_CACHE`` or ``~/.cache/ebood``) under a key
of the training settings and the data's fingerprint, so a second run only evaluates.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
import contextlib
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .. import __version__
from ..data.builtin import BuiltinBenchmark, builtin_benchmark
from ..models import DigitsCNN
from ..train import EnergyBoundedLoss, FinetunePreset, OutlierExposureLoss, finetune, get_preset, load_weights, save_weights, train_classifier
from ..state import StateError
from .config import DetectorSpec
from .results import BenchResult, describe_device
from .runner import OODSet, default_detectors, evaluate_model

__all__ = ["run_builtin", "default_cache_dir", "torch_threads"]

#: detectors evaluated on the fine-tuned models (their training targets the logit scores)
FINETUNED_DETECTORS = ("msp", "energy", "max_logit", "entropy")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (restored afterwards).

    The built-in benchmark's model is tiny: one thread is as fast as two on an idle 2-core machine,
    and many times faster when the other core is busy (threads wait on each other).
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_cache_dir() -> Path:
    return Path(os.environ.get("EBOOD_CACHE") or Path.home() / ".cache" / "ebood")


def _key(*parts: Any) -> str:
    h = hashlib.sha256(json.dumps([__version__, *parts], sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _cached_model(cache: Path | None, key: str, build: Callable[[], nn.Module], train: Callable[[nn.Module], nn.Module],
                  log: Callable[[str], None], label: str, *, seed: int) -> tuple[nn.Module, float]:
    """Load the model cached under ``key`` or train it (and cache it). Returns (model, seconds trained).

    The model is built with torch's generator seeded by ``seed`` (and the global state restored), so
    its initial weights depend on the seed alone, not on what ran before it in the process.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    path = cache / "models" / f"{key}.safetensors" if cache is not None else None
    if path is not None and path.is_file():
        try:
            state, _ = load_weights(path)
            model.load_state_dict(state)
            log(f"{label}: loaded from cache ({path.name})")
            return model.eval(), 0.0
        except (StateError, RuntimeError, KeyError) as exc:
            log(f"{label}: cache entry unusable ({exc}); training again")
    start = time.perf_counter()
    model = train(model)
    seconds = time.perf_counter() - start
    log(f"{label}: trained in {seconds:.1f} s")
    if path is not None:
        try:  # a cache is an optimisation: one that cannot be written costs a retraining next time, no more
            path.parent.mkdir(parents=True, exist_ok=True)
            save_weights(model, path, {"key": key, "label": label})
        except OSError as exc:
            log(f"{label}: not cached ({exc})")
    return model.eval(), seconds


def _pretrain(data: Any, p: FinetunePreset, seed: int, progress: bool) -> Callable[[nn.Module], nn.Module]:
    r = p.pretrain
    assert r is not None
    return lambda m: train_classifier(m, data, epochs=r.epochs, lr=r.lr, optimizer=r.optimizer, batch_size=r.batch_size,
                                      weight_decay=r.weight_decay, seed=seed, progress=progress)


def _finetune(base: nn.Module, bm: BuiltinBenchmark, loss: Any, p: FinetunePreset, seed: int,
              progress: bool) -> Callable[[nn.Module], nn.Module]:
    def run(model: nn.Module) -> nn.Module:
        model.load_state_dict(base.state_dict())
        return finetune(model, bm.train, bm.auxiliary, loss, epochs=p.epochs, lr=p.lr, lr_min=p.lr_min, momentum=p.momentum,
                        nesterov=p.nesterov, weight_decay=p.weight_decay, id_batch_size=p.id_batch_size,
                        outlier_batch_size=p.outlier_batch_size, seed=seed, progress=progress)

    return run


def _pretrained_models(bm: BuiltinBenchmark, preset: FinetunePreset, seed: int, cache: Path, finetuned: bool,
                       result: BenchResult, progress: bool, log: Callable[[str], None]) -> dict[str, tuple[nn.Module, str]]:
    """The pre-trained CNN and (optionally) its energy- and OE-fine-tuned copies, trained or from the cache."""
    recipe = asdict(preset)
    base_key = _key("pretrained", bm.train.fingerprint, recipe, seed)
    pretrained, secs = _cached_model(cache, base_key, lambda: DigitsCNN(num_classes=10), _pretrain(bm.train, preset, seed, progress),
                                     log, "pretrained DigitsCNN", seed=seed)
    result.timings["training"] += secs
    models = {"pretrained": (pretrained, "DigitsCNN trained with cross-entropy on the digits training split")}
    if not finetuned:
        return models
    e, o = preset.energy, preset.oe
    losses = {
        "energy_finetuned": (EnergyBoundedLoss(**e), f"fine-tuned with the energy-bounded loss (m_in={e['m_in']}, m_out={e['m_out']}, "
                                                     f"weight={e['weight']}) on the auxiliary outliers"),
        "oe_finetuned": (OutlierExposureLoss(**o), f"fine-tuned with Outlier Exposure (weight={o['weight']}) on the auxiliary outliers"),
    }
    for name, (loss, description) in losses.items():
        model, secs = _cached_model(cache, _key(name, base_key, bm.auxiliary.fingerprint), lambda: DigitsCNN(num_classes=10),
                                    _finetune(pretrained, bm, loss, preset, seed, progress), log, name, seed=seed)
        result.timings["training"] += secs
        models[name] = (model, description)
    return models


def _register_sets(result: BenchResult, sets: dict[str, OODSet]) -> None:
    for name, s in sets.items():
        result.ood_sets[name] = {"group": s.group, "n": len(s.data), "description": s.description}


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
        return _run_builtin(seed, Path(cache_dir) if cache_dir is not None else default_cache_dir(), detectors,
                            finetuned, open_set, progress, log)


def _run_builtin(seed: int, cache: Path, detectors: Sequence[DetectorSpec] | None, finetuned: bool, open_set: bool,
                 progress: bool, log: Callable[[str], None]) -> BenchResult:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    preset = get_preset("builtin")
    bm = builtin_benchmark(seed)
    log(f"data: {len(bm.train)} train / {len(bm.val)} val / {len(bm.test)} test digits, {len(bm.ood)} OOD sets, "
        f"{len(bm.auxiliary)} auxiliary outliers ({time.perf_counter() - t0:.1f} s)")
    result = BenchResult(benchmark="builtin", seed=seed, device=describe_device(), positive="id",
                         auxiliary_outliers=bm.auxiliary_description)
    chosen = list(detectors) if detectors else default_detectors()
    result.config = {"benchmark": "builtin", "seed": seed, "recipe": asdict(preset), "id": "scikit-learn digits (8x8)",
                     "detectors": [d.name for d in chosen], "finetuned_detectors": list(FINETUNED_DETECTORS)}
    ood_sets = {name: OODSet(ds, bm.groups[name], bm.descriptions.get(name, "")) for name, ds in bm.ood.items()}
    ood_sets.update({name: OODSet(ds, "covariate", bm.descriptions.get(name, "")) for name, ds in bm.covariate.items()})
    _register_sets(result, ood_sets)

    models = _pretrained_models(bm, preset, seed, cache, finetuned, result, progress, log)
    for name, (model, description) in models.items():
        dets = chosen if name == "pretrained" else [DetectorSpec(n) for n in FINETUNED_DETECTORS]
        t = time.perf_counter()
        evaluate_model(result, name, model, id_train=bm.train, id_test=bm.test, ood_sets=ood_sets, detectors=dets,
                       id_val=bm.val, ood_validation={"auxiliary": bm.auxiliary}, seed=seed, cache=cache / "outputs",
                       progress=progress, description=description)
        log(f"{name}: {len(dets)} detectors evaluated in {time.perf_counter() - t:.1f} s")

    if open_set:
        _evaluate_open_set(bm, preset, seed, cache, chosen, result, progress, log)
    result.timings["total"] = time.perf_counter() - t0
    return result


def _evaluate_open_set(bm: BuiltinBenchmark, preset: FinetunePreset, seed: int, cache: Path, detectors: Sequence[DetectorSpec],
                       result: BenchResult, progress: bool, log: Callable[[str], None]) -> None:
    """A CNN trained on digits 0-5 only, with the unseen digits 6-9 as near-OOD."""
    split = bm.open_set
    known = int(split["train"].labels.max()) + 1
    key = _key("openset", split["train"].fingerprint, asdict(preset), seed)
    model, secs = _cached_model(cache, key, lambda: DigitsCNN(num_classes=known), _pretrain(split["train"], preset, seed, progress),
                                log, f"open-set DigitsCNN (digits 0-{known - 1})", seed=seed)
    result.timings["training"] += secs
    sets = {f"digits_{known}-9": OODSet(split["ood"], "near", f"digits {known}-9, unseen by a model trained on digits 0-{known - 1}")}
    _register_sets(result, sets)
    t = time.perf_counter()
    evaluate_model(result, "openset", model, id_train=split["train"], id_test=split["test"], ood_sets=sets, detectors=detectors,
                   id_val=split["val"], ood_validation={"auxiliary": bm.auxiliary}, seed=seed, cache=cache / "outputs",
                   progress=progress, description=f"DigitsCNN trained on digits 0-{known - 1} only (open-set split)")
    log(f"openset: evaluated in {time.perf_counter() - t:.1f} s")

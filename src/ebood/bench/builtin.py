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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import __version__
from ..data.builtin import BuiltinBenchmark, builtin_benchmark
from ..models import DigitsCNN
from ..train import EnergyBoundedLoss, OutlierExposureLoss, finetune, load_weights, save_weights, train_classifier
from ..state import StateError
from .config import DetectorSpec
from .results import BenchResult, describe_device
from .runner import OODSet, default_detectors, evaluate_model

__all__ = ["BuiltinSettings", "run_builtin", "default_cache_dir"]

#: detectors evaluated on the fine-tuned models (their training targets the logit scores)
FINETUNED_DETECTORS = ("msp", "energy", "max_logit", "entropy")


@dataclass(frozen=True)
class BuiltinSettings:
    """Training settings of the built-in benchmark (part of the model cache key)."""

    pretrain_epochs: int = 30
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 64
    finetune_epochs: int = 10
    finetune_lr: float = 1e-2
    id_batch_size: int = 64
    outlier_batch_size: int = 128
    m_in: float = -12.0
    m_out: float = -4.0
    energy_weight: float = 0.1
    oe_weight: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)


def default_cache_dir() -> Path:
    return Path(os.environ.get("EBOOD_CACHE") or Path.home() / ".cache" / "ebood")


def _key(*parts: Any) -> str:
    h = hashlib.sha256(json.dumps([__version__, *parts], sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _cached_model(cache: Path | None, key: str, build: Callable[[], nn.Module], train: Callable[[nn.Module], nn.Module],
                  log: Callable[[str], None], label: str) -> tuple[nn.Module, float]:
    """Load the model cached under ``key`` or train it (and cache it). Returns (model, seconds trained)."""
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
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model, path, {"key": key, "label": label})
    return model.eval(), seconds


def _pretrain(data: Any, s: BuiltinSettings, seed: int, progress: bool) -> Callable[[nn.Module], nn.Module]:
    return lambda m: train_classifier(m, data, epochs=s.pretrain_epochs, lr=s.pretrain_lr, optimizer="adam",
                                      batch_size=s.pretrain_batch_size, seed=seed, progress=progress)


def _finetune(base: nn.Module, bm: BuiltinBenchmark, loss: Any, s: BuiltinSettings, seed: int,
              progress: bool) -> Callable[[nn.Module], nn.Module]:
    def run(model: nn.Module) -> nn.Module:
        model.load_state_dict(base.state_dict())
        return finetune(model, bm.train, bm.auxiliary, loss, epochs=s.finetune_epochs, lr=s.finetune_lr,
                        id_batch_size=s.id_batch_size, outlier_batch_size=s.outlier_batch_size, seed=seed, progress=progress)

    return run


def run_builtin(
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    detectors: Sequence[DetectorSpec] | None = None,
    settings: BuiltinSettings = BuiltinSettings(),
    finetuned: bool = True,
    open_set: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> BenchResult:
    """Run the built-in benchmark and return its results (not yet saved)."""
    torch.manual_seed(seed)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    t0 = time.perf_counter()
    bm = builtin_benchmark(seed)
    log(f"data: {len(bm.train)} train / {len(bm.val)} val / {len(bm.test)} test digits, "
        f"{len(bm.ood)} OOD sets, {len(bm.auxiliary)} auxiliary outliers ({time.perf_counter() - t0:.1f} s)")
    result = BenchResult(benchmark="builtin", seed=seed, device=describe_device(), positive="id",
                         auxiliary_outliers=bm.auxiliary_description)
    result.config = {"benchmark": "builtin", "seed": seed, "settings": asdict(settings),
                     "detectors": [asdict(d) for d in detectors] if detectors else "all registered"}
    ood_sets = {name: OODSet(ds, bm.groups[name], bm.descriptions.get(name, "")) for name, ds in bm.ood.items()}
    ood_sets.update({name: OODSet(ds, "covariate", bm.descriptions.get(name, "")) for name, ds in bm.covariate.items()})
    for name, s in ood_sets.items():
        result.ood_sets[name] = {"group": s.group, "n": len(s.data), "description": s.description}
    data_key = [bm.train.fingerprint, asdict(settings), seed]

    base_key = _key("pretrained", data_key)
    pretrained, secs = _cached_model(cache, base_key, lambda: DigitsCNN(num_classes=10), _pretrain(bm.train, settings, seed, progress),
                                     log, "pretrained DigitsCNN")
    result.timings["training"] += secs
    models: dict[str, tuple[nn.Module, Sequence[DetectorSpec], str]] = {
        "pretrained": (pretrained, list(detectors) if detectors else default_detectors(),
                       "DigitsCNN trained with cross-entropy on the digits training split"),
    }
    if finetuned:
        losses = {
            "energy_finetuned": (EnergyBoundedLoss(m_in=settings.m_in, m_out=settings.m_out, weight=settings.energy_weight),
                                 f"fine-tuned with the energy-bounded loss (m_in={settings.m_in}, m_out={settings.m_out}, weight={settings.energy_weight})"),
            "oe_finetuned": (OutlierExposureLoss(weight=settings.oe_weight),
                             f"fine-tuned with Outlier Exposure (weight={settings.oe_weight})"),
        }
        for name, (loss, description) in losses.items():
            model, secs = _cached_model(cache, _key(name, base_key, data_key), lambda: DigitsCNN(num_classes=10),
                                        _finetune(pretrained, bm, loss, settings, seed, progress), log, name)
            result.timings["training"] += secs
            models[name] = (model, [DetectorSpec(n) for n in FINETUNED_DETECTORS], description)

    extraction_cache = cache / "outputs"
    for name, (model, dets, description) in models.items():
        t = time.perf_counter()
        evaluate_model(result, name, model, id_train=bm.train, id_test=bm.test, ood_sets=ood_sets, detectors=dets,
                       id_val=bm.val, ood_validation={"auxiliary": bm.auxiliary}, seed=seed, cache=extraction_cache,
                       progress=progress, description=description)
        log(f"{name}: {len(dets)} detectors evaluated in {time.perf_counter() - t:.1f} s")

    if open_set:
        split = bm.open_set
        known = int(split["train"].labels.max()) + 1
        model, secs = _cached_model(cache, _key("openset", [split["train"].fingerprint, asdict(settings), seed]),
                                    lambda: DigitsCNN(num_classes=known), _pretrain(split["train"], settings, seed, progress),
                                    log, f"open-set DigitsCNN (digits 0-{known - 1})")
        result.timings["training"] += secs
        name = "openset"
        ood_name = f"digits_{known}-9"
        result.ood_sets[ood_name] = {"group": "near", "n": len(split["ood"]),
                                     "description": bm.descriptions.get("openset", f"digits {known}-9 for a model trained on 0-{known - 1}")}
        t = time.perf_counter()
        evaluate_model(result, name, model, id_train=split["train"], id_test=split["test"],
                       ood_sets={ood_name: OODSet(split["ood"], "near")}, detectors=list(detectors) if detectors else default_detectors(),
                       id_val=split["val"], seed=seed, cache=extraction_cache, progress=progress,
                       description=f"DigitsCNN trained on digits 0-{known - 1} only (open-set split)")
        log(f"{name}: evaluated in {time.perf_counter() - t:.1f} s")
    result.timings["total"] = time.perf_counter() - t0
    return result

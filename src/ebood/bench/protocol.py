"""Benchmarks described by a TOML file or a preset, on local data (see :mod:`ebood.bench.config`).

The model is loaded (TorchScript, entry point plus checkpoint, or a built-in architecture with a
checkpoint or trained by ebood from ``[model.train]``), every dataset is opened from ``root`` in its
official format, each dataset runs through the model once, and every detector is fitted and scored.
With ``[finetune]`` and auxiliary outliers, energy-fine-tuned and OE-fine-tuned copies of the model
are evaluated too, which gives the table of the energy paper's shape. Published numbers of the
protocol (``[reference]``) travel with the results so the table and report can show them.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data import open_dataset
from ..extraction import model_fingerprint
from ..models import load_model
from ..train import EnergyBoundedLoss, OutlierExposureLoss, finetune, train_classifier
from .suite import cache_key, cached_model, default_cache_dir
from .config import BenchConfig, ConfigError, DetectorSpec
from .results import BenchResult, describe_device
from .runner import OODSet, default_detectors, evaluate_model, id_accuracy_warning

__all__ = ["run_config"]

FINETUNED_DETECTORS = ("msp", "energy", "max_logit", "entropy")
_DATA_OPTIONS = ("mean", "std", "image_size", "channels")


def _opener(config: BenchConfig, root: str | Path | None) -> Callable[[str], Any]:
    options = {k: v for k, v in config.data_options.items() if k in _DATA_OPTIONS}
    unknown = set(config.data_options) - set(_DATA_OPTIONS)
    if unknown:
        raise ConfigError(f"[data]: unknown key(s) {', '.join(sorted(unknown))}; expected root, id_train, id_val, id_test, "
                          f"ood, ood_validation, {', '.join(_DATA_OPTIONS)}")
    data_root = root if root is not None else config.root
    return lambda spec: open_dataset(spec, root=data_root, seed=config.seed, **options)


def _model(config: BenchConfig, checkpoint: str | Path | None, id_train: Any, cache: Path, result: BenchResult,
           progress: bool, log: Callable[[str], None]) -> nn.Module:
    kwargs = dict(config.model.kwargs)
    train = kwargs.pop("train", None)
    ckpt = checkpoint if checkpoint is not None else config.model.checkpoint
    if ckpt is not None or train is None:
        if ckpt is None and not (config.model.spec.endswith((".pt", ".pth", ".ts", ".torchscript")) or ":" in config.model.spec):
            raise ConfigError(f"[model]: the architecture {config.model.spec!r} needs trained weights: pass --checkpoint FILE, "
                              f"set [model] checkpoint, or add [model.train] to train it with ebood")
        return load_model(config.model.spec, ckpt, **kwargs).eval()
    if not isinstance(train, dict):
        raise ConfigError("[model.train]: expected a table of train_classifier settings (epochs, lr, optimizer, batch_size)")
    key = cache_key("config-model", config.model.spec, kwargs, train, getattr(id_train, "fingerprint", None), config.seed)
    model, secs = cached_model(cache, key, lambda: load_model(config.model.spec, None, **kwargs),
                                lambda m: train_classifier(m, id_train, seed=config.seed, progress=progress, **train), log,
                                f"{config.model.spec} (trained from scratch)", seed=config.seed)
    result.timings["training"] += secs
    return model


def _finetuned(config: BenchConfig, base: nn.Module, id_train: Any, outliers: Any, cache: Path, result: BenchResult,
               progress: bool, log: Callable[[str], None]) -> dict[str, tuple[nn.Module, str]]:
    settings = {k: v for k, v in config.finetune.items() if k not in ("energy", "oe", "outliers")}
    base_key = model_fingerprint(base)
    out: dict[str, tuple[nn.Module, str]] = {}
    for name, loss_cls, key in (("energy_finetuned", EnergyBoundedLoss, "energy"), ("oe_finetuned", OutlierExposureLoss, "oe")):
        if key not in config.finetune:
            continue
        params = dict(config.finetune[key])
        loss = loss_cls(**params)

        def run(model: nn.Module, loss: Any = loss) -> nn.Module:
            model.load_state_dict(base.state_dict())
            return finetune(model, id_train, outliers, loss, seed=config.seed, progress=progress, **settings)

        model, secs = cached_model(cache, cache_key(name, base_key, params, settings, getattr(id_train, "fingerprint", None),
                                                getattr(outliers, "fingerprint", None), config.seed),
                                    lambda: copy.deepcopy(base), run, log, name, seed=config.seed)
        result.timings["training"] += secs
        out[name] = (model, f"fine-tuned with {key} loss {params}")
    return out


def run_config(
    config: BenchConfig,
    *,
    root: str | Path | None = None,
    checkpoint: str | Path | None = None,
    outliers: str | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> BenchResult:
    """Run the benchmark ``config`` on local data and return its results (not yet saved).

    ``root``, ``checkpoint`` and ``outliers`` (a dataset spec) override the config's values.
    """
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    open_spec = _opener(config, root)
    result = BenchResult(benchmark=config.name, seed=config.seed, device=describe_device(device), positive=config.positive,
                         reference=config.reference)
    result.config = dict(config.raw)
    id_train, id_test = open_spec(config.id_train), open_spec(config.id_test)
    id_val = open_spec(config.id_val) if config.id_val else None
    ood_sets = {name: OODSet(open_spec(spec), group, spec) for name, (group, spec) in config.ood.items()}
    validation = {name: open_spec(spec) for name, spec in config.ood_validation.items()}
    for name, s in ood_sets.items():
        result.ood_sets[name] = {"group": s.group, "n": len(s.data), "description": s.description,
                                 "evaluated_samples": min(len(s.data), config.ood_samples or len(s.data))}
    log(f"data: {len(id_train)} train / {len(id_test)} test ID samples, {len(ood_sets)} OOD sets "
        f"({time.perf_counter() - t0:.1f} s)")

    model = _model(config, checkpoint, id_train, cache, result, progress, log)
    detectors = list(config.detectors) or default_detectors()
    models = {"pretrained": (model, detectors, f"{config.model.spec}" + (f" ({checkpoint or config.model.checkpoint})"
                                                                          if (checkpoint or config.model.checkpoint) else ""))}
    outlier_spec = outliers or config.finetune.get("outliers")
    if config.finetune and outlier_spec:
        aux = open_spec(outlier_spec)
        result.auxiliary_outliers = f"{outlier_spec} ({len(aux)} samples)"
        for name, (m, description) in _finetuned(config, model, id_train, aux, cache, result, progress, log).items():
            models[name] = (m, [DetectorSpec(n) for n in FINETUNED_DETECTORS], description)
    elif config.finetune:
        result.notes.append("fine-tuned models not evaluated: no auxiliary outliers given ([finetune] outliers or --outliers)")

    common = dict(id_train=id_train, id_test=id_test, ood_sets=ood_sets, id_val=id_val, ood_validation=validation,
                  ood_samples=config.ood_samples, repeats=config.repeats, seed=config.seed, cache=cache / "outputs",
                  device=device, batch_size=batch_size, progress=progress)
    for name, (m, dets, description) in models.items():
        t = time.perf_counter()
        evaluate_model(result, name, m, detectors=dets, description=description, **common)
        log(f"{name}: {len(dets)} detectors evaluated in {time.perf_counter() - t:.1f} s")
        low = id_accuracy_warning(name, result.models[name].get("id_accuracy"), expected=config.expected_id_accuracy,
                                  num_classes=config.model.kwargs.get("num_classes"))
        if low:
            result.notes.append(low)
            warnings.warn(low, stacklevel=2)
    result.config["resolved"] = {"root": str(root or config.root), "checkpoint": str(checkpoint or config.model.checkpoint),
                                 "detectors": [asdict(d) for d in detectors]}
    result.timings["total"] = time.perf_counter() - t0
    return result

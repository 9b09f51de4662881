"""Self-contained image benchmarks (the built-in digits one, Fashion-MNIST): train, fine-tune, evaluate.

A :class:`Suite` names a benchmark's data (ID splits, OOD and covariate-shift sets, an open-set split,
auxiliary outliers), the models to train (:class:`ModelSpec`: the pre-trained classifier, its energy-
and OE-fine-tuned copies, ...) and the detectors each is evaluated with. :func:`run_suite` trains
every model (or loads it from the cache: ``cache_dir/models``, keyed by the data's fingerprint, the
recipe and the seed), evaluates it with :func:`ebood.bench.runner.evaluate_model` (one forward pass per
dataset, extracted outputs cached in ``cache_dir/outputs``, detector scores in ``cache_dir/scores``:
see :mod:`ebood.bench.score_cache`) and returns one
:class:`~ebood.bench.results.BenchResult`. A new model row is one more :class:`ModelSpec`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .._version import __version__
from ..state import StateError
from ..train import (BatchAugment, EnergyBoundedLoss, FinetunePreset, OutlierExposureLoss, finetune, load_weights,
                     save_weights, train_classifier)
from .config import DetectorSpec
from .results import BenchResult, describe_device
from .runner import OODSet, default_detectors, evaluate_model

__all__ = ["Suite", "ModelSpec", "OpenSet", "run_suite", "standard_models", "cached_model", "cache_key", "default_cache_dir",
           "torch_threads", "FINETUNED_DETECTORS"]

#: detectors evaluated on the fine-tuned models (their training targets the logit scores)
FINETUNED_DETECTORS = ("msp", "energy", "max_logit", "entropy")

_FROM_CACHE = " (scores from the cache; metrics recomputed)"

#: ``train(model, trained)``: train the freshly built ``model`` (``trained``: the suite's models trained before it).
TrainFn = Callable[[nn.Module, dict[str, nn.Module]], nn.Module]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (restored afterwards).

    The benchmarks' models are small: one thread is about as fast as two on an idle 2-core machine,
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


def cache_key(*parts: Any) -> str:
    """A short hash of ebood's version and ``parts`` (JSON): the file name of a cached model."""
    h = hashlib.sha256(json.dumps([__version__, *parts], sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def cached_model(cache: Path | None, key: str, build: Callable[[], nn.Module], train: Callable[[nn.Module], nn.Module],
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
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model, path, {"key": key, "label": label})
    return model.eval(), seconds


@dataclass(frozen=True)
class ModelSpec:
    """One model row of a suite: how to train it, what it is, and which detectors score it.

    ``key`` holds what defines the training besides the suite's data, recipe and seed (loss settings,
    ...); ``needs`` names models trained earlier whose weights it depends on (their keys enter its
    key). ``detectors``: ``None`` for the run's detectors (every registered one by default), else names.
    """

    name: str
    description: str
    train: TrainFn
    key: tuple[Any, ...] = ()
    needs: tuple[str, ...] = ()
    detectors: Sequence[str | DetectorSpec] | None = None
    #: record the training seconds in the model's results entry and a note (trained / loaded from the cache)
    report_training: bool = False


@dataclass(frozen=True)
class OpenSet:
    """An open-set split: a model trained on some classes only, with the others as near-OOD."""

    train: Any
    val: Any
    test: Any
    ood: Any
    ood_name: str
    ood_description: str
    model_description: str
    num_classes: int


@dataclass(frozen=True)
class Suite:
    """A self-contained benchmark: data (the fields of :class:`ebood.data.BuiltinBenchmark`), models and recipe."""

    name: str
    data: Any
    preset: FinetunePreset
    build: Callable[[int], nn.Module]
    model_name: str
    id_description: str
    models: tuple[ModelSpec, ...]
    open_set: OpenSet | None = None
    augment: BatchAugment | None = None
    config: dict[str, Any] = field(default_factory=dict)


def pretrain(data: Any, p: FinetunePreset, seed: int, progress: bool, augment: BatchAugment | None = None) -> Callable[[nn.Module], nn.Module]:
    """Training from scratch with the preset's ``pretrain`` recipe."""
    r = p.pretrain
    assert r is not None, f"preset {p.name} has no pretrain recipe"
    return lambda m: train_classifier(m, data, epochs=r.epochs, lr=r.lr, optimizer=r.optimizer, batch_size=r.batch_size,
                                      weight_decay=r.weight_decay, seed=seed, progress=progress, augment=augment)


def standard_models(id_train: Any, auxiliary: Any, preset: FinetunePreset, model_name: str, id_description: str, seed: int,
                    progress: bool, finetuned: bool = True, finetune_data: Any = None,
                    augment: BatchAugment | None = None) -> tuple[ModelSpec, ...]:
    """The energy paper's table: the pre-trained classifier, and its copies fine-tuned with the energy-bounded
    loss and with Outlier Exposure on the auxiliary outliers (``finetune_data``: the ID data of fine-tuning,
    default ``id_train``)."""
    models = [ModelSpec("pretrained", f"{model_name} trained with cross-entropy on the {id_description} training split",
                        lambda m, _: pretrain(id_train, preset, seed, progress, augment)(m),
                        key=(asdict(preset.pretrain) if preset.pretrain else None, augment.config() if augment else None))]
    if not finetuned:
        return tuple(models)
    e, o = preset.energy, preset.oe
    ft_data = id_train if finetune_data is None else finetune_data
    for name, loss, what in (
        ("energy_finetuned", lambda: EnergyBoundedLoss(**e),
         f"the energy-bounded loss (m_in={e['m_in']}, m_out={e['m_out']}, weight={e['weight']})"),
        ("oe_finetuned", lambda: OutlierExposureLoss(**o), f"Outlier Exposure (weight={o['weight']})"),
    ):
        def run(model: nn.Module, trained: dict[str, nn.Module], loss: Callable[[], Any] = loss) -> nn.Module:
            model.load_state_dict(trained["pretrained"].state_dict())
            return finetune(model, ft_data, auxiliary, loss(), epochs=preset.epochs, lr=preset.lr, lr_min=preset.lr_min,
                            momentum=preset.momentum, nesterov=preset.nesterov, weight_decay=preset.weight_decay,
                            id_batch_size=preset.id_batch_size, outlier_batch_size=preset.outlier_batch_size, seed=seed,
                            progress=progress, augment=augment)

        size = "" if finetune_data is None else f" ({len(ft_data)} ID images)"
        models.append(ModelSpec(name, f"fine-tuned{size} with {what} on the auxiliary outliers", run,
                                key=({k: v for k, v in asdict(preset).items() if k != "pretrain"}, augment.config() if augment else None,
                                     getattr(auxiliary, "fingerprint", None), getattr(ft_data, "fingerprint", None)),
                                needs=("pretrained",), detectors=FINETUNED_DETECTORS))
    return tuple(models)


def _register_sets(result: BenchResult, sets: dict[str, OODSet]) -> None:
    for name, s in sets.items():
        result.ood_sets[name] = {"group": s.group, "n": len(s.data), "description": s.description}


def run_suite(suite: Suite, *, seed: int, cache: Path, detectors: Sequence[DetectorSpec] | None, progress: bool,
              log: Callable[[str], None], started: float | None = None) -> BenchResult:
    """Train (or load) every model of ``suite``, evaluate it, and return the results (not yet saved)."""
    t0 = time.perf_counter() if started is None else started
    data = suite.data
    result = BenchResult(benchmark=suite.name, seed=seed, device=describe_device(), positive="id",
                         auxiliary_outliers=data.auxiliary_description)
    chosen = list(detectors) if detectors else default_detectors()
    result.config = {"benchmark": suite.name, "seed": seed, "recipe": asdict(suite.preset), "id": suite.id_description,
                     "detectors": [d.title for d in chosen], "finetuned_detectors": list(FINETUNED_DETECTORS), **suite.config}
    ood_sets = {name: OODSet(ds, data.groups[name], data.descriptions.get(name, "")) for name, ds in data.ood.items()}
    ood_sets.update({name: OODSet(ds, "covariate", data.descriptions.get(name, "")) for name, ds in data.covariate.items()})
    _register_sets(result, ood_sets)

    trained: dict[str, nn.Module] = {}
    keys: dict[str, str] = {}
    from_cache: list[str] = []
    for spec in suite.models:
        key = cache_key(spec.name, data.train.fingerprint, *spec.key, [keys[n] for n in spec.needs], seed)
        model, secs = cached_model(cache, key, lambda: suite.build(data.num_classes), lambda m, s=spec: s.train(m, trained), log,
                                   f"{spec.name} {suite.model_name}", seed=seed)
        result.timings["training"] += secs
        trained[spec.name], keys[spec.name] = model, key
        dets = chosen if spec.detectors is None else [d if isinstance(d, DetectorSpec) else DetectorSpec(d) for d in spec.detectors]
        t = time.perf_counter()
        cached = evaluate_model(result, spec.name, model, id_train=data.train, id_test=data.test, ood_sets=ood_sets, detectors=dets,
                                id_val=data.val, ood_validation={"auxiliary": data.auxiliary}, seed=seed, cache=cache / "outputs",
                                progress=progress, description=spec.description, score_cache=cache / "scores")
        if spec.report_training:
            result.models[spec.name]["training_seconds"] = round(secs, 2)
            result.notes.append(f"{spec.name}: trained in {secs:.1f} s" if secs else f"{spec.name}: loaded from the cache")
        log(f"{spec.name}: {len(dets)} detectors evaluated in {time.perf_counter() - t:.1f} s{_FROM_CACHE if cached else ''}")
        if cached:
            from_cache.append(spec.name)

    if suite.open_set is not None and _evaluate_open_set(suite, seed, cache, chosen, result, progress, log):
        from_cache.append("openset")
    if from_cache:
        result.notes.append(f"detector scores of {', '.join(from_cache)} from the cache ({cache / 'scores'}): metrics recomputed, "
                            "nothing fitted or scored in this run's timings")
    result.timings["total"] = time.perf_counter() - t0
    return result


def _evaluate_open_set(suite: Suite, seed: int, cache: Path, detectors: Sequence[DetectorSpec], result: BenchResult,
                       progress: bool, log: Callable[[str], None]) -> bool:
    """Train (or load) and evaluate the open-set model; returns whether its scores came from the cache."""
    split = suite.open_set
    assert split is not None
    recipe = asdict(suite.preset.pretrain) if suite.preset.pretrain else None
    key = cache_key("openset", split.train.fingerprint, recipe, suite.augment.config() if suite.augment else None, seed)
    model, secs = cached_model(cache, key, lambda: suite.build(split.num_classes), pretrain(split.train, suite.preset, seed, progress, suite.augment),
                               log, f"open-set {suite.model_name}", seed=seed)
    result.timings["training"] += secs
    sets = {split.ood_name: OODSet(split.ood, "near", split.ood_description)}
    _register_sets(result, sets)
    t = time.perf_counter()
    cached = evaluate_model(result, "openset", model, id_train=split.train, id_test=split.test, ood_sets=sets, detectors=detectors,
                            id_val=split.val, ood_validation={"auxiliary": suite.data.auxiliary}, seed=seed, cache=cache / "outputs",
                            progress=progress, description=split.model_description, score_cache=cache / "scores")
    log(f"openset: {len(detectors)} detectors evaluated in {time.perf_counter() - t:.1f} s{_FROM_CACHE if cached else ''}")
    return cached

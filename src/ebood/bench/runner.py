"""The benchmark runner: one pass per dataset, every detector fitted and scored, metrics as rows.

:func:`evaluate_model` is the step every benchmark repeats for each model (pre-trained,
energy-fine-tuned, OE-fine-tuned, ...): it calls :func:`ebood.evaluate_detectors` (the model runs
once per dataset, whatever the number of detectors), selects grid hyperparameters on validation OOD
sets that are disjoint from the test sets, averages metrics over OOD subsamples when the protocol asks
for repeats, and appends flat rows to a :class:`~ebood.bench.results.BenchResult`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .. import metrics as _metrics
from ..detectors import available, get
from ..evaluation import evaluate_detectors
from .config import DetectorSpec
from .results import BenchResult
from .score_cache import CachedScores, load_scores, save_scores, scores_key

__all__ = ["OODSet", "evaluate_model", "default_detectors", "candidate_label", "subsampled_metrics",
           "id_accuracy_warning", "ACCURACY_MARGIN", "failure_metrics", "CORRECT_KEY"]

VALIDATION_PREFIX = "val:"
#: scores.safetensors key of a model's ID test correctness (1 = right), read back by the report's
#: risk-coverage curves (ebood.report.results.correct_key)
CORRECT_KEY = "{model}/id_correct"

#: how far (in accuracy, as a fraction) a model may fall below the benchmark's expected ID accuracy
#: before the run warns: OOD numbers of a model that does not classify its own data mean little
ACCURACY_MARGIN = 0.15


@dataclass(frozen=True)
class OODSet:
    """An OOD test set of a benchmark: its data, its group (near / far / covariate) and a description."""

    data: Any
    group: str
    description: str = ""


def default_detectors(*, model_level: bool = True) -> list[DetectorSpec]:
    """Every registered detector with its default hyperparameters (model-level ones optional)."""
    specs = []
    for name in available():
        if not model_level and "model" in get(name).requires:
            continue
        specs.append(DetectorSpec(name=name))
    return specs


def id_accuracy_warning(model_name: str, accuracy: float | None, *, expected: float | None = None,
                        num_classes: int | None = None) -> str | None:
    """A warning when ``accuracy`` is far below what the benchmark expects, else None.

    With ``expected`` (a preset's ``expected_id_accuracy``): below ``expected - ACCURACY_MARGIN``.
    Without it: below twice chance (``2 / num_classes``), which no trained classifier should be.
    """
    if accuracy is None:
        return None
    if expected is not None:
        if accuracy < expected - ACCURACY_MARGIN:
            return (f"{model_name}: ID accuracy {100 * accuracy:.1f}% is far below the {100 * expected:.1f}% this benchmark "
                    f"expects (expected_id_accuracy); check the checkpoint, the preprocessing (mean / std) and the "
                    f"training settings before reading its OOD numbers")
        return None
    if num_classes and num_classes > 1 and accuracy < 2.0 / num_classes:
        return (f"{model_name}: ID accuracy {100 * accuracy:.1f}% is close to chance ({100 / num_classes:.1f}% for "
                f"{num_classes} classes); check the checkpoint, the preprocessing and the training settings before "
                f"reading its OOD numbers")
    return None


def candidate_label(spec: DetectorSpec, params: Mapping[str, Any]) -> str:
    """The label of one grid candidate, e.g. ``react[percentile=85]`` (the name when no grid)."""
    if not spec.grid:
        return spec.title
    return spec.title + "[" + ",".join(f"{k}={params[k]}" for k in spec.grid) + "]"


def subsampled_metrics(id_scores: torch.Tensor, ood_scores: torch.Tensor, *, samples: int | None, repeats: int,
                       seed: int, tpr: float = 0.95, positive: str = "id") -> dict[str, float]:
    """Metrics averaged over ``repeats`` random subsets of ``samples`` OOD scores (all when None).

    The energy paper's protocol: 2,000 OOD samples per set, metrics averaged over repeats.
    """
    ood = ood_scores.double().numpy()
    if samples is None or samples >= ood.size:
        return _metrics.evaluate(id_scores, ood, tpr=tpr, positive=positive)
    rng = np.random.default_rng(seed)
    runs = [_metrics.evaluate(id_scores, ood[rng.choice(ood.size, samples, replace=False)], tpr=tpr, positive=positive)
            for _ in range(repeats)]
    return {k: float(np.mean([r[k] for r in runs])) for k in _metrics.METRIC_NAMES}


def failure_metrics(id_scores: torch.Tensor, correct: torch.Tensor | None, ood_scores: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per OOD set: ``misclf_auroc`` and ``aurc`` of the ID test predictions (the same for every set)
    and ``failure_aurc`` over ID + that set with OOD counted as failures; ``{}`` when the ID
    correctness is unknown or has a single class."""
    if correct is None or bool(correct.all()) or not bool(correct.any()):
        return {}
    ok = correct.numpy()
    on_id = {"misclf_auroc": _metrics.misclassification(id_scores, ok)["auroc"], "aurc": _metrics.aurc(id_scores, ok)}
    return {name: {**on_id, "failure_aurc": _metrics.failure(id_scores, ok, s)["aurc"]} for name, s in ood_scores.items()}


def _select(spec: DetectorSpec, scores: Mapping[str, Mapping[str, torch.Tensor]], val_sets: Sequence[str],
            tpr: float, positive: str) -> dict[str, Any]:
    """The grid candidate with the lowest mean FPR on the validation OOD sets (ties: higher AUROC)."""
    best: tuple[float, float] | None = None
    chosen = spec.candidates()[0]
    for params in spec.candidates():
        per_set = scores[candidate_label(spec, params)]
        ms = [_metrics.evaluate(per_set["id_test"], per_set[v], tpr=tpr, positive=positive) for v in val_sets]
        key = (float(np.mean([m["fpr95"] for m in ms])), -float(np.mean([m["auroc"] for m in ms])))
        if best is None or key < best:
            best, chosen = key, params
    return chosen


def _finite(name: str, set_name: str, s: torch.Tensor) -> bool:
    if bool(torch.isfinite(s).all()):
        return True
    warnings.warn(f"detector {name!r} gave {int((~torch.isfinite(s)).sum())} non-finite scores on {set_name!r}; its row is left out",
                  RuntimeWarning, stacklevel=3)
    return False


def _seeded(name: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Give a stochastic detector (one with a ``seed`` hyperparameter) the benchmark's seed unless
    the config sets one, so that a run's numbers do not depend on how much of torch's global random
    stream training used (a cached model trains nothing)."""
    if "seed" in params or "seed" not in get(name).hyperparameter_names():
        return dict(params)
    return {**params, "seed": seed}


def evaluate_model(
    result: BenchResult,
    model_name: str,
    model: nn.Module,
    *,
    id_train: Any,
    id_test: Any,
    ood_sets: Mapping[str, OODSet],
    detectors: Sequence[DetectorSpec],
    id_val: Any = None,
    ood_validation: Mapping[str, Any] | None = None,
    ood_samples: int | None = None,
    repeats: int = 1,
    seed: int = 0,
    cache: Any = None,
    device: Any = None,
    batch_size: int | None = None,
    progress: bool = True,
    description: str = "",
    score_cache: str | Path | None = None,
) -> bool:
    """Evaluate ``detectors`` on ``model`` and append the rows and raw scores to ``result``.

    ``score_cache``: a folder of cached detector scores (:mod:`ebood.bench.score_cache`): the scores
    are read from it when this model, data, detectors and scoring code were evaluated before, and
    written to it otherwise; the metrics are always recomputed. Returns whether the scores came
    from that cache.
    """
    ood_validation = dict(ood_validation or {})
    has_grid = any(len(d.candidates()) > 1 for d in detectors)
    if has_grid and not ood_validation:
        raise ValueError("a detector has a hyperparameter grid, but the benchmark gives no validation OOD sets "
                         "([data.ood_validation]) to select on; test sets are never used for selection")
    instances: list[tuple[str, dict[str, Any]]] = []
    for spec in detectors:
        for params in spec.candidates():
            instances.append((candidate_label(spec, params), {"name": spec.name, **_seeded(spec.name, params, seed)}))
    all_sets = {name: s.data for name, s in ood_sets.items()}
    all_sets.update({VALIDATION_PREFIX + name: data for name, data in ood_validation.items()} if has_grid else {})
    model_val = list(ood_validation.values()) if id_val is not None and ood_validation else None
    specs = [spec for _, spec in instances]

    def run() -> CachedScores:
        ev = evaluate_detectors(
            model, id_train, id_test, all_sets, specs,
            id_val=id_val if model_val is not None else None, ood_val=model_val,
            cache=cache, device=device, batch_size=batch_size, progress=progress, positive=result.positive,
            keep_outputs=False,
        )
        # evaluate_detectors labels instances by name; the benchmark's labels carry the grid values
        labels = dict(zip(ev.scores, (label for label, _ in instances)))
        fit = {labels[k]: secs for k, secs in ev.fit_seconds.items() if k in labels}
        return CachedScores({labels[k]: v for k, v in ev.scores.items()}, ev.id_accuracy, ev.id_correct, fit, ev.timings, ev.tpr)

    entry_path = None
    if score_cache is not None:
        key = scores_key(model, {"id_train": id_train, "id_test": id_test, "id_val": id_val if model_val is not None else None,
                                 "ood_val": model_val, **all_sets}, instances,
                         positive=result.positive, batch_size=batch_size, device=str(device))
        entry_path = Path(score_cache) / f"{key}.safetensors" if key is not None else None
    evaluation = load_scores(entry_path) if entry_path is not None else None
    if evaluation is None:
        evaluation = run()
        if entry_path is not None:
            try:
                save_scores(entry_path, evaluation)
            except OSError as exc:  # the scores are computed: a cache that cannot be written costs only time
                warnings.warn(f"detector scores not cached: {exc}", RuntimeWarning, stacklevel=2)
    if not evaluation.cached:
        result.add_timings(evaluation.timings)
    scores = evaluation.scores
    fit_seconds = {label: round(secs, 3) for label, secs in evaluation.fit_seconds.items()}
    result.models[model_name] = {"id_accuracy": evaluation.id_accuracy, "description": description, "fit_seconds": fit_seconds}
    if evaluation.id_correct is not None:
        result.scores[CORRECT_KEY.format(model=model_name)] = evaluation.id_correct.to(torch.float32)
    val_names = [VALIDATION_PREFIX + v for v in ood_validation] if has_grid else []
    for spec in detectors:
        params = _select(spec, scores, val_names, evaluation.tpr, result.positive) if len(spec.candidates()) > 1 else spec.candidates()[0]
        if spec.grid:
            result.selected[f"{model_name}/{spec.title}"] = {k: params[k] for k in spec.grid}
        per_set = scores[candidate_label(spec, params)]
        result.scores[f"{model_name}/{spec.title}/id_test"] = per_set["id_test"]
        if not _finite(spec.title, "id_test", per_set["id_test"]):
            continue
        finite_sets = {n: per_set[n] for n in ood_sets if bool(torch.isfinite(per_set[n]).all())}
        failure = failure_metrics(per_set["id_test"], evaluation.id_correct, finite_sets)
        for set_name, ood in ood_sets.items():
            s = per_set[set_name]
            result.scores[f"{model_name}/{spec.title}/{set_name}"] = s
            if not _finite(spec.title, set_name, s):
                continue
            m = subsampled_metrics(per_set["id_test"], s, samples=ood_samples, repeats=repeats, seed=seed,
                                   tpr=evaluation.tpr, positive=result.positive)
            result.rows.append({"model": model_name, "detector": spec.title, "ood_set": set_name, "group": ood.group, **m,
                                **failure.get(set_name, {})})
    return evaluation.cached

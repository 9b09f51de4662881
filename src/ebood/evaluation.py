"""Evaluate many detectors with one pass of the model over each dataset.

``ebood.evaluate_detectors(model, id_train, id_test, ood_sets, detectors)`` is the engine behind
benchmarks: it runs the model once per dataset (:func:`ebood.extract`, from the cache when one is
given), fits every post-hoc detector on the ID training outputs, scores every detector on the ID
test set and each OOD set, and returns the metrics of :func:`ebood.metrics.evaluate` with the raw
scores. Detectors that need the model (``requires = ("model",)``: ODIN, GradNorm, ...) score the
batches of that same pass, so adding post-hoc detectors costs no extra forward pass.

Order of the work:

1. ``id_train`` is extracted once (only when some detector needs fitting), with every layer that
   a model-level detector fits on (``det.fit_layers(model)``, e.g. ``mahalanobis_ensemble``).
2. Post-hoc detectors are fitted on those outputs (penultimate features only, unless ``layers``
   was given); model-level detectors on the same outputs (``fit_outputs``) or, for those that
   cannot, with their own pass (``fit_inputs``). With ``id_val`` and ``ood_val``, detectors that
   learn from validation data (``fit_validation``; the ensemble weights of
   ``mahalanobis_ensemble``) are fitted on them.
3. ``id_test`` and each OOD set are read once: the extraction's forward pass feeds the post-hoc
   detectors, and each batch is handed to the model-level detectors in the same iteration.

Timings are wall-clock seconds: ``extraction`` (forward passes and data loading), ``fitting``,
``scoring`` (post-hoc scoring plus the model-level detectors' own passes) and ``total``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from . import metrics as _metrics
from .detectors import DegenerateFitError, Detector, NonFiniteError, create
from .extraction import PENULTIMATE, ExtractionError, extract, on_device, resolve_device
from .outputs import Outputs

__all__ = ["evaluate_detectors", "EvaluationResult", "DetectorSpec", "make_detectors"]

ID_TEST = "id_test"

#: A detector given by name, (name, hyperparameters), {"name": ..., **hyperparameters} or as an instance.
DetectorSpec = str | tuple[str, Mapping[str, Any]] | Mapping[str, Any] | Detector


@dataclass
class EvaluationResult:
    """What :func:`evaluate_detectors` measured.

    * ``metrics[detector][ood_set]``: ``{"fpr95", "auroc", "aupr_in", "aupr_out"}`` (fractions).
    * ``scores[detector][set]``: 1-D float tensors (CPU) for ``"id_test"`` and every OOD set.
    * ``detectors[label]``: the fitted detectors (labels are names, with hyperparameters
      appended when one name appears twice).
    * ``id_accuracy``: top-1 accuracy of the logits on the labelled ID test samples (or ``None``).
    * ``id_correct``: whether each ID test prediction (``argmax`` of the logits) was right, a bool
      tensor (``None`` without labels, or when some are unknown): the input of the failure metrics.
    * ``timings``: seconds spent in ``extraction``, ``fitting``, ``scoring`` and in ``total``.
    * ``outputs``: the extracted outputs per dataset (``"id_train"``, ``"id_test"``, OOD sets),
      kept when ``keep_outputs`` is true.
    * ``fit_seconds[detector]``: wall-clock seconds of each detector's fit (those that were fitted).
    """

    metrics: dict[str, dict[str, dict[str, float]]]
    scores: dict[str, dict[str, torch.Tensor]]
    detectors: dict[str, Detector]
    id_accuracy: float | None
    timings: dict[str, float]
    outputs: dict[str, Outputs] = field(default_factory=dict, repr=False)
    tpr: float = 0.95
    positive: str = "id"
    fit_seconds: dict[str, float] = field(default_factory=dict)
    id_correct: torch.Tensor | None = None

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per (detector, OOD set): ``detector``, ``ood_set`` and the four metrics."""
        return [{"detector": det, "ood_set": name, **values} for det, per_set in self.metrics.items() for name, values in per_set.items()]

    def mean(self, detector: str) -> dict[str, float]:
        """The metrics of ``detector`` averaged over the OOD sets."""
        per_set = self.metrics[detector]
        return {k: sum(v[k] for v in per_set.values()) / len(per_set) for k in _metrics.METRIC_NAMES}

    def table(self, detector: str) -> Any:
        """A rich table of ``detector``'s metrics per OOD set with the mean row (see ebood.tables)."""
        from .tables import metrics_table

        return metrics_table(self.metrics[detector], self.mean(detector), tpr=self.tpr, positive=self.positive, title=detector)


# ----- detector specs ----------------------------------------------------------------------------


def _one_detector(spec: DetectorSpec) -> Detector:
    if isinstance(spec, Detector):
        return spec
    if isinstance(spec, str):
        return create(spec)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return create(spec[0], **dict(spec[1]))
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"a detector given as a dict needs a 'name' key, got keys {', '.join(map(str, spec))}")
        params = {k: v for k, v in spec.items() if k not in ("name", "params")}
        params.update(spec.get("params", {}))
        return create(spec["name"], **params)
    raise TypeError(f"cannot make a detector from {spec!r}: give a name, (name, params), a dict with 'name' or a Detector")


def make_detectors(specs: DetectorSpec | Sequence[DetectorSpec]) -> dict[str, Detector]:
    """Detectors by unique label: the registry name, with hyperparameters appended for repeated names."""
    if isinstance(specs, (str, Detector, Mapping)) or (isinstance(specs, tuple) and len(specs) == 2 and isinstance(specs[1], Mapping)):
        specs = [specs]  # type: ignore[list-item]
    dets = [_one_detector(s) for s in specs]  # type: ignore[union-attr]
    if not dets:
        raise ValueError("no detectors given")
    names = [d.name for d in dets]
    out: dict[str, Detector] = {}
    for d in dets:
        label = d.name
        if names.count(d.name) > 1:
            label = f"{d.name}(" + ", ".join(f"{k}={v!r}" for k, v in d.get_params().items()) + ")"
        if label in out:
            raise ValueError(f"detector {label} is given twice")
        out[label] = d
    return out


def _is_model_level(det: Detector) -> bool:
    return "model" in det.requires


def _needs_training_data(det: Detector) -> bool:
    return bool(det.needs_fit)


# ----- the pass ----------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.extraction = 0.0
        self.fitting = 0.0
        self.scoring = 0.0
        self.per_detector: dict[str, float] = {}


def _penultimate_only(out: Outputs) -> Outputs:
    if not isinstance(out.features, dict):
        return out
    feats = out.features.get(PENULTIMATE)
    return Outputs(logits=out.logits, features=feats, labels=out.labels, head=out.head if feats is not None else None)


def _accuracy(out: Outputs) -> float | None:
    if out.labels is None or out.logits is None:
        return None
    keep = out.labels >= 0
    if not bool(keep.any()):
        return None
    return float((out.logits[keep].argmax(dim=1) == out.labels[keep]).double().mean())


def _scores_or_nan(label: str, set_name: str, n: int, score: Any) -> torch.Tensor:
    """``score()``, or NaN for every sample (and a warning) when the detector refuses non-finite
    data or its fit is degenerate: one detector's refusal must not take the other detectors'
    results with it."""
    try:
        return score()
    except NonFiniteError as exc:
        warnings.warn(f"{set_name}: {exc}", RuntimeWarning, stacklevel=3)
    except DegenerateFitError as exc:  # a property of the fit: one message for every set, shown once
        warnings.warn(f"{exc}; its scores are NaN on every set", RuntimeWarning, stacklevel=3)
    return torch.full((n,), math.nan)


def _correct(out: Outputs) -> torch.Tensor | None:
    if out.labels is None or out.logits is None or not bool((out.labels >= 0).all()):
        return None
    return (out.logits.argmax(dim=1) == out.labels).cpu()


def _set_metrics(label: str, name: str, per_set: Mapping[str, torch.Tensor], tpr: float, positive: str) -> dict[str, float]:
    """Metrics of one detector on one OOD set; NaN (and a warning) where its scores are not finite.

    One detector that breaks on some data must not take the other detectors' results with it.
    """
    id_s, ood_s = per_set[ID_TEST], per_set[name]
    bad = int((~torch.isfinite(id_s)).sum() + (~torch.isfinite(ood_s)).sum())
    if bad:
        warnings.warn(f"detector {label!r} gave {bad} non-finite score(s) on id_test / {name!r}; its metrics there are NaN",
                      RuntimeWarning, stacklevel=3)
        return {k: math.nan for k in _metrics.METRIC_NAMES}
    return _metrics.evaluate(id_s, ood_s, tpr=tpr, positive=positive)  # type: ignore[arg-type]


def evaluate_detectors(
    model: nn.Module,
    id_train: Any,
    id_test: Any,
    ood_sets: Mapping[str, Any],
    detectors: DetectorSpec | Sequence[DetectorSpec],
    *,
    id_val: Any = None,
    ood_val: Any = None,
    cache: str | Path | None = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    amp: bool | str | torch.dtype | None = None,
    output: Any = None,
    layers: Sequence[str] | None = None,
    progress: bool = True,
    tpr: float = 0.95,
    positive: str = "id",
    keep_outputs: bool = True,
    result_device: str | torch.device = "cpu",
) -> EvaluationResult:
    """Fit and evaluate ``detectors`` on ``model`` with one pass over each dataset.

    ``id_train``, ``id_test`` and the values of ``ood_sets`` (name -> data) are anything
    :func:`ebood.extract` reads (Dataset, DataLoader, arrays). ``id_train`` may be ``None`` when no
    detector needs fitting. ``detectors``: names, ``(name, params)`` pairs, ``{"name": ..., **params}``
    dicts or Detector instances (fitted in place). ``id_val`` / ``ood_val`` (a dataset, or a
    list / dict of them): validation data for detectors that learn from it. ``cache``, ``device``,
    ``batch_size``, ``amp``, ``output``, ``progress`` and ``result_device`` are passed to
    :func:`ebood.extract` (``result_device="cuda"`` keeps the outputs on the GPU, so the post-hoc
    detectors fit and score there too);
    ``layers`` extracts extra layers for post-hoc detectors (they then receive feature dicts).
    ``tpr`` and ``positive`` are those of :func:`ebood.metrics.evaluate`.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(ood_sets, Mapping) or not ood_sets:
        raise ValueError("ood_sets must be a non-empty dict of name -> data")
    reserved = {ID_TEST, "id_train"} & set(ood_sets)
    if reserved:
        raise ValueError(f"OOD set name(s) {', '.join(map(repr, sorted(reserved)))} are reserved; rename them")
    dets = make_detectors(detectors)
    post_hoc = {k: d for k, d in dets.items() if not _is_model_level(d)}
    model_level = {k: d for k, d in dets.items() if _is_model_level(d)}
    if (id_val is None) != (ood_val is None) and any(hasattr(d, "fit_validation") for d in model_level.values()):
        raise ValueError("give both id_val and ood_val (validation data for the ensemble weights), or neither")

    dev = resolve_device(model, device)
    clock = _Clock()
    common = dict(batch_size=batch_size, amp=amp, cache=cache, progress=progress, output=output, result_device=result_device)
    kept: dict[str, Outputs] = {}

    with on_device(model, dev):
        # 1-2. fit on the ID training outputs
        if any(_needs_training_data(d) for d in dets.values()):
            if id_train is None:
                raise ValueError("id_train is None, but detector(s) " + ", ".join(k for k, d in dets.items() if d.needs_fit) + " need fitting")
            train = _extract_train(model, id_train, model_level, layers, clock, common)
            if keep_outputs:
                kept["id_train"] = train
            _fit_all(model, train, id_train, id_val, ood_val, post_hoc, model_level, layers, clock, batch_size, output)

        # 3. one pass per test set: extraction + model-level scores of the same batches
        raw: dict[str, dict[str, torch.Tensor]] = {k: {} for k in dets}
        id_outputs = None
        for set_name, data in [(ID_TEST, id_test), *ood_sets.items()]:
            outs, model_scores = _extract_and_score(model, data, set_name, model_level, layers, clock, common, output)
            if set_name == ID_TEST:
                id_outputs = outs
            if keep_outputs:
                kept[set_name] = outs
            for label, s in model_scores.items():
                raw[label][set_name] = s
            t0 = time.perf_counter()
            for label, det in post_hoc.items():
                view = outs if layers is not None else _penultimate_only(outs)
                raw[label][set_name] = _scores_or_nan(label, set_name, len(outs), lambda: det.score(view).detach().cpu())
            clock.scoring += time.perf_counter() - t0

    table = {label: {name: _set_metrics(label, name, per_set, tpr, positive) for name in ood_sets} for label, per_set in raw.items()}
    timings = {"extraction": clock.extraction, "fitting": clock.fitting, "scoring": clock.scoring, "total": time.perf_counter() - start}
    return EvaluationResult(metrics=table, scores=raw, detectors=dets, id_accuracy=_accuracy(id_outputs) if id_outputs is not None else None,
                            timings=timings, outputs=kept, tpr=tpr, positive=positive, fit_seconds=dict(clock.per_detector),
                            id_correct=_correct(id_outputs) if id_outputs is not None else None)


def _extract_train(model: nn.Module, id_train: Any, model_level: dict[str, Detector], layers: Sequence[str] | None, clock: _Clock,
                   common: dict[str, Any]) -> Outputs:
    wanted: list[str] = list(layers or [])
    for det in model_level.values():
        if det.needs_fit:
            extra = det.fit_layers(model)  # type: ignore[attr-defined]
            wanted += [n for n in (extra or []) if n not in wanted]
    t0 = time.perf_counter()
    train = extract(model, id_train, layers=wanted or None, **common)
    clock.extraction += time.perf_counter() - t0
    return train


def _fit_all(model: nn.Module, train: Outputs, id_train: Any, id_val: Any, ood_val: Any, post_hoc: dict[str, Detector],
             model_level: dict[str, Detector], layers: Sequence[str] | None, clock: _Clock, batch_size: int | None, output: Any) -> None:
    t0 = time.perf_counter()
    fit_view = train if layers is not None else _penultimate_only(train)
    for label, det in post_hoc.items():
        if det.needs_fit:
            t = time.perf_counter()
            det.fit(fit_view)
            clock.per_detector[label] = time.perf_counter() - t
    for label, det in model_level.items():
        if not det.needs_fit:
            continue
        t = time.perf_counter()
        wanted = det.fit_layers(model)  # type: ignore[attr-defined]
        if wanted is not None:
            det.fit_outputs(train, layers=wanted)  # type: ignore[attr-defined]
        else:
            det.fit_inputs(model, id_train, batch_size=batch_size, output=output)  # type: ignore[attr-defined]
        if id_val is not None and ood_val is not None and hasattr(det, "fit_validation"):
            det.fit_validation(model, id_val, ood_val, batch_size=batch_size, output=output)
        clock.per_detector[label] = time.perf_counter() - t
    clock.fitting += time.perf_counter() - t0


def _extract_and_score(model: nn.Module, data: Any, set_name: str, model_level: dict[str, Detector], layers: Sequence[str] | None,
                       clock: _Clock, common: dict[str, Any], output: Any) -> tuple[Outputs, dict[str, torch.Tensor]]:
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in model_level}
    spent = [0.0]

    def on_batch(x: torch.Tensor, y: torch.Tensor | None) -> None:
        t = time.perf_counter()
        for label, det in model_level.items():
            score = lambda: det.score_inputs(model, x, output=output).cpu()  # type: ignore[attr-defined]  # noqa: E731
            parts[label].append(_scores_or_nan(label, set_name, x.shape[0], score))
        spent[0] += time.perf_counter() - t

    t0 = time.perf_counter()
    try:
        outs = extract(model, data, layers=layers, on_batch=on_batch if model_level else None, **common)
    except ExtractionError as exc:
        raise ExtractionError(f"{set_name}: {exc}") from exc
    total = time.perf_counter() - t0
    clock.extraction += total - spent[0]
    clock.scoring += spent[0]
    scores = {k: torch.cat(v) for k, v in parts.items()}
    for label, s in scores.items():
        if s.shape[0] != len(outs):
            raise RuntimeError(f"{label}: scored {s.shape[0]} inputs of {set_name} but {len(outs)} were extracted")
    return outs, scores

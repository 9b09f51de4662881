"""A benchmark results directory, read and checked: ``results.json`` and ``scores.safetensors``.

The layout is the one the benchmark runner writes (``/work/notes/interfaces.md``)::

    results.json        metadata + "rows": one object per (model, detector, OOD set), metrics as fractions
    scores.safetensors  float32 1-D tensors keyed "{model}/{detector}/{set}", set = OOD set or "id_test",
                        and "{model}/id_correct" (1 = the ID test prediction was right) when labels are known

Everything here is plain data: the HTML report and the terminal table both build on :class:`Results`.
Group means follow the energy paper (Liu, Wang, Owens & Li, NeurIPS 2020): the mean of a metric over
the OOD sets of a group; covariate-shift sets are reported beside them and never enter a mean.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..metrics import METRIC_NAMES

__all__ = ["ReportError", "Results", "load_results", "read_scores", "MEAN_COLUMNS", "OOD_GROUPS", "FAILURE_METRICS"]

RESULTS_FILE = "results.json"
SCORES_FILE = "scores.safetensors"
ID_KEY = "id_test"

#: groups whose sets are out-of-distribution (and so enter the means), in display order
OOD_GROUPS = ("near", "far")
GROUPS = OOD_GROUPS + ("covariate",)

#: optional row metrics of failure detection (docs/failure.md); absent in older results
FAILURE_METRICS = ("misclf_auroc", "aurc", "failure_aurc")

#: summary columns: (key, label, groups averaged)
MEAN_COLUMNS = (("near", "near-OOD mean", ("near",)), ("far", "far-OOD mean", ("far",)), ("all", "OOD mean", OOD_GROUPS))


class ReportError(ValueError):
    """A results directory that cannot be rendered; the message names the file and the problem."""


@dataclass(frozen=True)
class Row:
    model: str
    detector: str
    ood_set: str
    group: str
    metrics: dict[str, float]


@dataclass
class Results:
    """``results.json`` checked and indexed.

    ``models`` / ``detectors`` / ``sets`` keep the order of first appearance in the rows (the runner's
    order, which is the paper's: MSP, energy, ..., then the fine-tuned models).
    """

    directory: Path
    raw: dict[str, Any]
    rows: list[Row]
    models: list[str]
    pairs: list[tuple[str, str]]  # (model, detector) in row order
    sets: list[str]
    set_groups: dict[str, str]
    values: dict[tuple[str, str, str], dict[str, float]] = field(repr=False)

    # ---- metadata with defaults -------------------------------------------------------------
    @property
    def benchmark(self) -> str:
        return str(self.raw.get("benchmark") or self.directory.name)

    @property
    def config(self) -> Mapping[str, Any]:
        config = self.raw.get("config")
        return config if isinstance(config, Mapping) else {}

    @property
    def positive(self) -> str:
        """Which class the FPR column treats as positive: ``"id"`` (energy paper) or ``"ood"`` (OpenOOD)."""
        return "ood" if self.config.get("positive") == "ood" else "id"

    @property
    def tpr(self) -> float:
        tpr = self.config.get("tpr", 0.95)
        return float(tpr) if isinstance(tpr, (int, float)) and 0 < tpr <= 1 else 0.95

    def model_info(self, model: str) -> Mapping[str, Any]:
        models = self.raw.get("models")
        info = models.get(model) if isinstance(models, Mapping) else None
        return info if isinstance(info, Mapping) else {}

    def id_accuracy(self, model: str) -> float | None:
        value = self.model_info(model).get("id_accuracy")
        return float(value) if _is_number(value) else None

    def set_info(self, name: str) -> Mapping[str, Any]:
        sets = self.raw.get("ood_sets")
        info = sets.get(name) if isinstance(sets, Mapping) else None
        return info if isinstance(info, Mapping) else {}

    # ---- the numbers ------------------------------------------------------------------------
    def detectors_of(self, model: str) -> list[str]:
        return [d for m, d in self.pairs if m == model]

    def sets_in(self, groups: Iterable[str]) -> list[str]:
        groups = tuple(groups)
        return [s for s in self.sets if self.set_groups[s] in groups]

    def value(self, model: str, detector: str, ood_set: str, metric: str) -> float:
        """A metric of one row (NaN where the runner gave none)."""
        return self.values.get((model, detector, ood_set), {}).get(metric, math.nan)

    def model_sets(self, model: str) -> set[str]:
        """The OOD sets ``model`` was evaluated on (a model may have its own, e.g. an open-set split)."""
        return {s for (m, _, s) in self.values if m == model}

    def mean(self, model: str, detector: str, groups: Iterable[str], metric: str) -> float:
        """Mean of ``metric`` over the sets of ``groups`` that ``model`` was evaluated on.

        NaN when the detector lacks one of them (a partial mean would mislead) or there is none.
        """
        evaluated = self.model_sets(model)
        sets = [s for s in self.sets_in(groups) if s in evaluated]
        if not sets:
            return math.nan
        return float(np.mean([self.value(model, detector, s, metric) for s in sets], dtype=np.float64))

    def has_failure_metrics(self) -> bool:
        """Whether the runner measured failure detection (the ID test labels were known)."""
        return any("aurc" in v for v in self.values.values())

    def reference(self) -> tuple[str, dict[str, float], str] | None:
        """Published numbers of the protocol (a preset's ``[reference]``): (metric, percent values keyed
        ``"model/detector"``, source), or None when there are none."""
        ref = self.raw.get("reference") or self.config.get("reference")
        if not isinstance(ref, Mapping):
            return None
        metric = ref.get("metric", "fpr95")
        values = {k: float(v) for k, v in ref.items() if "/" in k and _is_number(v)}
        if metric not in METRIC_NAMES or not values:
            return None
        return str(metric), values, str(ref.get("source", ""))

    def mean_columns(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """The mean columns worth showing: near and far when present, the overall OOD mean when both are."""
        present = [g for g in OOD_GROUPS if self.sets_in((g,))]
        columns = [c for c in MEAN_COLUMNS[:2] if c[0] in present]
        if len(present) == 2:
            columns.append(MEAN_COLUMNS[2])
        return columns


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric(value: Any, where: str, name: str) -> float:
    if value is None:
        return math.nan
    if not _is_number(value):
        raise ReportError(f"{where}: {name} must be a number, got {value!r}")
    value = float(value)
    if not math.isnan(value) and not 0.0 <= value <= 1.0:
        raise ReportError(f"{where}: {name} = {value!r} is not a fraction in [0, 1]")
    return value


def _parse_rows(doc: Mapping[str, Any], path: Path) -> list[Row]:
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise ReportError(f"{path}: missing \"rows\" (a list with one object per model, detector and OOD set)")
    if not rows:
        raise ReportError(f"{path}: \"rows\" is empty; the benchmark produced no results")
    sets = doc.get("ood_sets") if isinstance(doc.get("ood_sets"), Mapping) else {}
    parsed = []
    for i, row in enumerate(rows):
        where = f"{path}: rows[{i}]"
        if not isinstance(row, Mapping):
            raise ReportError(f"{where}: expected an object, got {type(row).__name__}")
        names = {}
        for key in ("model", "detector", "ood_set"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise ReportError(f"{where}: missing {key!r} (a non-empty string)")
            names[key] = row[key]
        group = row.get("group")
        if group is None and isinstance(sets.get(names["ood_set"]), Mapping):
            group = sets[names["ood_set"]].get("group")
        if group not in GROUPS:
            raise ReportError(f"{where}: group must be one of {', '.join(GROUPS)}, got {group!r}")
        missing = [m for m in METRIC_NAMES if m not in row]
        if missing:
            raise ReportError(f"{where}: missing metric {', '.join(missing)}")
        metrics = {m: _metric(row[m], where, m) for m in METRIC_NAMES + tuple(f for f in FAILURE_METRICS if f in row)}
        parsed.append(Row(group=group, metrics=metrics, **names))
    return parsed


def _index(directory: Path, doc: dict[str, Any], rows: list[Row], path: Path) -> Results:
    models: list[str] = []
    pairs: list[tuple[str, str]] = []
    sets: list[str] = []
    groups: dict[str, str] = {}
    values: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in rows:
        if r.model not in models:
            models.append(r.model)
        if (r.model, r.detector) not in pairs:
            pairs.append((r.model, r.detector))
        if r.ood_set not in sets:
            sets.append(r.ood_set)
        if groups.setdefault(r.ood_set, r.group) != r.group:
            raise ReportError(f"{path}: OOD set {r.ood_set!r} is in two groups ({groups[r.ood_set]}, {r.group})")
        key = (r.model, r.detector, r.ood_set)
        if key in values:
            raise ReportError(f"{path}: two rows for model {r.model!r}, detector {r.detector!r}, set {r.ood_set!r}")
        values[key] = r.metrics
    # Stable grouping near -> far -> covariate, keeping the runner's order inside a group.
    sets.sort(key=lambda s: GROUPS.index(groups[s]))
    pairs.sort(key=lambda p: models.index(p[0]))
    return Results(directory, doc, rows, models, pairs, sets, groups, values)


def load_results(results_dir: str | Path) -> Results:
    """Read and check ``results_dir/results.json``; a :class:`ReportError` names what is wrong."""
    directory = Path(results_dir)
    if not directory.is_dir():
        raise ReportError(f"{directory}: no such results directory")
    path = directory / RESULTS_FILE
    if not path.is_file():
        raise ReportError(f"{path}: missing (is {directory} a results directory written by `ebood bench`?)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return _index(directory, doc, _parse_rows(doc, path), path)


def read_scores(results: Results, keys: Iterable[str]) -> tuple[dict[str, np.ndarray], str | None]:
    """The 1-D float64 score arrays for ``keys`` found in ``scores.safetensors``, and a note when the file
    is missing or unreadable (the report is still rendered, without figures). Non-finite scores are
    dropped, since a histogram cannot place them."""
    path = results.directory / SCORES_FILE
    if not path.is_file():
        return {}, f"{SCORES_FILE} is missing, so the report has no score histograms or ROC curves."
    from safetensors import SafetensorError, safe_open

    wanted = set(keys)
    scores: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for key in sorted(wanted & set(f.keys())):
                array = np.asarray(f.get_tensor(key), dtype=np.float64).reshape(-1)
                scores[key] = array[np.isfinite(array)]
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ReportError(f"{path}: unreadable safetensors file ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    return scores, None


def score_key(model: str, detector: str, ood_set: str) -> str:
    return f"{model}/{detector}/{ood_set}"


def correct_key(model: str) -> str:
    """Key of a model's ID test correctness (1 = the prediction was right) in scores.safetensors."""
    return f"{model}/id_correct"

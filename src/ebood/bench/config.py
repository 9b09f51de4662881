"""Benchmark descriptions: a TOML file (or a preset) -> :class:`BenchConfig`.

A benchmark names a model, in-distribution train / validation / test data, OOD test sets grouped as
``near`` and ``far`` (and ``covariate`` sets, reported separately), the detectors with their
hyperparameters (or a grid to select from on validation OOD sets disjoint from the test sets),
optional fine-tuning with auxiliary outliers, the seed, repeats and output directory::

    name = "my-benchmark"
    seed = 0
    repeats = 5                 # OOD subsamples averaged (with ood_samples)
    ood_samples = 2000          # per OOD set and repeat; omit to use every sample
    positive = "id"             # FPR95 reading: "id" (energy paper) or "ood" (OpenOOD)
    output = "ebood-results/my-benchmark"
    expected_id_accuracy = 0.94 # a run whose model falls far below this warns (see ACCURACY_MARGIN)

    [model]
    architecture = "wrn40_2"    # or torchscript = "model.pt", or entry_point = "pkg.mod:fn"
    checkpoint = "wrn.safetensors"
    num_classes = 10

    [data]
    root = "/data"
    id_train = "cifar10:train"
    id_test = "cifar10:test"
    [data.ood.far]
    svhn = "svhn:test"
    textures = "textures"
    [data.ood_validation]
    gaussian = "builtin:gaussian"

    [[detectors]]
    name = "react"
    grid = { percentile = [85, 90, 95] }

    [finetune]                  # optional: also evaluate fine-tuned models
    outliers = "folder:/data/tinyimages"
    energy = { m_in = -23.0, m_out = -5.0 }
    oe = { weight = 0.5 }
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["BenchConfig", "ModelSpec", "DetectorSpec", "ConfigError", "load_config", "parse_config"]

GROUPS = ("near", "far", "covariate")


class ConfigError(ValueError):
    """A benchmark description that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from: a built-in architecture, a TorchScript file or an entry point."""

    spec: str
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DetectorSpec:
    """A detector with fixed hyperparameters, or a grid to select from on validation OOD data.

    ``label``: the name of its rows (default: ``name``), to set two variants of one detector side by
    side, e.g. ``DetectorSpec("msma", {"on": "inputs"}, label="msma_inputs")``.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    label: str = ""

    @property
    def title(self) -> str:
        """The name of the detector's rows: ``label`` or, without one, ``name``."""
        return self.label or self.name

    def candidates(self) -> list[dict[str, Any]]:
        """Every hyperparameter setting to try (one when there is no grid)."""
        if not self.grid:
            return [dict(self.params)]
        keys = list(self.grid)
        return [dict(self.params, **dict(zip(keys, values))) for values in itertools.product(*(self.grid[k] for k in keys))]


@dataclass(frozen=True)
class BenchConfig:
    name: str
    model: ModelSpec
    id_train: str
    id_test: str
    ood: dict[str, tuple[str, str]]  # set name -> (group, dataset spec)
    id_val: str | None = None
    ood_validation: dict[str, str] = field(default_factory=dict)
    root: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    detectors: tuple[DetectorSpec, ...] = ()
    finetune: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    repeats: int = 1
    ood_samples: int | None = None
    positive: str = "id"
    output: str = "ebood-results"
    reference: dict[str, Any] = field(default_factory=dict)
    expected_id_accuracy: float | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def _need(table: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}: missing required key {key!r}")
    value = table[key]
    if not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _model(table: Mapping[str, Any]) -> ModelSpec:
    sources = [k for k in ("architecture", "torchscript", "entry_point") if k in table]
    if len(sources) != 1:
        raise ConfigError("[model]: give exactly one of architecture, torchscript, entry_point")
    spec = _need(table, sources[0], "[model]")
    checkpoint = table.get("checkpoint")
    kwargs = {k: v for k, v in table.items() if k not in (sources[0], "checkpoint")}
    return ModelSpec(spec=spec, checkpoint=checkpoint, kwargs=kwargs)


def _ood(table: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for group, sets in table.items():
        if group not in GROUPS:
            raise ConfigError(f"[data.ood.{group}]: unknown group; use one of {', '.join(GROUPS)}")
        if not isinstance(sets, Mapping):
            raise ConfigError(f"[data.ood.{group}]: expected a table of name = dataset spec")
        for name, spec in sets.items():
            if not isinstance(spec, str):
                raise ConfigError(f"[data.ood.{group}].{name}: expected a dataset spec string")
            if name in out:
                raise ConfigError(f"OOD set {name!r} appears in two groups")
            out[name] = (group, spec)
    if not any(g != "covariate" for g, _ in out.values()):
        raise ConfigError("[data.ood]: no near or far OOD test set given")
    return out


def _detectors(items: Any) -> tuple[DetectorSpec, ...]:
    if not isinstance(items, list):
        raise ConfigError("[[detectors]]: expected an array of tables")
    specs = []
    for i, item in enumerate(items):
        where = f"detectors[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        name = _need(item, "name", where)
        params = {k: v for k, v in item.items() if k not in ("name", "grid")}
        params.update(item.get("params", {}))
        params.pop("params", None)
        grid = item.get("grid", {})
        if not isinstance(grid, Mapping) or not all(isinstance(v, list) and v for v in grid.values()):
            raise ConfigError(f"{where}.grid: expected a table of hyperparameter = [non-empty list]")
        specs.append(DetectorSpec(name=name, params=params, grid=dict(grid)))
    return tuple(specs)


def parse_config(doc: Mapping[str, Any], *, source: str = "<config>") -> BenchConfig:
    """Validate a parsed TOML document and build a :class:`BenchConfig`."""
    try:
        data = _need(doc, "data", source, Mapping)
        positive = doc.get("positive", "id")
        if positive not in ("id", "ood"):
            raise ConfigError(f"positive: expected 'id' or 'ood', got {positive!r}")
        repeats = int(doc.get("repeats", 1))
        if repeats < 1:
            raise ConfigError(f"repeats: must be >= 1, got {repeats}")
        ood_samples = doc.get("ood_samples")
        if ood_samples is not None and (not isinstance(ood_samples, int) or ood_samples < 1):
            raise ConfigError(f"ood_samples: must be a positive integer, got {ood_samples!r}")
        options = {k: v for k, v in data.items() if k not in ("root", "id_train", "id_val", "id_test", "ood", "ood_validation")}
        expected = doc.get("expected_id_accuracy")
        if expected is not None and (isinstance(expected, bool) or not isinstance(expected, (int, float)) or not 0 < expected <= 1):
            raise ConfigError(f"expected_id_accuracy: a fraction in (0, 1], got {expected!r}")
        return BenchConfig(
            name=str(doc.get("name", Path(source).stem)),
            model=_model(_need(doc, "model", source, Mapping)),
            id_train=_need(data, "id_train", "[data]"),
            id_val=data.get("id_val"),
            id_test=_need(data, "id_test", "[data]"),
            ood=_ood(_need(data, "ood", "[data]", Mapping)),
            ood_validation=dict(data.get("ood_validation", {})),
            root=data.get("root"),
            data_options=options,
            detectors=_detectors(doc.get("detectors", [])),
            finetune=dict(doc.get("finetune", {})),
            seed=int(doc.get("seed", 0)),
            repeats=repeats,
            ood_samples=ood_samples,
            positive=positive,
            output=str(doc.get("output", f"ebood-results/{doc.get('name', Path(source).stem)}")),
            reference=dict(doc.get("reference", {})),
            expected_id_accuracy=None if expected is None else float(expected),
            raw=dict(doc),
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path) -> BenchConfig:
    """Read and validate a benchmark TOML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such benchmark file")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    return parse_config(doc, source=str(path))

"""Benchmark results: flat rows plus the context needed to trust them, saved as a results directory.

A results directory holds ``results.json`` (config, versions, device, seed, timings, models, OOD
sets and the flat ``rows``), ``results.csv`` (the rows), ``scores.safetensors`` (raw float32 scores
keyed ``"{model}/{detector}/{set}"``, set = OOD set name or ``"id_test"``, and ``"{model}/id_correct"``,
1 where the ID test prediction was right) and ``report.html``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import platform
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from .._version import __version__
from ..io import FileWriteError, atomic_write_bytes, atomic_write_text

__all__ = ["BenchResult", "ROW_FIELDS", "FAILURE_FIELDS", "versions"]

ROW_FIELDS = ("model", "detector", "ood_set", "group", "fpr95", "auroc", "aupr_in", "aupr_out")
#: failure detection (docs/failure.md), where the ID test labels are known: misclassification AUROC
#: and AURC on ID (the same on every row of a detector), and AURC over ID + this set, OOD = failure
FAILURE_FIELDS = ("misclf_auroc", "aurc", "failure_aurc")


def versions() -> dict[str, str]:
    import scipy
    import sklearn

    return {
        "ebood": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
    }


def describe_device(device: torch.device | str | None = None) -> str:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'' if n == 1 else 's'}, {platform.processor() or platform.machine()})"


@dataclass
class BenchResult:
    """Everything one benchmark run measured."""

    benchmark: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    ood_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=lambda: {"training": 0.0, "extraction": 0.0, "fitting": 0.0, "scoring": 0.0})
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = ""
    positive: str = "id"
    auxiliary_outliers: str | None = None
    selected: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add_timings(self, timings: dict[str, float]) -> None:
        for key in ("training", "extraction", "fitting", "scoring"):
            self.timings[key] = self.timings.get(key, 0.0) + float(timings.get(key, 0.0))

    def to_json(self) -> dict[str, Any]:
        return {
            "ebood_version": __version__,
            "benchmark": self.benchmark,
            "config": self.config,
            "versions": versions(),
            "device": self.device,
            "seed": self.seed,
            "positive": self.positive,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "timings": self.timings,
            "models": self.models,
            "ood_sets": self.ood_sets,
            "auxiliary_outliers": self.auxiliary_outliers,
            "selected_hyperparameters": self.selected,
            "reference": self.reference,
            "notes": self.notes,
            "rows": self.rows,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write results.json, results.csv and scores.safetensors into ``out_dir``."""
        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FileWriteError(exc.errno or 0, f"{out}: cannot create the results directory: {exc.strerror or exc}") from None
        # scores first, results.json last: a directory with results.json is complete
        scores = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.scores.items()}
        atomic_write_bytes(out / "scores.safetensors", save(scores))
        table = StringIO()
        writer = csv.DictWriter(table, fieldnames=list(ROW_FIELDS + FAILURE_FIELDS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(out / "results.csv", table.getvalue())
        atomic_write_text(out / "results.json", json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")
        return out

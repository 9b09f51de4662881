"""Training checkpoints: safetensors for every tensor, JSON for everything else, never pickle.

A checkpoint is a folder ``<checkpoint_dir>/epoch-NNN`` holding

* ``model.safetensors``: the model's state dict, keys unchanged (loadable by any safetensors
  reader, e.g. ``ebood.models.load_model(spec, checkpoint)``), with the run's description in the
  ebood header;
* ``optimizer.safetensors``: the optimiser's per-parameter state (momentum buffers, ...) as tensors
  named ``state.<param index>.<name>``, the random generator states, and in its header the
  optimiser's parameter groups and the learning-rate scheduler's state;
* ``training.json``: the same run description in readable form: settings, epoch, step and the
  per-epoch metrics.

Each folder is written under a temporary name of its own and renamed when complete, so an
interruption while saving leaves the previous checkpoint as it was, and two runs saving into
one folder never write into the same partial folder.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from ..io import FileWriteError, atomic_write_text
from ..state import StateError, load_state, save_state

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "find_checkpoint", "list_checkpoints",
           "save_weights", "load_weights", "optimizer_to_state", "optimizer_from_state"]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
INFO_FILE = "training.json"
_EPOCH_DIR = re.compile(r"^epoch-(\d+)$")
MODEL_FORMAT = "ebood.train.model"
OPTIMIZER_FORMAT = "ebood.train.optimizer"


class Checkpoint:
    """What :func:`load_checkpoint` read: model state, optimiser state, RNG states and the run info."""

    def __init__(self, path: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                 scheduler_state: dict[str, Any], rng: dict[str, torch.Tensor], info: dict[str, Any]):
        self.path = path
        self.model_state = model_state
        self.optimizer_state = optimizer_state
        self.scheduler_state = scheduler_state
        self.rng = rng
        self.info = info

    @property
    def epoch(self) -> int:
        return int(self.info["epoch"])

    @property
    def step(self) -> int:
        return int(self.info["step"])


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Cloned so that tied weights (two names, one storage) do not trip safetensors' sharing check.
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def save_weights(model: torch.nn.Module, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write the model's state dict to a safetensors file, with ``info`` in the ebood header."""
    return save_state(path, _model_tensors(model), {"format": MODEL_FORMAT, **(info or {})})


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and header of a file written by :func:`save_weights`."""
    return load_state(path, expected_format=MODEL_FORMAT)


def optimizer_to_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<index>.<name>``) and JSON-able groups."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, per_param in sd["state"].items():
        for name, value in per_param.items():
            if value is None:  # e.g. no momentum buffer yet; the optimiser treats absent as None
                continue
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"state.{index}.{name}"] = value.detach().to("cpu").clone()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def optimizer_from_state(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_to_state`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    fixed = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": fixed}


def _rng_tensors(rng: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"rng.{k}": v for k, v in rng.items()}


def save_checkpoint(folder: str | Path, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler_state: dict[str, Any], rng: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write ``<folder>/epoch-NNN`` atomically (temporary folder, then rename) and return its path."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = _new_partial_folder(folder, epoch)
    except OSError as exc:
        raise FileWriteError(exc.errno or 0, f"{folder}: cannot write a checkpoint: {exc.strerror or exc}") from None
    final = folder / f"epoch-{epoch:03d}"
    try:
        save_weights(model, tmp / MODEL_FILE, {"training": info})
        opt_tensors, groups = optimizer_to_state(optimizer)
        save_state(tmp / OPTIMIZER_FILE, {**opt_tensors, **_rng_tensors(rng)},
                   {"format": OPTIMIZER_FORMAT, "param_groups": groups, "scheduler": scheduler_state,
                    "epoch": epoch, "step": info["step"]})
        atomic_write_text(tmp / INFO_FILE, json.dumps(info, indent=2, sort_keys=True, allow_nan=True) + "\n")
        _replace_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _new_partial_folder(folder: Path, epoch: int) -> Path:
    """A new folder, unique to this writer (two runs saving into one folder never share one),
    with the usual mode (0777 minus the umask; ``tempfile.mkdtemp`` would give 0700)."""
    while True:
        tmp = folder / f".epoch-{epoch:03d}.{os.getpid()}-{secrets.token_hex(4)}.partial"
        try:
            tmp.mkdir(mode=0o777)
            return tmp
        except FileExistsError:
            continue


def _replace_folder(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` to ``final``. An existing ``final`` is moved aside first
    and removed after, so that ``final`` is never a partial checkpoint; when another writer puts
    its own ``final`` in place in between, that one (as complete as ours) is kept."""
    old = None
    if final.exists():
        old = final.with_name(f"{tmp.name}.old")
        try:
            final.rename(old)
        except FileNotFoundError:  # another writer moved it first
            old = None
    try:
        tmp.rename(final)
    except OSError as exc:
        if not (exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and (final / MODEL_FILE).is_file()):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoint folders under ``folder``, oldest epoch first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _EPOCH_DIR.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in (MODEL_FILE, OPTIMIZER_FILE, INFO_FILE)):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint folder, else the latest checkpoint inside it."""
    path = Path(path)
    if (path / MODEL_FILE).is_file() and (path / OPTIMIZER_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"{path}: no training checkpoint here (expected a folder epoch-NNN with {MODEL_FILE}, "
            f"{OPTIMIZER_FILE} and {INFO_FILE}, or a folder holding such folders)"
        )
    return found[-1]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder (or the latest one inside ``path``), verifying every checksum."""
    folder = find_checkpoint(path)
    model_state, model_header = load_state(folder / MODEL_FILE, expected_format=MODEL_FORMAT)
    opt_tensors, opt_header = load_state(folder / OPTIMIZER_FILE, expected_format=OPTIMIZER_FORMAT)
    info = model_header.get("training")
    if not isinstance(info, dict) or "epoch" not in info or "step" not in info:
        raise StateError(f"{folder / MODEL_FILE}: no training record in the header; not a training checkpoint")
    rng = {k[4:]: v for k, v in opt_tensors.items() if k.startswith("rng.")}
    opt_state = optimizer_from_state({k: v for k, v in opt_tensors.items() if k.startswith("state.")},
                                     opt_header["param_groups"])
    return Checkpoint(folder, model_state, opt_state, opt_header["scheduler"], rng, info)

"""The training loop shared by :func:`ebood.train.finetune` and :func:`ebood.train.train_classifier`.

One step: draw an ID batch (and, when fine-tuning, the next outlier batch), run the model once
on their concatenation (as the official energy-OOD code does, so BatchNorm sees both), evaluate
the loss, stop if it is not finite, back-propagate, step the optimiser, then the per-step
learning-rate schedule. After every epoch the run is checkpointed (see ``checkpoint.py``).

Determinism: the global torch RNG (dropout) is seeded from the run's seed inside
``torch.random.fork_rng`` (the caller's RNG state is left as it was) and saved with every
checkpoint; data order comes from ``batches.py``. On CPU, the same seed gives bit-identical
weights, and resuming from a checkpoint gives the weights of the uninterrupted run.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..runtime import ModelInputError, model_inputs, parse_device
from .batches import LabelledSource, OutlierSource, as_dataset, derived_seed
from .checkpoint import find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint, save_weights
from .losses import LossParts

__all__ = ["StepInfo", "EpochMetrics", "NonFiniteLossError", "TrainingInterrupted", "cosine_factor", "run"]

_MODEL_RNG_STREAM = 3
_AUGMENT_ID_STREAM, _AUGMENT_OUTLIER_STREAM = 5, 6

#: Settings that define a run: resuming with any of them changed is refused.
RUN_DEFINING = ("kind", "loss", "epochs", "lr", "lr_min", "optimizer", "momentum", "nesterov",
                "weight_decay", "id_batch_size", "outlier_batch_size", "seed", "augment")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped before applying that step."""

    def __init__(self, message: str, epoch: int, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a KeyboardInterrupt from a callback) stopped training; ``checkpoint`` is the last one."""

    def __init__(self, message: str, epoch: int, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint


@dataclass(frozen=True)
class StepInfo:
    """What one optimisation step measured (passed to ``on_step``). ``step`` counts from 1 over the run."""

    epoch: int
    step: int
    loss: float
    ce: float
    in_term: float
    out_term: float
    energy_in: float
    energy_out: float
    lr: float


@dataclass(frozen=True)
class EpochMetrics:
    """Means over one epoch's steps (passed to ``on_epoch`` and saved in every checkpoint).

    ``energy_in`` / ``energy_out`` are mean free energies ``-logsumexp(f)`` of the ID and outlier
    batches (NaN without outliers); ``accuracy`` is on the training batches as they were seen;
    ``val_accuracy`` on the validation data after the epoch (None without validation data); ``lr``
    the learning rate of the epoch's last step.
    """

    epoch: int
    step: int
    loss: float
    ce: float
    in_term: float
    out_term: float
    energy_in: float
    energy_out: float
    accuracy: float
    val_accuracy: Optional[float]
    lr: float
    seconds: float


def cosine_factor(step: int, total_steps: int, floor: float) -> float:
    """``floor + (1 - floor) * (1 + cos(pi * step / total_steps)) / 2``: 1 at step 0, ``floor`` at the end.

    The multiplier of the base learning rate in the official energy-OOD code's ``LambdaLR``
    (there ``floor = 1e-6 / lr``, so the rate anneals from ``lr`` to 1e-6 over the run).
    """
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


LossFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], LossParts]


@dataclass
class Run:
    """Everything the loop needs, gathered by ``finetune`` / ``train_classifier``."""

    model: torch.nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    id_source: LabelledSource
    outlier_source: OutlierSource | None
    settings: dict[str, Any]
    device: torch.device
    checkpoint_dir: Path | None = None
    resume: Path | None = None
    output: Path | None = None
    progress: bool = True
    validation: LabelledSource | None = None
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    on_step: Callable[[StepInfo], None] | None = None
    on_epoch: Callable[[EpochMetrics], None] | None = None


def resolve_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` if given (the model is moved there), else the device of the model's parameters."""
    if device is None:
        p = next(iter(model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")
    dev = parse_device(device)
    model.to(dev)
    return dev


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with model_inputs(x):
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits of shape (batch, classes) = ({x.shape[0]}, C), got {shape}")
    return out


def _accuracy(model: torch.nn.Module, source: LabelledSource, device: torch.device) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    dtype = _input_dtype(model)
    with torch.no_grad():
        for x, y in source.epoch(0):
            pred = _logits(model, x.to(device, dtype)).argmax(dim=1).cpu()
            correct += int((pred == y).sum())
            total += int(y.numel())
    model.train(was_training)
    return correct / max(total, 1)


class _Bar:
    """A rich progress bar on stderr, shown only when asked for and stderr is a terminal."""

    def __init__(self, enabled: bool, total_epochs: int, steps_per_epoch: int):
        self.progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), console=console,
                                 transient=False)
        self.total_epochs, self.steps = total_epochs, steps_per_epoch
        self.task = None

    def __enter__(self) -> "_Bar":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def new_epoch(self, epoch: int) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task(f"epoch {epoch}/{self.total_epochs}", total=self.steps, stats="")

    def update(self, means: dict[str, float], has_outliers: bool) -> None:
        if self.progress is None or self.task is None:
            return
        stats = f"loss {means['loss']:.4f}  ce {means['ce']:.4f}"
        if has_outliers:
            stats += (f"  in {means['in_term']:.3g}  out {means['out_term']:.3g}  "
                      f"E_in {means['energy_in']:.2f}  E_out {means['energy_out']:.2f}")
        stats += f"  acc {means['accuracy']:.3f}"
        self.progress.update(self.task, advance=1, stats=stats)


_STAT_NAMES = ("loss", "ce", "in_term", "out_term", "energy_in", "energy_out", "accuracy")


def _step_stats(parts: LossParts, in_logits: torch.Tensor, labels: torch.Tensor,
                out_logits: torch.Tensor | None) -> list[float]:
    """The step's numbers, fetched from the device in one transfer."""
    with torch.no_grad():
        e_in = -torch.logsumexp(in_logits.detach(), dim=1).mean()
        e_out = (-torch.logsumexp(out_logits.detach(), dim=1).mean() if out_logits is not None
                 else torch.full((), math.nan, device=in_logits.device))
        acc = (in_logits.detach().argmax(dim=1) == labels).float().mean()
        values = [parts.total, parts.ce, parts.in_term, parts.out_term, e_in, e_out, acc]
        return torch.stack([v.detach().to(torch.float64).reshape(()) for v in values]).cpu().tolist()


def _augmented(augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor], x_in: torch.Tensor,
               x_out: torch.Tensor | None, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Both batches augmented with draws that depend only on ``(seed, step)`` (reproducible on resume)."""
    def gen(stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(derived_seed(seed, stream, step))

    x_in = augment(x_in, gen(_AUGMENT_ID_STREAM))
    return x_in, (augment(x_out, gen(_AUGMENT_OUTLIER_STREAM)) if x_out is not None else None)


def _snapshot_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of the buffers (BatchNorm running statistics), which the forward pass updates in place."""
    return [b.detach().clone() for b in model.buffers()]


def _restore_buffers(model: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    # A non-finite batch must not leave NaN running statistics behind in the returned model.
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)


def _check_resume(saved: dict[str, Any], settings: dict[str, Any], where: Path) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {settings.get(k)!r}" for k in RUN_DEFINING
             if saved.get(k) != settings.get(k)]
    if diffs:
        raise ValueError(f"cannot resume from {where}: the run's settings differ ({'; '.join(diffs)})")


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _set_rng_state(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def run(r: Run) -> torch.nn.Module:
    """Train ``r.model`` as described by ``r`` and return it (in eval mode)."""
    devices = [r.device.index or 0] if r.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _run(r)


def _resume(r: Run, scheduler: torch.optim.lr_scheduler.LRScheduler,
            steps_per_epoch: int) -> tuple[int, int, Path | None, list[dict[str, Any]]]:
    """Seed a fresh run, or restore a checkpoint; returns (epoch, step, checkpoint, history)."""
    if r.resume is None:
        torch.manual_seed(derived_seed(int(r.settings["seed"]), _MODEL_RNG_STREAM))
        if r.checkpoint_dir is not None and list_checkpoints(r.checkpoint_dir):
            raise FileExistsError(
                f"{r.checkpoint_dir} already holds checkpoints ({list_checkpoints(r.checkpoint_dir)[-1].name}); "
                f"resume from them or choose an empty folder"
            )
        return 0, 0, None, []
    ckpt = load_checkpoint(r.resume)
    _check_resume(ckpt.info.get("settings", {}), r.settings, ckpt.path)
    if ckpt.step != ckpt.epoch * steps_per_epoch:
        raise ValueError(
            f"cannot resume from {ckpt.path}: it is at step {ckpt.step} after {ckpt.epoch} epochs, but the ID data "
            f"now give {steps_per_epoch} steps per epoch (different data or batch size)"
        )
    r.model.load_state_dict(ckpt.model_state)
    r.optimizer.load_state_dict(ckpt.optimizer_state)
    scheduler.load_state_dict(ckpt.scheduler_state)
    _set_rng_state(ckpt.rng, r.device)
    return ckpt.epoch, ckpt.step, ckpt.path, list(ckpt.info.get("history", []))


@dataclass
class _Position:
    """Where the run is: for messages on interruption or a non-finite loss."""

    epoch: int
    step: int
    in_epoch: int = 0
    checkpoint: Path | None = None


def _train_step(r: Run, x_in: torch.Tensor, y_in: torch.Tensor, x_out: torch.Tensor | None,
                pos: _Position) -> list[float]:
    """One optimisation step on the concatenated batch; returns the step's statistics (``_STAT_NAMES``)."""
    if r.augment is not None:
        x_in, x_out = _augmented(r.augment, x_in, x_out, int(r.settings["seed"]), pos.step)
    if x_out is not None and x_out.shape[1:] != x_in.shape[1:]:
        raise ModelInputError(
            f"the outliers are inputs of shape {tuple(x_out.shape[1:])} but the ID data {tuple(x_in.shape[1:])}: "
            f"give both the same channels and image size (e.g. --image-size)"
        )
    x = torch.cat([x_in, x_out]) if x_out is not None else x_in
    buffers = _snapshot_buffers(r.model)
    logits = _logits(r.model, x)
    in_logits = logits[: x_in.shape[0]]
    out_logits = logits[x_in.shape[0]:] if x_out is not None else None
    parts = r.loss_fn(in_logits, y_in, out_logits)
    stats = _step_stats(parts, in_logits, y_in, out_logits)
    if not math.isfinite(stats[0]):
        _restore_buffers(r.model, buffers)
        raise _non_finite(stats, pos, r.checkpoint_dir)
    r.optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    r.optimizer.step()
    return stats


def _run(r: Run) -> torch.nn.Module:
    s = r.settings
    epochs, steps_per_epoch = int(s["epochs"]), len(r.id_source)
    total_steps = epochs * steps_per_epoch
    floor = float(s["lr_min"]) / float(s["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(r.optimizer, lambda k: cosine_factor(k, total_steps, floor))
    start_epoch, step, last_ckpt, history = _resume(r, scheduler, steps_per_epoch)
    pos = _Position(start_epoch, step, 0, last_ckpt)
    dtype = _input_dtype(r.model)
    outliers = r.outlier_source.stream(start_batch=step) if r.outlier_source is not None else None
    r.model.train()
    try:
        with _Bar(r.progress, epochs, steps_per_epoch) as bar:
            for epoch in range(start_epoch + 1, epochs + 1):
                bar.new_epoch(epoch)
                pos.epoch, pos.in_epoch = epoch, 0
                started, sums = time.perf_counter(), [0.0] * len(_STAT_NAMES)
                lr = r.optimizer.param_groups[0]["lr"]
                for x_in, y_in in r.id_source.epoch(epoch - 1):
                    x_in, y_in = x_in.to(r.device, dtype, non_blocking=True), y_in.to(r.device, non_blocking=True)
                    x_out = next(outliers).to(r.device, dtype, non_blocking=True) if outliers is not None else None
                    lr = r.optimizer.param_groups[0]["lr"]
                    stats = _train_step(r, x_in, y_in, x_out, pos)
                    scheduler.step()
                    pos.step, pos.in_epoch = pos.step + 1, pos.in_epoch + 1
                    sums = [a + b for a, b in zip(sums, stats)]
                    bar.update({k: v / pos.in_epoch for k, v in zip(_STAT_NAMES, sums)}, outliers is not None)
                    if r.on_step is not None:
                        r.on_step(StepInfo(epoch, pos.step, *stats[:6], lr=lr))
                metrics = EpochMetrics(
                    epoch=epoch, step=pos.step, **{k: v / max(pos.in_epoch, 1) for k, v in zip(_STAT_NAMES, sums)},
                    val_accuracy=_accuracy(r.model, r.validation, r.device) if r.validation is not None else None,
                    lr=lr, seconds=time.perf_counter() - started,
                )
                history.append(asdict(metrics))
                if r.checkpoint_dir is not None:
                    info = {"settings": s, "epoch": epoch, "step": pos.step, "history": history}
                    pos.checkpoint = save_checkpoint(r.checkpoint_dir, epoch, r.model, r.optimizer,
                                                     scheduler.state_dict(), _rng_state(r.device), info)
                if r.on_epoch is not None:
                    r.on_epoch(metrics)
    except KeyboardInterrupt as exc:
        if isinstance(exc, TrainingInterrupted):
            raise
        where = f"last checkpoint: {pos.checkpoint}" if pos.checkpoint else "no checkpoint was written"
        raise TrainingInterrupted(
            f"training interrupted in epoch {pos.epoch}, after {pos.step} steps ({pos.in_epoch} of this epoch); "
            f"{where}", pos.epoch, pos.step, pos.checkpoint,
        ) from None
    r.model.eval()
    if r.output is not None:
        record = {"settings": s, "epoch": pos.epoch, "step": pos.step, "history": history}
        save_weights(r.model, r.output, {"training": record})
    return r.model


def _non_finite(stats: list[float], pos: _Position, folder: Path | None) -> NonFiniteLossError:
    parts = ", ".join(f"{k}={v:.6g}" for k, v in zip(_STAT_NAMES[:4], stats[:4]))
    epoch, step, in_epoch = pos.epoch, pos.step + 1, pos.in_epoch + 1
    if pos.checkpoint is not None:
        where = f"the last good checkpoint is {pos.checkpoint}"
    elif folder is not None:
        where = "no checkpoint had been written yet"
    else:
        where = "checkpointing was off"
    return NonFiniteLossError(
        f"non-finite loss at step {step} (epoch {epoch}, step {in_epoch} of the epoch): {parts}; training "
        f"stopped before applying it; {where}. Try a lower learning rate or check the inputs for NaN/inf.",
        epoch, step, pos.checkpoint,
    )


# --- run settings, shared by finetune and train_classifier ---

def describe_data(data: Any) -> str:
    """A short, stable description of a data argument for the run record."""
    fp = getattr(data, "fingerprint", None) or getattr(getattr(data, "dataset", None), "fingerprint", None)
    if isinstance(fp, str):
        return fp
    try:
        return f"{type(data).__name__}(n={len(data)})"
    except TypeError:
        return type(data).__name__


def check_positive(value: float, name: str, allow_zero: bool = False) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def check_count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def build_settings(kind: str, loss: dict[str, Any] | str, epochs: int, lr: float, lr_min: float, momentum: float,
                   nesterov: bool, weight_decay: float, id_batch_size: int, outlier_batch_size: int | None,
                   seed: int, optimizer: str) -> dict[str, Any]:
    """The run's settings as plain values, validated (saved in checkpoints, compared on resume)."""
    from .._version import __version__

    if nesterov and momentum <= 0:
        raise ValueError("nesterov=True needs momentum > 0")
    return {
        "kind": kind, "loss": loss, "epochs": check_count(epochs, "epochs"),
        "lr": check_positive(lr, "lr"), "lr_min": check_positive(lr_min, "lr_min", allow_zero=True),
        "optimizer": optimizer, "momentum": check_positive(momentum, "momentum", allow_zero=True),
        "nesterov": bool(nesterov), "weight_decay": check_positive(weight_decay, "weight_decay", allow_zero=True),
        "id_batch_size": check_count(id_batch_size, "id_batch_size"),
        "outlier_batch_size": None if outlier_batch_size is None else check_count(outlier_batch_size,
                                                                                  "outlier_batch_size"),
        "seed": int(seed), "ebood_version": __version__,
    }


def add_info(settings: dict[str, Any], info: dict[str, Any] | None, augment: Any = None) -> dict[str, Any]:
    """``settings`` with the augmentation's settings under ``"augment"`` and the caller's JSON-able
    ``info`` (where the model and data came from) under ``"info"``."""
    if augment is not None and not callable(augment):
        raise TypeError(f"augment must be callable as augment(batch, generator), got {type(augment).__name__}")
    settings["augment"] = (augment.config() if hasattr(augment, "config") else repr(augment)) if augment else None
    if info:
        import json

        try:
            json.dumps(info)
        except TypeError as exc:
            raise TypeError(f"info must be JSON-serialisable: {exc}") from exc
        settings["info"] = dict(info)
    return settings


def validation_source(data: Any, batch_size: int, seed: int, num_workers: int) -> LabelledSource | None:
    """Labelled validation data as a source, or None."""
    if data is None:
        return None
    return LabelledSource(as_dataset(data, "validation"), max(batch_size, 256), seed, num_workers, "validation")


def output_paths(checkpoint_dir: str | Path | None, resume: str | Path | None,
                 output: str | Path | None) -> dict[str, Path | None]:
    """Where to resume from (the latest checkpoint under ``resume``), where to write checkpoints (default:
    beside the resumed one) and the final weights (whose folder must exist)."""
    res = find_checkpoint(resume) if resume is not None else None
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else (res.parent if res is not None else None)
    out = Path(output) if output is not None else None
    if out is not None and not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such folder for the output {out.name}")
    return {"checkpoint_dir": folder, "resume": res, "output": out}

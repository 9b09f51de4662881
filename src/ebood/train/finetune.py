"""Fine-tuning a pre-trained classifier with auxiliary outliers: the energy-OOD paper's recipe.

Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020, Section 4 and
the official code: 10 epochs from the pre-trained model; SGD with Nesterov momentum 0.9, weight
decay 5e-4; learning rate 1e-3 cosine-annealed per step to 1e-6; each step 128 in-distribution
and 256 outlier samples, outliers cycled independently of the in-distribution epochs; the model
runs once on the concatenated batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from .augment import BatchAugment
from .batches import LabelledSource, OutlierSource, as_dataset
from .loop import (EpochMetrics, Run, StepInfo, add_info, build_settings, describe_data, output_paths,
                   resolve_device, run, validation_source)
from .losses import EnergyBoundedLoss, LogitNormLoss, LossParts, OutlierExposureLoss

__all__ = ["finetune", "make_loss"]

LOSSES = {"energy": EnergyBoundedLoss, "oe": OutlierExposureLoss, "logitnorm": LogitNormLoss}


def make_loss(name: str, **params: Any) -> EnergyBoundedLoss | OutlierExposureLoss | LogitNormLoss:
    """``"energy"`` -> :class:`EnergyBoundedLoss`, ``"oe"`` -> :class:`OutlierExposureLoss`,
    ``"logitnorm"`` -> :class:`LogitNormLoss`, with ``params``."""
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}") from None
    return cls(**params)


def _loss_config(loss: Any) -> dict[str, Any] | str:
    """The loss's settings for the run record (a custom callable is named, without its address)."""
    if hasattr(loss, "config"):
        return loss.config()
    return getattr(loss, "__qualname__", type(loss).__qualname__)


def finetune(
    model: torch.nn.Module,
    id_data: Any,
    outlier_data: Any,
    loss: EnergyBoundedLoss | OutlierExposureLoss | LogitNormLoss | str | Callable[..., LossParts] = "energy",
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    lr_min: float = 1e-6,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    id_batch_size: int = 128,
    outlier_batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: str | Path | None = None,
    output: str | Path | None = None,
    info: dict[str, Any] | None = None,
    progress: bool = True,
    validation: Any = None,
    augment: BatchAugment | None = None,
    num_workers: int = 0,
    on_step: Callable[[StepInfo], None] | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> torch.nn.Module:
    """Fine-tune ``model`` in place on ``id_data`` with auxiliary ``outlier_data``; return that same object (in eval mode).

    As with :func:`ebood.train.train_classifier`, the model given is the model trained:
    ``finetune(model, ...)`` and ``model = finetune(model, ...)`` are the same; copy it first
    (``copy.deepcopy``) to keep the pre-trained weights.

    Parameters
    ----------
    model: a classifier returning logits ``(batch, classes)``; trained in place.
    id_data: labelled in-distribution data: a Dataset of ``(input, label)``, a DataLoader, or a
        tuple of tensors ``(inputs, labels)``.
    outlier_data: auxiliary outliers: a Dataset / DataLoader of ``input`` or ``(input, label)``
        (labels, e.g. -1, are ignored), or a tensor of inputs. Must not overlap the OOD test sets.
        ``None`` for a loss that uses no outliers (``loss.needs_outliers`` is False: LogitNorm).
    loss: an :class:`EnergyBoundedLoss` (default settings when ``"energy"``), an
        :class:`OutlierExposureLoss` (``"oe"``), a :class:`LogitNormLoss` (``"logitnorm"``), or any
        callable ``(in_logits, labels, out_logits)`` returning :class:`LossParts`.
    epochs, lr, lr_min, momentum, nesterov, weight_decay: SGD with the learning rate annealed per
        step from ``lr`` to ``lr_min`` on a cosine (the official code's ``LambdaLR``).
    id_batch_size, outlier_batch_size: samples per step (ignored for data given as DataLoaders).
    seed: seeds the data order and the model's random layers (dropout). On CPU, the same seed
        gives bit-identical weights.
    device: where to train (the model is moved there); default: where the model's parameters are.
    checkpoint_dir: write ``epoch-NNN`` checkpoints there after every epoch (see
        ``ebood.train.checkpoint``); must not already hold checkpoints unless resuming.
    resume: a checkpoint folder (or a folder of them: the latest is used) to continue from; the
        result equals the uninterrupted run's. Checkpoints then go to ``checkpoint_dir`` or, when
        that is None, beside the resumed one.
    output: write the final weights there: a safetensors state dict whose ebood header holds the
        run's settings and per-epoch metrics (``ebood.train.load_weights`` reads both).
    info: JSON-able facts recorded with the settings (e.g. where the model and data came from).
    progress: show a progress bar (only when stderr is a terminal).
    validation: optional labelled data whose accuracy is recorded after each epoch.
    augment: a batch augmentation applied to the ID and outlier batches of every step, e.g.
        :class:`ebood.train.RandomCropFlip` (the paper's CIFAR recipe); seeded by ``(seed, step)``.
    on_step, on_epoch: callbacks receiving :class:`StepInfo` / :class:`EpochMetrics`.

    Raises
    ------
    NonFiniteLossError: the loss became NaN/inf; the message names the step; checkpoints on
        disk are the last good ones.
    TrainingInterrupted: a KeyboardInterrupt (Ctrl-C) stopped the run; the last checkpoint is intact.
    """
    if isinstance(loss, str):
        loss = make_loss(loss)
    if not callable(loss):
        raise TypeError(f"loss must be a loss object, a callable or 'energy' / 'oe' / 'logitnorm', got {type(loss).__name__}")
    if outlier_data is None and getattr(loss, "needs_outliers", True):
        raise ValueError(f"outlier_data is None, but {loss!r} needs auxiliary outliers")
    settings = build_settings("finetune", _loss_config(loss), epochs, lr, lr_min, momentum, nesterov, weight_decay,
                              id_batch_size, outlier_batch_size, seed, "sgd")
    settings.update(model=type(model).__name__, id_data=describe_data(id_data),
                    outlier_data=None if outlier_data is None else describe_data(outlier_data))
    dev = resolve_device(model, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=settings["momentum"],
                                nesterov=nesterov, weight_decay=settings["weight_decay"])
    r = Run(
        model=model, loss_fn=loss, optimizer=optimizer,
        id_source=LabelledSource(as_dataset(id_data, "id_data"), id_batch_size, seed, num_workers, "id_data"),
        outlier_source=None if outlier_data is None else OutlierSource(
            as_dataset(outlier_data, "outlier_data"), outlier_batch_size, seed, num_workers, "outlier_data"),
        settings=add_info(settings, info, augment), augment=augment, device=dev, progress=progress,
        on_step=on_step, on_epoch=on_epoch, validation=validation_source(validation, id_batch_size, seed, num_workers),
        **output_paths(checkpoint_dir, resume, output),
    )
    return run(r)

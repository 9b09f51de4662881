"""Training a classifier from scratch with cross-entropy (the model that OOD detectors then score)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F

from .augment import BatchAugment
from .batches import LabelledSource, as_dataset
from .loop import (EpochMetrics, Run, StepInfo, add_info, build_settings, describe_data, output_paths,
                   resolve_device, run, validation_source)
from .losses import LossParts

__all__ = ["train_classifier", "cross_entropy_loss"]


def cross_entropy_loss(in_logits: torch.Tensor, labels: torch.Tensor, out_logits: Optional[torch.Tensor] = None) -> LossParts:
    """Plain cross-entropy as :class:`LossParts` (``in_term = out_term = 0``; outliers unused)."""
    if labels.ndim != 1 or labels.shape[0] != in_logits.shape[0]:
        raise ValueError(f"labels must have shape ({in_logits.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= in_logits.shape[1]):
        raise ValueError(
            f"labels must be class indices in [0, {in_logits.shape[1] - 1}], found "
            f"{int(labels.min()) if int(labels.min()) < 0 else int(labels.max())}"
        )
    ce = F.cross_entropy(in_logits, labels)
    zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
    return LossParts(ce, ce, zero, zero)


def train_classifier(
    model: torch.nn.Module,
    data: Any,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    optimizer: Literal["sgd", "adam"] = "sgd",
    lr_min: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
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
    loss: Callable[..., LossParts] | None = None,
) -> torch.nn.Module:
    """Train ``model`` in place on labelled ``data`` with cross-entropy; return that same object (in eval mode).

    Like :func:`ebood.train.finetune`, the model given is the model trained: ``train_classifier(model, ...)``
    and ``model = train_classifier(model, ...)`` are the same; copy it first (``copy.deepcopy``) to keep it.

    The defaults are the pre-training recipe of the WideResNets in the energy-OOD and Outlier
    Exposure papers (Hendrycks, Mazeika & Dietterich, ICLR 2019): 100 epochs of SGD with Nesterov
    momentum 0.9, weight decay 5e-4, batch 128, learning rate 0.1 cosine-annealed per step to
    ``lr_min``. ``optimizer="adam"`` uses Adam (``momentum`` / ``nesterov`` unused; weight decay
    as L2 penalty) instead; it trains small models such as ``ebood.models.DigitsCNN`` in a few
    epochs. Data, seeding, checkpoints, resuming, ``output`` / ``info``, interruption and the
    non-finite-loss stop work as in :func:`ebood.train.finetune`. ``loss``: another objective
    called as ``loss(logits, labels)`` and returning :class:`LossParts`, e.g.
    :class:`ebood.train.LogitNormLoss` (default: plain cross-entropy).
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be callable as loss(logits, labels), got {type(loss).__name__}")
    loss_config = {"loss": "cross_entropy"} if loss is None else (loss.config() if hasattr(loss, "config") else repr(loss))
    settings = build_settings("classifier", loss_config, epochs, lr, lr_min, momentum,
                         nesterov and optimizer == "sgd", weight_decay, batch_size, None, seed, optimizer)
    settings.update(model=type(model).__name__, id_data=describe_data(data))
    dev = resolve_device(model, device)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                                     nesterov=nesterov, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    r = Run(
        model=model, loss_fn=cross_entropy_loss if loss is None else loss, optimizer=opt,
        id_source=LabelledSource(as_dataset(data, "data"), batch_size, seed, num_workers, "data"),
        outlier_source=None, settings=add_info(settings, info, augment), augment=augment, device=dev,
        progress=progress, on_step=on_step, on_epoch=on_epoch,
        validation=validation_source(validation, batch_size, seed, num_workers),
        **output_paths(checkpoint_dir, resume, output),
    )
    return run(r)

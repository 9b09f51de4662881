"""Training with ebood: energy-bounded fine-tuning, Outlier Exposure, and plain classifiers.

* :class:`EnergyBoundedLoss`, :class:`OutlierExposureLoss` (``losses``): the objectives, called as
  ``loss(in_logits, labels, out_logits)`` and returning :class:`LossParts`; :class:`LogitNormLoss`
  (no outliers: ``loss(logits, labels)``).
* :func:`finetune` (``finetune``): the energy-OOD paper's fine-tuning recipe (Liu et al., NeurIPS
  2020) with checkpoints, resuming, progress and a clean stop on Ctrl-C or a non-finite loss.
* :func:`train_classifier` (``classifier``): cross-entropy training from scratch (or another loss).
* :class:`PALMLoss`, :func:`train_palm` (``palm``): PALM's mixture-of-prototypes training (Lu et
  al., ICLR 2024) of the penultimate features, scored with ``knn`` / ``mahalanobis``.
* :func:`suggest_margins` (``margins``): ``m_in`` / ``m_out`` from the pre-trained model's energies.
* ``presets``: the paper's CIFAR-10 / CIFAR-100 recipes as data.
"""

from __future__ import annotations

from .augment import BatchAugment, RandomCropFlip
from .checkpoint import load_checkpoint, load_weights, save_weights
from .classifier import cross_entropy_loss, train_classifier
from .finetune import finetune, make_loss
from .loop import EpochMetrics, NonFiniteLossError, StepInfo, TrainingInterrupted, cosine_factor
from .losses import EnergyBoundedLoss, LogitNormLoss, LossParts, OutlierExposureLoss, free_energy
from .margins import Margins, margins_from_energies, model_energies, suggest_margins
from .palm import PALMEpoch, PALMLoss, PALMParts, ProjectionHead, fit_linear_head, train_palm
from .presets import FinetunePreset, available_presets, get_preset

__all__ = [
    "EnergyBoundedLoss", "OutlierExposureLoss", "LogitNormLoss", "LossParts", "free_energy", "make_loss",
    "finetune", "train_classifier", "cross_entropy_loss",
    "suggest_margins", "margins_from_energies", "model_energies", "Margins",
    "StepInfo", "EpochMetrics", "NonFiniteLossError", "TrainingInterrupted", "cosine_factor",
    "save_weights", "load_weights", "load_checkpoint",
    "PALMLoss", "PALMParts", "ProjectionHead", "PALMEpoch", "train_palm", "fit_linear_head",
    "FinetunePreset", "get_preset", "available_presets", "RandomCropFlip", "BatchAugment",
]

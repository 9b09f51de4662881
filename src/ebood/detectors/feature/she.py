"""SHE: simplified Hopfield energy (Zhang et al., ICLR 2023)."""

from __future__ import annotations

import warnings

import torch

from ..._arrays import accumulation_dtype
from ...outputs import Outputs
from .. import _linalg as la
from ..base import register
from ._common import _classes_text, _FeatureDetector

__all__ = ["SHE"]


@register
class SHE(_FeatureDetector):
    """SHE: simplified Hopfield energy (Zhang, Fu, Wang, Wang, Zhang & Li, "Out-of-Distribution
    Detection based on In-Distribution Data Patterns Memorization with Modern Hopfield Energy",
    ICLR 2023).

    Fit (labelled ID features and logits): the stored pattern of class c is the mean feature of the
    training samples of class c that the model classifies correctly,
    ``s_c = mean {x_i : y_i = c, argmax z_i = c}``. Score: ``-(x . s_{argmax z(x)})``, the inner
    product with the pattern of the predicted class, negated (the paper's energy is the inner
    product as a confidence; higher = more OOD), as OpenOOD v1.5's SHE.

    A class whose training samples are all misclassified gets the mean of its labelled samples
    (with a warning). A class without any training sample has no pattern: fitting warns, and
    scoring a sample predicted as that class is an error.
    """

    name = "she"
    paper = "Zhang et al., ICLR 2023"
    requires = ("features", "logits")
    fit_requires = ("labels",)
    streaming = True

    def __init__(self) -> None:
        pass

    def _reset(self) -> None:
        self._started = True
        # [0]: correctly classified samples, [1]: misclassified ones; per class (float64)
        self.pattern_sums_: torch.Tensor | None = None  # (2, C, D)
        self.pattern_counts_: torch.Tensor | None = None  # (2, C)

    def _accumulate(self, batch: Outputs) -> None:
        x, z, labels = batch.feature(), batch.logits, batch.labels
        la.check_finite(x, "features", self.name)
        la.check_finite(z, "logits", self.name)
        c, d = z.shape[1], x.shape[1]
        la.check_labels(labels, c, self.name)
        if self.pattern_sums_ is None:
            self.pattern_sums_ = torch.zeros(2, c, d, dtype=torch.float64, device=x.device)
            self.pattern_counts_ = torch.zeros(2, c, dtype=torch.float64, device=x.device)
        elif self.pattern_sums_.shape[1:] != (c, d):
            raise ValueError(f"detector {self.name!r}: this batch has {c} classes and feature dimension {d}, earlier batches had {tuple(self.pattern_sums_.shape[1:])}")
        device = self.pattern_sums_.device
        sums, counts = self.pattern_sums_.view(2 * c, d), self.pattern_counts_.view(2 * c)
        labels = labels.to(device)
        for rows in la.row_slices(x.shape[0], d * 8 * 2):
            y = labels[rows]
            slot = y + c * (z[rows].to(device).argmax(dim=1) != y)  # one pass: correct or not
            sums.index_put_((slot,), la.as_float64(x[rows]).to(device), accumulate=True)
            counts += torch.bincount(slot, minlength=2 * c).to(torch.float64)

    def _merge(self, other: "SHE") -> None:
        if other.pattern_sums_ is None:
            return
        if self.pattern_sums_ is None:
            self.pattern_sums_, self.pattern_counts_ = other.pattern_sums_.clone(), other.pattern_counts_.clone()
            return
        if other.pattern_sums_.shape != self.pattern_sums_.shape:
            raise ValueError(f"detector {self.name!r}: cannot merge fits of {tuple(other.pattern_sums_.shape[1:])} and {tuple(self.pattern_sums_.shape[1:])} (classes, dimension)")
        self.pattern_sums_ += other.pattern_sums_.to(self.pattern_sums_.device)
        self.pattern_counts_ += other.pattern_counts_.to(self.pattern_counts_.device)

    def _check_state(self) -> None:
        sums, counts = self.pattern_sums_, self.pattern_counts_
        if not isinstance(sums, torch.Tensor) or not isinstance(counts, torch.Tensor):
            raise ValueError("the state lacks pattern_sums_ or pattern_counts_")
        if sums.ndim != 3 or sums.shape[0] != 2 or counts.shape != sums.shape[:2]:
            raise ValueError(f"pattern_sums_ {tuple(sums.shape)} and pattern_counts_ {tuple(counts.shape)} must be (2, C, D) and (2, C)")

    @property
    def _num_classes(self) -> int:
        return self.pattern_sums_.shape[1]

    def _finalize(self) -> None:
        correct_sums, wrong_sums = self.pattern_sums_
        correct_counts, wrong_counts = self.pattern_counts_
        class_counts = correct_counts + wrong_counts
        if not bool((class_counts > 0).any()):
            raise ValueError(f"detector {self.name!r}: no training samples were seen")
        correct = correct_counts > 0
        labelled = class_counts > 0
        fallback = labelled & ~correct
        if bool(fallback.any()):
            warnings.warn(
                f"{self.name}: no training sample of class(es) {_classes_text(torch.nonzero(fallback)[:, 0])} is classified correctly; "
                "their stored pattern is the mean of all their training samples",
                RuntimeWarning,
                stacklevel=4,
            )
        if not bool(labelled.all()):
            warnings.warn(
                f"{self.name}: class(es) {_classes_text(torch.nonzero(~labelled)[:, 0])} have no training samples and no stored pattern; "
                "scoring a sample predicted as one of them is an error",
                RuntimeWarning,
                stacklevel=4,
            )
        sums = torch.where(correct[:, None], correct_sums, correct_sums + wrong_sums)
        counts = torch.where(correct, correct_counts, class_counts)
        self._patterns = sums / counts.clamp_min(1.0)[:, None]
        self._has_pattern = labelled

    def _score(self, outputs: Outputs) -> torch.Tensor:
        x = self._features(outputs, self.pattern_sums_.shape[2])
        z = outputs.logits
        if z.shape[1] != self._num_classes:
            raise ValueError(f"detector {self.name!r}: logits have {z.shape[1]} classes, the detector was fitted on {self._num_classes} classes")
        acc = accumulation_dtype(x.dtype)
        pred = z.argmax(dim=1).to(self._patterns.device)
        missing = ~self._has_pattern[pred]
        if bool(missing.any()):
            classes = torch.unique(pred[missing])
            raise ValueError(
                f"detector {self.name!r}: {int(missing.sum())} sample(s) are predicted as class(es) {_classes_text(classes)}, "
                "which had no training samples and so no stored pattern"
            )
        patterns = self._patterns.to(x.device, acc)
        pred = pred.to(x.device)
        out = torch.empty(x.shape[0], dtype=acc, device=x.device)
        for rows in la.row_slices(x.shape[0], x.shape[1] * 2 * torch.finfo(acc).bits // 8):
            out[rows] = -(x[rows].to(acc) * patterns[pred[rows]]).sum(dim=1)
        return self._finite_scores(out, x)

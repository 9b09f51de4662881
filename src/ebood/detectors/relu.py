"""REL-U (Gomes, Romanelli, Pichler & Piantanida, "A Data-Driven Measure of Relative Uncertainty
for Misclassification Detection", ICLR 2024)."""

from __future__ import annotations

import warnings

import torch

from .. import scores
from .._arrays import accumulation_dtype
from ..outputs import Outputs
from .base import Detector, register
from .logit import _check_finite, _check_labels, _row_chunks

__all__ = ["RelU"]


@register
class RelU(Detector):
    """Relative uncertainty learned from labelled validation soft-predictions (REL-U, Gomes et al.,
    ICLR 2024).

    With ``p = softmax(z / T)``, ``S_+ = mean_{x correct} p p^T`` and ``S_- = mean_{x wrong} p p^T``
    over the fit outputs (correct = ``argmax p == label``), the closed-form relative-uncertainty
    matrix is ``D = relu(offdiag(lambda S_- - (1 - lambda) S_+)) / ||.||_F``: zero diagonal,
    negative entries clipped, unit Frobenius norm. The score is ``s(x) = p^T D p`` (already higher
    = more uncertain; no sign flip). When every entry is clipped, ``D`` falls back to the all-ones
    off-diagonal matrix (then ``s`` is the Gini impurity ``1 - sum_j p_j^2`` up to scale), as the
    official code (github.com/edadaltocg/relative-uncertainty) does. ``lambda = 0.5`` and
    ``T = 1`` are the paper's defaults.

    The fit is a sum (per-group float64 sums of ``p p^T`` and counts), so it streams and merges.
    A fit set without wrong (or without correct) predictions leaves that term out, with a warning.
    """

    name = "relu"
    fit_requires = ("labels",)
    streaming = True
    paper = "Gomes et al., ICLR 2024"

    def __init__(self, lbd: float = 0.5, temperature: float = 1.0) -> None:
        self.lbd = lbd
        self.temperature = temperature
        if not (0.0 <= float(lbd) <= 1.0):
            raise ValueError(f"relu: lbd must be in [0, 1], got {lbd!r}")
        scores._check_temperature(temperature)

    def _reset(self) -> None:
        self._started = True
        self.correct_sum_ = None
        self.wrong_sum_ = None
        self.counts_ = None

    def _accumulate(self, batch: Outputs) -> None:
        logits = batch.logits
        _check_finite(logits, "logits", self.name)
        n, c = logits.shape
        _check_labels(batch.labels, c, self.name)
        if self.correct_sum_ is None:
            self.correct_sum_ = torch.zeros(c, c, dtype=torch.float64)
            self.wrong_sum_ = torch.zeros(c, c, dtype=torch.float64)
            self.counts_ = torch.zeros(2, dtype=torch.float64)
        elif self.correct_sum_.shape[0] != c:
            raise ValueError(f"relu: this batch has {c} classes, earlier batches had {self.correct_sum_.shape[0]}")
        for rows in _row_chunks(n, c, torch.float64):
            p = torch.softmax(logits[rows].to("cpu", torch.float64) / float(self.temperature), dim=1)
            right = p.argmax(dim=1) == batch.labels[rows].to("cpu")
            self.correct_sum_ += p[right].T @ p[right]
            self.wrong_sum_ += p[~right].T @ p[~right]
            self.counts_ += torch.tensor([float(right.sum()), float((~right).sum())], dtype=torch.float64)

    def _merge(self, other: "RelU") -> None:
        if self.correct_sum_ is None:
            self.correct_sum_, self.wrong_sum_, self.counts_ = other.correct_sum_.clone(), other.wrong_sum_.clone(), other.counts_.clone()
            return
        if other.correct_sum_.shape != self.correct_sum_.shape:
            raise ValueError(f"relu: cannot merge fits over {other.correct_sum_.shape[0]} and {self.correct_sum_.shape[0]} classes")
        self.correct_sum_ += other.correct_sum_
        self.wrong_sum_ += other.wrong_sum_
        self.counts_ += other.counts_

    def _finalize(self) -> None:
        n_right, n_wrong = (float(v) for v in self.counts_)
        if n_right == 0 or n_wrong == 0:
            warnings.warn(
                f"relu: the fit outputs have no {'correct' if n_right == 0 else 'wrong'} prediction; "
                "that term of the relative-uncertainty matrix is left out",
                RuntimeWarning,
                stacklevel=4,
            )
        lbd = float(self.lbd)
        d = torch.zeros_like(self.correct_sum_)
        if n_wrong:
            d += lbd * self.wrong_sum_ / n_wrong
        if n_right:
            d -= (1.0 - lbd) * self.correct_sum_ / n_right
        d.fill_diagonal_(0.0)
        d.clamp_(min=0.0)
        if not bool((d > 0).any()):
            d = torch.ones_like(d).fill_diagonal_(0.0)
        self._matrix = d / torch.linalg.matrix_norm(d)

    def _validate_state(self) -> None:
        c = self.correct_sum_.shape[0]
        if self.correct_sum_.shape != (c, c) or self.wrong_sum_.shape != (c, c) or self.counts_.shape != (2,):
            raise ValueError("correct_sum_ and wrong_sum_ must be (C, C) and counts_ (2,)")
        if float(self.counts_.sum()) <= 0:
            raise ValueError("counts_ has no samples")
        self._finalize()

    @property
    def matrix_(self) -> torch.Tensor:
        """The relative-uncertainty matrix ``D`` (C, C), float64."""
        self._check_fitted()
        self._ensure_final()
        return self._matrix

    def _score(self, outputs: Outputs) -> torch.Tensor:
        logits = outputs.logits
        d = self._matrix
        n, c = logits.shape
        if c != d.shape[0]:
            raise ValueError(f"relu was fitted on {d.shape[0]} classes, these logits have {c}")
        acc = accumulation_dtype(logits.dtype)
        parts = []
        for rows in _row_chunks(n, c, torch.float64):
            p = torch.softmax(logits[rows].to("cpu", torch.float64) / float(self.temperature), dim=1)
            parts.append(((p @ d) * p).sum(dim=1).to(acc))
        out = torch.cat(parts) if parts else torch.empty(0, dtype=acc)
        return out.to(logits.device)

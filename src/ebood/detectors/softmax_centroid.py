"""Softmax centroids (Sikar, Garcez, Weyde, Bloomfield & Peeroo, "When to Accept Automated
Predictions and When to Defer to Human Judgment?", arXiv:2407.07821, 2024)."""

from __future__ import annotations


import torch

from .._arrays import accumulation_dtype
from ..outputs import Outputs
from ._learned import tensor
from .base import Detector, register, warn_unseen_classes
from .logit import _check_finite, _check_labels, _row_chunks, _saturate

__all__ = ["SoftmaxCentroid"]


@register
class SoftmaxCentroid(Detector):
    """Distance of the softmax output to the centroid of its predicted class (Sikar et al., 2024).

    Fit (labelled outputs, ``p = softmax(z)``, ``y_hat = argmax p``): the centroid of class ``c``
    is the mean softmax output of the *correct* predictions of ``c``,
    ``mu_c = mean_{x: y_hat = y = c} p(x)``. Score: ``d(x) = ||p(x) - mu_{y_hat(x)}||_2`` (higher =
    farther from what correct predictions look like = more likely wrong; no sign flip).

    The paper's per-class safety threshold is the smallest distance of a *wrong* prediction of
    ``c`` (on the fit outputs) to ``mu_c``: ``safety_thresholds_[c]``, ``+inf`` where the fit
    outputs have no wrong prediction of ``c``. :meth:`defer` applies that rule (defer when
    ``d >= safety_thresholds_[y_hat]``); :meth:`calibrate` sets one threshold over all classes,
    by ID coverage (``tpr``) or by a guaranteed risk (``risk``).

    A class that is never correctly predicted in the fit outputs gets the one-hot vector as its
    centroid (the softmax output of a fully confident prediction), with a warning.
    """

    name = "softmax_centroid"
    #: a class without wrong training predictions has an infinite safety threshold
    learned_state = {"centroids_": tensor("C", "C", dtype="float64"), "safety_thresholds_": tensor("C", dtype="float64", finite=False)}
    fit_requires = ("labels",)
    paper = "Sikar et al., arXiv 2024"

    def __init__(self) -> None:
        pass

    def _softmax_chunks(self, logits: torch.Tensor):
        n, c = logits.shape
        for rows in _row_chunks(n, c, torch.float64):
            yield rows, torch.softmax(_saturate(logits[rows].to("cpu", torch.float64)), dim=1)  # +inf logits: their limit

    def _fit(self, outputs: Outputs) -> None:
        logits, labels = outputs.logits, outputs.labels.to("cpu")
        _check_finite(logits, "logits", self.name)
        c = logits.shape[1]
        _check_labels(labels, c, self.name)
        sums = torch.zeros(c, c, dtype=torch.float64)
        counts = torch.zeros(c, dtype=torch.float64)
        for rows, p in self._softmax_chunks(logits):
            pred = p.argmax(dim=1)
            right = pred == labels[rows]
            sums.index_add_(0, pred[right], p[right])
            counts += torch.bincount(pred[right], minlength=c).to(torch.float64)
        centroids = torch.eye(c, dtype=torch.float64)
        seen = counts > 0
        centroids[seen] = sums[seen] / counts[seen, None]
        warn_unseen_classes(seen, "softmax_centroid: no correct prediction of class(es) {classes} in the fit outputs; "
                            "their centroid is the one-hot vector", stacklevel=3)
        self.centroids_ = centroids
        thresholds = torch.full((c,), float("inf"), dtype=torch.float64)
        for rows, p in self._softmax_chunks(logits):
            pred = p.argmax(dim=1)
            wrong = pred != labels[rows]
            d = torch.linalg.vector_norm(p[wrong] - centroids[pred[wrong]], dim=1)
            thresholds.scatter_reduce_(0, pred[wrong], d, reduce="amin")
        self.safety_thresholds_ = thresholds

    def _validate_state(self) -> None:
        c = self.centroids_.shape[0]
        if self.centroids_.shape != (c, c) or self.safety_thresholds_.shape != (c,):
            raise ValueError(f"centroids_ {tuple(self.centroids_.shape)} and safety_thresholds_ {tuple(self.safety_thresholds_.shape)} must be (C, C) and (C,)")

    def _distances(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.centroids_.shape[0]
        if logits.shape[1] != c:
            raise ValueError(f"softmax_centroid was fitted on {c} classes, these logits have {logits.shape[1]}")
        dists, preds = [], []
        for _, p in self._softmax_chunks(logits):
            pred = p.argmax(dim=1)
            dists.append(torch.linalg.vector_norm(p - self.centroids_[pred], dim=1))
            preds.append(pred)
        if not dists:
            return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.int64)
        return torch.cat(dists), torch.cat(preds)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        d, _ = self._distances(outputs.logits)
        return d.to(accumulation_dtype(outputs.logits.dtype)).to(outputs.logits.device)

    def defer(self, outputs: Outputs) -> torch.Tensor:
        """The paper's rule: True where ``d(x) >= safety_thresholds_[y_hat(x)]`` (defer to a human)."""
        self._check_fields(outputs, self.requires, "defer")
        self._check_fitted()
        d, pred = self._distances(outputs.logits)
        return (d >= self.safety_thresholds_[pred]).to(outputs.logits.device)

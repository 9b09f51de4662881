"""Class-conditional Gaussians with a shared covariance, streamed in float64 (the fit behind
:class:`~ebood.detectors.feature.Mahalanobis` and :class:`~ebood.detectors.feature.RelativeMahalanobis`)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ...outputs import Outputs
from .. import _linalg as la
from ._common import _batch_num_classes, _classes_text, _is_int, _FeatureDetector


class _ClassGaussian(_FeatureDetector):
    """Streaming class counts, class means and the within-class scatter (float64, Chan merge)."""

    fit_requires = ("labels",)
    streaming = True

    def __init__(self) -> None:
        pass

    def _reset(self) -> None:
        self._started = True
        self.class_counts_: torch.Tensor | None = None
        self.class_means_: torch.Tensor | None = None
        self.scatter_: torch.Tensor | None = None
        self.num_classes_: int | None = None

    def _moments(self) -> la.ClassMoments:
        return self.class_counts_, self.class_means_, self.scatter_

    def _set_moments(self, m: la.ClassMoments) -> None:
        self.class_counts_, self.class_means_, self.scatter_ = m

    def _fix_num_classes(self, c: int | None) -> None:
        if c is None:
            return
        if self.num_classes_ is None:
            seen = 0 if self.class_counts_ is None else int(self.class_counts_.shape[0])
            if seen > c:
                raise ValueError(f"detector {self.name!r}: earlier batches have labels up to {seen - 1}, but these outputs have {c} classes")
            self.num_classes_ = int(c)
        elif self.num_classes_ != c:
            raise ValueError(f"detector {self.name!r}: these outputs have {c} classes, earlier ones had {self.num_classes_}")

    def _accumulate(self, batch: Outputs) -> None:
        x = batch.feature()
        la.check_finite(x, "features", self.name)
        if self.scatter_ is not None and x.shape[1] != self.scatter_.shape[0]:
            raise ValueError(f"detector {self.name!r}: this batch has feature dimension {x.shape[1]}, earlier batches had {self.scatter_.shape[0]}")
        self._fix_num_classes(_batch_num_classes(batch))
        labels = batch.labels
        la.check_labels(labels, self.num_classes_, self.name)
        if labels.numel() == 0 and self.class_counts_ is not None:
            return
        have = 0 if self.class_counts_ is None else self.class_counts_.shape[0]
        c = max(self.num_classes_ or 0, have, int(labels.max()) + 1 if labels.numel() else 1)
        device = x.device if self.scatter_ is None else self.scatter_.device
        part = la.class_moments(x, labels, c, device=device)
        self._set_moments(part if self.class_counts_ is None else la.merge_moments(la.pad_classes(self._moments(), c), part))

    def _merge(self, other: "_ClassGaussian") -> None:
        if other.class_counts_ is None:
            return
        if self.class_counts_ is None:
            self._set_moments(tuple(t.clone() for t in other._moments()))
            self.num_classes_ = other.num_classes_
            return
        if other.scatter_.shape != self.scatter_.shape:
            raise ValueError(f"detector {self.name!r}: cannot merge fits of feature dimension {other.scatter_.shape[0]} and {self.scatter_.shape[0]}")
        self._fix_num_classes(other.num_classes_)
        other._fix_num_classes(self.num_classes_)
        c = max(self.class_counts_.shape[0], other.class_counts_.shape[0])
        theirs = tuple(t.to(self.scatter_.device) for t in la.pad_classes(other._moments(), c))
        self._set_moments(la.merge_moments(la.pad_classes(self._moments(), c), theirs))

    def _check_state(self) -> None:
        counts, means, scatter = self._moments()
        if not all(isinstance(t, torch.Tensor) for t in (counts, means, scatter)):
            raise ValueError("the state lacks class_counts_, class_means_ or scatter_")
        if counts.ndim != 1 or means.ndim != 2 or scatter.ndim != 2 or scatter.shape[0] != scatter.shape[1]:
            raise ValueError(f"class_counts_ {tuple(counts.shape)}, class_means_ {tuple(means.shape)}, scatter_ {tuple(scatter.shape)} must be (C,), (C, D), (D, D)")
        if means.shape != (counts.shape[0], scatter.shape[0]):
            raise ValueError(f"class_means_ has shape {tuple(means.shape)}, expected ({counts.shape[0]}, {scatter.shape[0]}) from class_counts_ and scatter_")
        if self.num_classes_ is not None and (not _is_int(self.num_classes_) or self.num_classes_ < counts.shape[0]):
            raise ValueError(f"num_classes_ {self.num_classes_!r} does not match class_counts_ of shape {tuple(counts.shape)}")

    def _class_gaussian(self) -> None:
        """Derive what scoring needs: the whitening ``W``, centre and whitened class means."""
        counts, means, scatter = self._moments()
        present = counts > 0
        if not bool(present.any()):
            raise ValueError(f"detector {self.name!r}: no training samples were seen")
        if not bool(present.all()):
            warnings.warn(
                f"{self.name}: class(es) {_classes_text(torch.nonzero(~present)[:, 0])} have no training samples; they are left out of the minimum over classes",
                RuntimeWarning,
                stacklevel=4,
            )
        n, center, _ = la.total_moments(self._moments())
        whiten = la.inverse_sqrt(scatter / n, self.name, "shared class covariance")
        self._n = n
        self._center = center
        self._whiten = whiten
        self._background: torch.Tensor | None = None
        self._present_means = means[present]
        self._classes = torch.nonzero(present)[:, 0]
        self._cache: dict[Any, tuple[torch.Tensor, ...]] = {}

    def _scoring_params(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """``(c, W, m, b0)`` in ``dtype``: the reference point ``c`` (the training mean rounded to
        ``dtype``), the whitening (class part, then the background part for RMD), the whitened
        class means ``(mu_k - c) W`` and background mean ``(mu - c) W0``. Offsets are taken from
        the *rounded* reference point in float64, so rounding the training mean to float32 costs
        nothing (features far from the origin would otherwise lose digits)."""
        key = (dtype, str(device))
        if key not in self._cache:
            ref = self._center.to(dtype).to(torch.float64)
            centres = (self._present_means - ref) @ self._whiten
            background = (self._center - ref) @ self._background if self._background is not None else ref[:0]
            whiten = self._whiten if self._background is None else torch.cat([self._whiten, self._background], dim=1)
            self._cache[key] = tuple(t.to(device, dtype) for t in (ref, whiten, centres, background))
        return self._cache[key]

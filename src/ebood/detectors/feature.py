"""Detectors that read penultimate features (and labels / the head to fit).

Every score here is an OOD score: higher = more out-of-distribution. Where a paper defines a
confidence (higher = more in-distribution), the docstring gives the paper's formula and says that
the score is its negation.

Fits that are sums over samples (class counts, class means, scatter matrices) stream: they are
accumulated in float64 batch by batch (``partial_fit``, or ``fit`` on an iterable of batches) and
two partial fits merge (``merge``) into exactly the fit on all their data. The neighbour-based
detectors (KNN, NNGuide) keep the training features themselves (their state *is* the data); they
stream and merge by appending. ConjNorm needs its class prototypes before it can estimate its
partition function, so it fits on all data at once.

Scores are computed in float32 for float16/bfloat16/float32 features and in float64 for float64
features, in chunks of rows so that memory stays bounded.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from .._arrays import accumulation_dtype
from ..outputs import Head, Outputs
from . import _linalg as la
from .base import Detector, register

__all__ = [
    "Mahalanobis",
    "RelativeMahalanobis",
    "ViM",
    "Residual",
    "KNN",
    "SHE",
    "FDBD",
    "NNGuide",
    "ConjNorm",
]


# ----- shared machinery -------------------------------------------------------------------------


def _batch_num_classes(batch: Outputs) -> int | None:
    """The class count that a batch's logits or head reveal (None when it has neither)."""
    if batch.logits is not None:
        return int(batch.logits.shape[1])
    if batch.head is not None:
        return int(batch.head.num_classes)
    return None


def _classes_text(idx: torch.Tensor) -> str:
    values = idx.tolist()
    return "[" + ", ".join(str(v) for v in values[:10]) + (", ...]" if len(values) > 10 else "]")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_positive_int(detector: str, name: str, value: Any, minimum: int = 1) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{detector}: {name} must be an integer >= {minimum}, got {value!r}")


def _check_positive_float(detector: str, name: str, value: Any, above: float = 0.0) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{detector}: {name} must be a number > {above:g}, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v) or v <= above:
        raise ValueError(f"{detector}: {name} must be a finite number > {above:g}, got {value!r}")
    return v


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


class _FeatureDetector(Detector):
    """Base of the detectors in this file.

    Streaming fits derive what scoring needs (``_finalize``: a covariance's inverse, a bank...)
    lazily, at the first ``score`` or ``save``, so that partial fits too small to be used on their
    own (a shard of one sample) can still be merged; warnings and errors about the data appear
    then. Loaded state is checked and finalised by ``_validate_state`` (without repeating the
    warnings of the fit)."""

    requires = ("features",)

    def _validate_state(self) -> None:
        self._check_state()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._finalize()

    def _check_state(self) -> None:
        """Shapes and types of the loaded state (ValueError naming the mismatch)."""

    def _features(self, outputs: Outputs, dim: int) -> torch.Tensor:
        x = outputs.feature()
        if x.shape[1] != dim:
            raise ValueError(f"detector {self.name!r}: features have dimension {x.shape[1]}, the detector was fitted on dimension {dim} (it expects {dim})")
        return x

    def _finite_scores(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out``, or a clear error where a score is not finite."""
        if not bool(torch.isfinite(out).all()):
            la.check_finite(x, "features", self.name)
            bad = int((~torch.isfinite(out)).sum())
            raise ValueError(f"detector {self.name!r}: {bad} score(s) are not finite (they overflow {out.dtype})")
        return out


class _KeepsHead:
    """Keeps a copy of the classifier head (``head_weight_``, ``head_bias_``) from the first batch;
    later batches, merged fits and scored outputs that carry a head must carry the same one."""

    name: str
    head_weight_: torch.Tensor | None = None
    head_bias_: torch.Tensor | None = None

    def _keep_head(self, head: Head) -> None:
        if self.head_weight_ is None:
            self.head_weight_ = head.weight.detach().clone()
            self.head_bias_ = head.bias.detach().clone()
        else:
            self._check_same_head(head.weight, head.bias, "this batch carries")

    def _check_same_head(self, weight: torch.Tensor, bias: torch.Tensor, who: str) -> None:
        w = weight.to(self.head_weight_.device, self.head_weight_.dtype)
        b = bias.to(self.head_bias_.device, self.head_bias_.dtype)
        if w.shape != self.head_weight_.shape:
            raise ValueError(
                f"detector {self.name!r}: {who} a head of shape {tuple(w.shape)}, the detector was fitted with a head of shape {tuple(self.head_weight_.shape)}"
            )
        if not (torch.equal(w, self.head_weight_) and torch.equal(b, self.head_bias_)):
            raise ValueError(f"detector {self.name!r}: {who} a different head from the one the detector was fitted with")

    def _check_scoring_head(self, outputs: Outputs) -> None:
        if outputs.head is not None:
            self._check_same_head(outputs.head.weight, outputs.head.bias, "the outputs carry")

    def _check_head_state(self, dim: int | None = None) -> None:
        w, b = self.head_weight_, self.head_bias_
        if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise ValueError("the state has no head (head_weight_, head_bias_)")
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"head_weight_ {tuple(w.shape)} and head_bias_ {tuple(b.shape)} must be (C, D) and (C,)")
        if dim is not None and w.shape[1] != dim:
            raise ValueError(f"head_weight_ has shape {tuple(w.shape)}, the feature statistics have dimension {dim}")

    def _head_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.head_bias_.to(x.device, x.dtype), x, self.head_weight_.to(x.device, x.dtype).T)


# ----- class-conditional Gaussians --------------------------------------------------------------


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


@register
class Mahalanobis(_ClassGaussian):
    """Mahalanobis distance to the closest class-conditional Gaussian with a shared covariance
    (Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples
    and Adversarial Attacks", NeurIPS 2018), on the penultimate features, without input
    preprocessing or layer ensembles (``mahalanobis_ensemble`` has those).

    Fit (labelled ID features): class means ``mu_c`` and the shared covariance of the
    class-centred features ``Sigma = 1/N sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T``.
    Score: ``min_c (x - mu_c)^T Sigma^+ (x - mu_c)``, the squared distance to the closest class
    (already higher = more OOD; the paper's confidence is its negation).

    ``Sigma^+`` is the inverse, or the pseudo-inverse (scipy ``pinvh``'s rank rule, as sklearn's
    ``EmpiricalCovariance``) with a warning when Sigma is singular (N < D, constant features).
    Classes without training samples are left out of the minimum (with a warning); labels must be
    ``0..C-1`` where C is known from the logits or head of the training outputs.

    Scoring: one product ``y = (x - m) W`` with ``W W^T = Sigma^+`` (``m`` the training mean
    rounded to the features' dtype), one with the whitened class means to rank the classes by the
    expanded form ``||y||^2 - 2 y.m_c + ||m_c||^2``, then ``||y - m_c||^2`` recomputed for the best
    class (and for every class within the expanded form's rounding margin of it), so the score
    keeps float32 accuracy where the expanded form cancels.
    """

    name = "mahalanobis"
    paper = "Lee et al., NeurIPS 2018"

    def _finalize(self) -> None:
        self._class_gaussian()

    def _score(self, outputs: Outputs) -> torch.Tensor:
        x = self._features(outputs, self.scatter_.shape[0])
        acc = accumulation_dtype(x.dtype)
        center, whiten, centres, _ = self._scoring_params(acc, x.device)
        per_row = (x.shape[1] + whiten.shape[1] * 6 + centres.shape[0]) * torch.finfo(acc).bits // 8
        out = torch.empty(x.shape[0], dtype=acc, device=x.device)
        for rows in la.row_slices(x.shape[0], per_row):
            y = (x[rows].to(acc) - center) @ whiten
            out[rows] = la.nearest_whitened(y, centres)[0]
        return self._finite_scores(out, x)


@register
class RelativeMahalanobis(_ClassGaussian):
    """Relative Mahalanobis distance (Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, "A Simple
    Fix to Mahalanobis Distance for Improving Near-OOD Detection", 2021).

    Fit: the class-conditional Gaussians of :class:`Mahalanobis` (class means, shared class-centred
    covariance ``Sigma``) and a background Gaussian of all training features (mean ``mu_0``,
    covariance ``Sigma_0``, as OpenOOD's RMDS). With ``MD_c(x) = (x - mu_c)^T Sigma^+ (x - mu_c)``
    and ``MD_0(x) = (x - mu_0)^T Sigma_0^+ (x - mu_0)``:
    ``score = min_c MD_c(x) - MD_0(x)`` (the paper's confidence is ``-min_c (MD_c - MD_0)``,
    negated here: higher = more OOD). The background covariance is the within-class scatter plus
    the between-class scatter of the class means, so it streams with the same sums.
    """

    name = "relative_mahalanobis"
    paper = "Ren et al., 2021 (arXiv:2106.09022)"

    def _finalize(self) -> None:
        self._class_gaussian()
        _, _, total = la.total_moments(self._moments())
        self._background = la.inverse_sqrt(total / self._n, self.name, "background covariance")

    def _score(self, outputs: Outputs) -> torch.Tensor:
        x = self._features(outputs, self.scatter_.shape[0])
        acc = accumulation_dtype(x.dtype)
        center, joint, centres, background = self._scoring_params(acc, x.device)
        r = centres.shape[1]
        per_row = (x.shape[1] + joint.shape[1] * 2 + r * 5 + centres.shape[0]) * torch.finfo(acc).bits // 8
        out = torch.empty(x.shape[0], dtype=acc, device=x.device)
        for rows in la.row_slices(x.shape[0], per_row):
            y = (x[rows].to(acc) - center) @ joint  # class part and background part in one product
            md_class = la.nearest_whitened(y[:, :r], centres)[0]
            out[rows] = md_class - (y[:, r:] - background).square().sum(dim=1)
        return self._finite_scores(out, x)


# ----- principal space: ViM and Residual --------------------------------------------------------


def _default_vim_dim(d: int) -> int:
    """The official ViM code's rule: 1000 for D >= 2048, 512 for D >= 768, else D / 2."""
    return 1000 if d >= 2048 else 512 if d >= 768 else d // 2


class _PrincipalSpace(_KeepsHead, _FeatureDetector):
    """Streaming mean and scatter of the features (float64) and the head, for ViM and Residual."""

    fit_requires = ("head",)
    streaming = True

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim
        if dim is not None:
            _check_positive_int(self.name, "dim", dim)

    def _reset(self) -> None:
        self._started = True
        self.head_weight_ = None
        self.head_bias_ = None
        self.sample_count_ = 0
        self.feature_mean_: torch.Tensor | None = None
        self.scatter_: torch.Tensor | None = None

    def _accumulate(self, batch: Outputs) -> None:
        x = batch.feature()
        la.check_finite(x, "features", self.name)
        self._keep_head(batch.head)
        self._residual_dim(x.shape[1])  # a dim that leaves no residual is an error right away
        if x.shape[0] == 0:
            return
        device = x.device if self.scatter_ is None else self.scatter_.device
        part = la.class_moments(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device), 1, device=device)
        self._add_moments(part)

    def _add_moments(self, part: la.ClassMoments) -> None:
        if self.scatter_ is None:
            counts, means, scatter = (t.clone() for t in part)
        else:
            mine = (torch.tensor([float(self.sample_count_)], dtype=torch.float64, device=self.scatter_.device), self.feature_mean_[None], self.scatter_)
            counts, means, scatter = la.merge_moments(mine, tuple(t.to(self.scatter_.device) for t in part))
        self.sample_count_ = int(round(float(counts[0])))
        self.feature_mean_ = means[0]
        self.scatter_ = scatter

    def _merge(self, other: "_PrincipalSpace") -> None:
        if other.head_weight_ is None:
            return
        if self.head_weight_ is None:
            self._keep_head(Head(other.head_weight_, other.head_bias_))
        else:
            self._check_same_head(other.head_weight_, other.head_bias_, "the other fit has")
        if other.scatter_ is not None:
            counts = torch.tensor([float(other.sample_count_)], dtype=torch.float64)
            self._add_moments((counts, other.feature_mean_[None], other.scatter_))

    def _check_state(self) -> None:
        mean, scatter = self.feature_mean_, self.scatter_
        if not isinstance(mean, torch.Tensor) or not isinstance(scatter, torch.Tensor):
            raise ValueError("the state lacks feature_mean_ or scatter_")
        d = mean.shape[0] if mean.ndim == 1 else -1
        if mean.ndim != 1 or scatter.shape != (d, d):
            raise ValueError(f"feature_mean_ {tuple(mean.shape)} and scatter_ {tuple(scatter.shape)} must be (D,) and (D, D)")
        self._check_head_state(d)
        self.sample_count_ = _check_count(self.sample_count_, "sample_count_")

    def _residual_dim(self, d: int) -> int:
        """The principal dimension used for features of dimension ``d`` (an error if >= d)."""
        dim = _default_vim_dim(d) if self.dim is None else int(self.dim)
        if dim >= d:
            raise ValueError(
                f"{self.name}: dim={dim} must be smaller than the feature dimension {d} "
                "(the principal space would leave no residual; the residual norm and ViM's alpha are undefined)"
            )
        if dim < 1:
            raise ValueError(f"{self.name}: the features have dimension {d}; the principal space needs dim >= 1 and < D")
        return dim

    def _principal_space(self) -> None:
        """Origin ``u = -pinv(W) b`` and an orthonormal basis of the residual space: the
        eigenvectors of the second moment of ``x - u`` beyond the ``dim`` largest eigenvalues."""
        if self.sample_count_ <= 0:
            raise ValueError(f"detector {self.name!r}: no training samples were seen")
        d = self.feature_mean_.shape[0]
        dim = self._residual_dim(d)
        w = self.head_weight_.to(torch.float64)
        b = self.head_bias_.to(torch.float64, copy=False).to(w.device)
        # singular values below the head's own rounding (e.g. float32 rows that sum to zero) are
        # treated as zero, like numpy's rule in the head's dtype, so that noise does not blow up u
        rtol = max(w.shape) * torch.finfo(self.head_weight_.dtype).eps
        origin = -(torch.linalg.pinv(w, rtol=rtol) @ b).to(self.scatter_.device)
        shift = self.feature_mean_ - origin
        moment = self.scatter_ / self.sample_count_ + torch.outer(shift, shift)
        _, vecs = torch.linalg.eigh((moment + moment.T) / 2)  # ascending eigenvalues
        basis = vecs[:, : d - dim].contiguous()
        self._residual_basis = basis
        self._origin_residual = origin @ basis  # u NS, subtracted in float64 at scoring
        self._cache: dict[Any, torch.Tensor] = {}
        self._dim_used = dim

    def _residual_norms(self, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """``||(x - u) NS|| = ||x NS - u NS||`` per row, chunked: ``x NS`` in ``acc``, the
        subtraction of the constant ``u NS`` in float64 (``u`` can be large: no cancellation)."""
        key = (acc, str(x.device))
        if key not in self._cache:
            self._cache[key] = self._residual_basis.to(x.device, acc)
        basis = self._cache[key]
        shift = self._origin_residual.to(x.device)
        out = torch.empty(x.shape[0], dtype=acc, device=x.device)
        per_row = (x.shape[1] + basis.shape[1] * 3) * 8
        for rows in la.row_slices(x.shape[0], per_row):
            proj = (x[rows].to(acc) @ basis).to(torch.float64)
            out[rows] = torch.linalg.vector_norm(proj - shift, dim=1).to(acc)
        return out


@register
class Residual(_PrincipalSpace):
    """Residual norm (Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit
    Matching", CVPR 2022; the paper's "Residual" baseline).

    Fit: the origin ``u = -pinv(W) b`` of the head ``(W, b)``, and the principal space: the
    ``dim`` eigenvectors of largest eigenvalue of the second moment
    ``1/N sum_i (x_i - u)(x_i - u)^T`` (sklearn ``EmpiricalCovariance(assume_centered=True)`` of
    ``x - u``, as the official code; ``pinv`` drops singular values below ``max(C, D) * eps`` of
    the head's dtype, numpy's rule, so float32 rounding of a rank-deficient head does not throw
    ``u`` far away). Score: ``||x^{P-perp}|| = ||(x - u) NS||``, the norm of the
    part of ``x - u`` outside the principal space (``NS`` an orthonormal basis of its complement;
    higher = more OOD). Default ``dim``: the official code's rule (1000 for D >= 2048, 512 for
    D >= 768, else D/2, e.g. OpenOOD v1.5's 256 for ResNet-18's 512 features).
    The second moment streams as mean + centred scatter (float64).
    """

    name = "residual"
    paper = "Wang et al., CVPR 2022"

    def _finalize(self) -> None:
        self._principal_space()

    def _score(self, outputs: Outputs) -> torch.Tensor:
        self._check_scoring_head(outputs)
        x = self._features(outputs, self.feature_mean_.shape[0])
        out = self._residual_norms(x, accumulation_dtype(x.dtype))
        return self._finite_scores(out, x)


@register
class ViM(_PrincipalSpace):
    """ViM: virtual-logit matching (Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with
    Virtual-logit Matching", CVPR 2022).

    Fit: the principal space of :class:`Residual` (origin ``u = -pinv(W) b``, top-``dim``
    eigenvectors of the second moment of ``x - u``) and
    ``alpha = sum_i max_j z_ij / sum_i ||x_i^{P-perp}||`` over the training set, with
    ``z = W x + b`` the head's logits. Score, with ``vlogit = alpha ||x^{P-perp}||``:
    ``score = vlogit - logsumexp_j z_j`` (the official code's confidence is
    ``logsumexp(z) - vlogit``, negated here: higher = more OOD). Logits are recomputed from the
    kept head, so scoring needs only features. Default ``dim`` as :class:`Residual`.

    Streaming: the max-logit sum is exact; the residual norms need the final principal space, so
    they are averaged over a uniform sample of at most ``ALPHA_SAMPLE`` training rows kept during
    the fit (a bottom-k sample by a hash of each row: the same rows whatever the batching or the
    merge order). With at most ``ALPHA_SAMPLE`` training samples alpha is exact; beyond, its
    relative error is about ``cv / sqrt(ALPHA_SAMPLE)`` (cv: the coefficient of variation of the
    residual norms, typically < 0.5, so < 0.5 %).
    """

    name = "vim"
    paper = "Wang et al., CVPR 2022"

    #: training rows kept to average the residual norm for alpha
    ALPHA_SAMPLE = 10000

    def _reset(self) -> None:
        super()._reset()
        self.max_logit_sum_ = 0.0
        self.alpha_sample_: torch.Tensor | None = None

    def _accumulate(self, batch: Outputs) -> None:
        super()._accumulate(batch)
        x = batch.feature()
        if x.shape[0] == 0:
            return
        acc = accumulation_dtype(x.dtype)
        self.max_logit_sum_ = float(self.max_logit_sum_) + self._max_logit_sum(x, acc)
        self._add_sample(x.to(acc))

    def _max_logit_sum(self, x: torch.Tensor, acc: torch.dtype) -> float:
        """``sum_i max_j z_ij`` of a batch (float64 sum). On the CPU in numpy, like the moments
        just before, so that BLAS and torch's thread pools do not take turns spinning."""
        total = 0.0
        per_row = self.head_weight_.shape[0] * 2 * torch.finfo(acc).bits // 8
        if x.device.type == "cpu" and self.head_weight_.device.type == "cpu" and acc in (torch.float32, torch.float64):
            w = self.head_weight_.detach().to(acc).numpy()
            b = self.head_bias_.detach().to(acc).numpy()
            data = x.detach().to(acc).numpy()
            for rows in la.row_slices(x.shape[0], per_row):
                logits = data[rows] @ w.T
                logits += b
                total += float(logits.max(axis=1).sum(dtype=np.float64))
            return total
        for rows in la.row_slices(x.shape[0], per_row):
            total += float(self._head_logits(x[rows].to(acc)).amax(dim=1).to(torch.float64).sum())
        return total

    def _add_sample(self, rows: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        """Offer rows to the bottom-k sample; pruning waits until twice the sample size is buffered."""
        rows = rows.to(self.scatter_.device)
        if not hasattr(self, "_offered"):
            self._offered: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._offered.append((rows, la.row_keys(rows) if keys is None else keys))
        if sum(r.shape[0] for r, _ in self._offered) > 2 * self.ALPHA_SAMPLE:
            self._prune_sample()

    def _prune_sample(self) -> None:
        """Keep the ``ALPHA_SAMPLE`` rows of smallest key, sorted by key (a canonical order);
        only the kept rows are copied."""
        parts = list(getattr(self, "_offered", []))
        if self.alpha_sample_ is not None:
            kept = getattr(self, "_sample_keys", None)
            if kept is None or kept.shape[0] != self.alpha_sample_.shape[0]:  # e.g. after loading
                kept = la.row_keys(self.alpha_sample_)
            parts.insert(0, (self.alpha_sample_, kept))
        self._offered = []
        if not parts:
            return
        dtype, device = parts[0][0].dtype, parts[0][0].device
        keys = torch.cat([k.to(device) for _, k in parts])
        ends = torch.tensor([r.shape[0] for r, _ in parts]).cumsum(0).tolist()

        def rows_at(at: torch.Tensor) -> torch.Tensor:
            out = torch.empty(at.shape[0], parts[0][0].shape[1], dtype=dtype, device=device)
            start = 0
            for (rows, _), end in zip(parts, ends):
                mine = (at >= start) & (at < end)
                if bool(mine.any()):
                    out[mine] = rows[(at[mine] - start).to(rows.device)].to(device, dtype)
                start = end
            return out

        order = la.bottom_k_order(keys, self.ALPHA_SAMPLE, rows_at)
        self.alpha_sample_, self._sample_keys = rows_at(order), keys[order]

    def _merge(self, other: "ViM") -> None:
        super()._merge(other)
        other._prune_sample()
        if other.alpha_sample_ is not None:
            self.max_logit_sum_ = float(self.max_logit_sum_) + float(other.max_logit_sum_)
            self._add_sample(other.alpha_sample_, other._sample_keys)

    def _check_state(self) -> None:
        super()._check_state()
        s = self.alpha_sample_
        d = self.feature_mean_.shape[0]
        expected = min(self.sample_count_, self.ALPHA_SAMPLE)
        if not isinstance(s, torch.Tensor) or s.ndim != 2 or s.shape != (expected, d):
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else None
            raise ValueError(f"alpha_sample_ has shape {shape}, expected ({expected}, {d}) from sample_count_ and feature_mean_")
        if isinstance(self.max_logit_sum_, bool) or not isinstance(self.max_logit_sum_, (int, float)) or not math.isfinite(self.max_logit_sum_):
            raise ValueError(f"max_logit_sum_ must be a finite number, got {self.max_logit_sum_!r}")

    def _finalize(self) -> None:
        self._prune_sample()
        self._principal_space()
        sample = self.alpha_sample_
        residual = self._residual_norms(sample, torch.float64).mean()
        if not bool(residual > 0):
            raise ValueError(
                f"{self.name}: the training features have no residual outside the principal space of dim={self._dim_used} "
                "(alpha = mean max-logit / mean residual is undefined); use a smaller dim"
            )
        self._alpha = (float(self.max_logit_sum_) / self.sample_count_) / float(residual)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        self._check_scoring_head(outputs)
        x = self._features(outputs, self.feature_mean_.shape[0])
        acc = accumulation_dtype(x.dtype)
        residual = self._residual_norms(x, acc)
        energy = torch.empty_like(residual)
        for rows in la.row_slices(x.shape[0], self.head_weight_.shape[0] * 3 * torch.finfo(acc).bits // 8):
            energy[rows] = torch.logsumexp(self._head_logits(x[rows].to(acc)), dim=1)
        return self._finite_scores(self._alpha * residual - energy, x)


# ----- nearest neighbours -----------------------------------------------------------------------


class _Bank(_FeatureDetector):
    """A bank of (transformed) training rows that streams and merges by appending."""

    streaming = True

    def _reset(self) -> None:
        self._started = True
        self.bank_: torch.Tensor | None = None
        self._pending: list[torch.Tensor] = []

    def _append(self, rows: torch.Tensor) -> None:
        if not hasattr(self, "_pending"):
            self._pending = []
        d = self.bank_.shape[1] if self.bank_ is not None else self._pending[0].shape[1] if self._pending else rows.shape[1]
        if rows.shape[1] != d:
            raise ValueError(f"detector {self.name!r}: this batch has feature dimension {rows.shape[1]}, earlier batches had {d}")
        self._pending.append(rows)

    def _bank_parts(self) -> list[torch.Tensor]:
        parts = [] if self.bank_ is None else [self.bank_]
        return parts + list(getattr(self, "_pending", []))

    def _merge(self, other: "_Bank") -> None:
        for part in other._bank_parts():
            self._append(part)

    def _collect_bank(self) -> torch.Tensor:
        parts = self._bank_parts()
        if not parts:
            raise ValueError(f"detector {self.name!r}: no training samples were seen")
        dtype = parts[0].dtype
        self.bank_ = parts[0] if len(parts) == 1 else torch.cat([p.to(parts[0].device, dtype) for p in parts])
        self._pending = []
        if self.bank_.shape[0] == 0:
            raise ValueError(f"detector {self.name!r}: no training samples were seen")
        return self.bank_

    def _check_k(self, k: int) -> None:
        n = self.bank_.shape[0]
        if k > n:
            raise ValueError(f"{self.name}: k={k} is larger than the bank of {n} training samples; use k <= {n} or fit on more samples")

    def _check_state(self) -> None:
        if not isinstance(self.bank_, torch.Tensor) or self.bank_.ndim != 2:
            raise ValueError("bank_ must be a (N, D) tensor")
        n = _check_count(self.bank_size_, "bank_size_")
        if self.bank_.shape[0] != n:
            raise ValueError(f"bank_ has shape {tuple(self.bank_.shape)}, but the state records {n} training samples (bank_size_)")


_INDEXES = ("flat", "ivf", "hnsw")


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("knn: index='ivf' / 'hnsw' needs faiss (pip install faiss-cpu)") from exc
    return faiss


@register
class KNN(_Bank):
    """Deep nearest neighbours (Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep
    Nearest Neighbors", ICML 2022).

    Fit: the bank of L2-normalised training features ``z_i = x_i / ||x_i||``.
    Score: ``||z - z_(k)||``, the Euclidean distance from the normalised input to its k-th nearest
    bank row (the paper's score; its confidence is the negated distance, and its code uses the
    squared distance, a monotone transform; higher = more OOD). Default ``k = 50`` (the paper's
    CIFAR-10 setting and OpenOOD v1.5's). ``k`` larger than the bank is an error.

    ``index="flat"`` (default) is exact: the best candidates by inner product (``faiss.knn`` on
    float32 CPU tensors, else chunked products and ``torch.topk``; on unit vectors
    ``||a - b||^2 = 2 - 2 a.b``), then the distances around rank k recomputed from difference
    vectors, so that close neighbours lose no digits to ``2 - 2 a.b``
    (:func:`ebood.detectors._linalg.kth_from_candidates`).

    Approximate modes propose candidates that are then measured exactly; a query with fewer than
    ``k`` candidates falls back to the exact search:

    * ``index="ivf"``: an inverted file, ``nlist = 2 sqrt(N)`` lists from spherical k-means (faiss),
      each query searching its ``nprobe = ceil(nlist / 56)`` (about 1.8 %) closest lists, with one
      matrix product per list (:func:`ebood.detectors._linalg.ivf_top_k`). Saved as tensors.
    * ``index="hnsw"``: faiss ``IndexHNSWFlat`` (M = 32, efConstruction = 64,
      efSearch = max(128, 2 (k + 5))), saved serialised in a uint8 tensor.
    """

    name = "knn"
    paper = "Sun et al., ICML 2022"

    def __init__(self, k: int = 50, index: str = "flat") -> None:
        self.k = k
        self.index = index
        _check_positive_int(self.name, "k", k)
        if index not in _INDEXES:
            raise ValueError(f"knn: unknown index {index!r}; choose one of 'flat' (exact), 'ivf', 'hnsw' (approximate)")

    def _reset(self) -> None:
        super()._reset()
        self.bank_size_ = 0
        self.index_bytes_: torch.Tensor | None = None  # hnsw: the serialised faiss index
        self.ivf_centroids_: torch.Tensor | None = None  # ivf: (nlist, D)
        self.ivf_offsets_: torch.Tensor | None = None  # ivf: list l holds bank_ rows offsets[l]:offsets[l+1]

    def _accumulate(self, batch: Outputs) -> None:
        x = batch.feature()
        self._append(la.normalise_finite_rows(x.to(accumulation_dtype(x.dtype)), "features", self.name))

    # ----- fit ---------------------------------------------------------------------------------
    def _finalize(self) -> None:
        grew = bool(getattr(self, "_pending", []))
        bank = self._collect_bank()
        self.bank_size_ = int(bank.shape[0])
        self._check_k(self.k)
        if self.index == "ivf" and (grew or self.ivf_centroids_ is None):
            self._build_ivf(bank)
        elif self.index == "hnsw" and (grew or self.index_bytes_ is None):
            self._index = self._build_hnsw(bank)
            self.index_bytes_ = torch.from_numpy(_faiss().serialize_index(self._index).copy())

    @staticmethod
    def _ivf_shape(n: int) -> tuple[int, int]:
        nlist = max(1, min(int(round(2 * math.sqrt(n))), n // 39))
        return nlist, max(1, math.ceil(nlist / 56))

    def _build_ivf(self, bank: torch.Tensor) -> None:
        nlist, _ = self._ivf_shape(bank.shape[0])
        centroids, lists = la.ivf_lists(bank, nlist)
        order = torch.argsort(lists, stable=True)
        self.bank_ = bank[order]  # the bank sorted by list (its order does not matter to KNN)
        counts = torch.bincount(lists, minlength=nlist)
        self.ivf_offsets_ = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self.ivf_centroids_ = centroids

    def _build_hnsw(self, bank: torch.Tensor) -> Any:
        faiss = _faiss()
        data = np.ascontiguousarray(bank.detach().to("cpu", torch.float32).numpy())
        index = faiss.IndexHNSWFlat(data.shape[1], 32)
        index.hnsw.efConstruction = 64
        index.add(data)
        self._tune_hnsw(index)
        return index

    def _tune_hnsw(self, index: Any) -> None:
        index.hnsw.efSearch = max(128, 2 * (self.k + la.WINDOW + 1))

    def _load_hnsw(self) -> Any:
        faiss = _faiss()
        try:
            index = faiss.deserialize_index(np.ascontiguousarray(self.index_bytes_.cpu().numpy()))
        except RuntimeError as exc:
            raise ValueError(f"index_bytes_ is not a valid faiss index: {str(exc).splitlines()[0]}") from None
        self._tune_hnsw(index)
        return index

    def _check_state(self) -> None:
        super()._check_state()
        n, d = self.bank_.shape
        kept = {"hnsw": self.index_bytes_ is not None, "ivf": self.ivf_centroids_ is not None or self.ivf_offsets_ is not None}
        for other, present in kept.items():
            if other != self.index and present:
                raise ValueError(f"the state holds an {other} index, but index={self.index!r}")
        if self.index == "hnsw":
            b = self.index_bytes_
            if not isinstance(b, torch.Tensor) or b.dtype != torch.uint8 or b.ndim != 1:
                raise ValueError("index='hnsw' needs index_bytes_, a 1-D uint8 tensor (a serialised faiss index)")
            index = self._load_hnsw()
            if index.ntotal != n or index.d != d:
                raise ValueError(f"the faiss index holds {index.ntotal} vectors of dimension {index.d}, bank_ has shape {(n, d)}")
            self._index = index
        elif self.index == "ivf":
            c, o = self.ivf_centroids_, self.ivf_offsets_
            if not isinstance(c, torch.Tensor) or not isinstance(o, torch.Tensor) or c.ndim != 2 or c.shape[1] != d or o.shape != (c.shape[0] + 1,):
                shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in (c, o)]
                raise ValueError(f"ivf_centroids_ {shapes[0]} and ivf_offsets_ {shapes[1]} must be (nlist, {d}) and (nlist + 1,)")
            if int(o[0]) != 0 or int(o[-1]) != n or bool((o[1:] < o[:-1]).any()):
                raise ValueError(f"ivf_offsets_ must rise from 0 to the bank size {n}")

    # ----- scoring ----------------------------------------------------------------------------
    def _score(self, outputs: Outputs) -> torch.Tensor:
        x = self._features(outputs, self.bank_.shape[1])
        acc = accumulation_dtype(x.dtype)
        bank = self.bank_.to(x.device, acc)
        queries = la.normalise_rows(x.to(acc))
        if self.index == "flat":
            out = la.kth_neighbour_distance(queries, bank, self.k)
        else:
            out = self._approximate(queries, bank)
        return self._finite_scores(out, x)

    def _candidates(self, queries: torch.Tensor, bank: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate best candidates: similarities (decreasing, ``-inf`` when missing) and rows."""
        if self.index == "ivf":
            _, nprobe = self._ivf_shape(bank.shape[0])
            centroids = self.ivf_centroids_.to(queries.device, queries.dtype)
            return la.ivf_top_k(queries, bank, centroids, self.ivf_offsets_, nprobe, kk)
        data = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        dist_sq, ids = self._index.search(data, kk)
        index = torch.from_numpy(ids).to(queries.device)
        values = torch.from_numpy(1.0 - dist_sq / 2.0).to(queries.device, queries.dtype)  # unit vectors
        values[index < 0] = -math.inf
        return values, index.clamp_min(0)

    def _approximate(self, queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        kk = min(bank.shape[0], self.k + la.WINDOW + 1)
        values, index = self._candidates(queries, bank, kk)
        out = la.kth_from_candidates(queries, bank, values, index, self.k, exhaustive=False)
        valid = torch.isfinite(values)
        partial = torch.nonzero(~valid.all(dim=1))[:, 0]  # fewer than kk candidates found
        if partial.numel():
            q = queries[partial]
            dist = la.candidate_distances(q, bank, index[partial])
            dist[~valid[partial]] = math.inf
            short = valid[partial].sum(dim=1) < self.k
            out[partial] = torch.kthvalue(dist, self.k, dim=1).values
            if bool(short.any()):
                out[partial[short]] = la.kth_neighbour_distance(q[short], bank, self.k)
        return out


@register
class NNGuide(_Bank):
    """NNGuide: nearest-neighbour guidance (Park, Jung & Teoh, "Nearest Neighbor Guidance for
    Out-of-Distribution Detection", ICCV 2023).

    Fit: the guide bank ``g_i = (x_i / ||x_i||) * logsumexp(z_i)``: normalised training features
    scaled by their energy confidence (``z`` the logits). Score, with ``u = x / ||x||``:
    ``guidance(x) = mean of the k largest u . g_i`` and the paper's confidence
    ``guidance(x) * logsumexp(z(x))``, negated here (higher = more OOD), as OpenOOD v1.5 and the
    official code. Default ``k = 100`` (OpenOOD v1.5). The bank holds every training sample given
    to ``fit`` (OpenOOD keeps a fraction ``alpha`` of the training set: fit on a subset for that).
    """

    name = "nnguide"
    paper = "Park et al., ICCV 2023"
    requires = ("features", "logits")

    def __init__(self, k: int = 100) -> None:
        self.k = k
        _check_positive_int(self.name, "k", k)

    def _reset(self) -> None:
        super()._reset()
        self.bank_size_ = 0

    def _accumulate(self, batch: Outputs) -> None:
        x, z = batch.feature(), batch.logits
        la.check_finite(x, "features", self.name)
        la.check_finite(z, "logits", self.name)
        acc = accumulation_dtype(x.dtype)
        confidence = torch.logsumexp(z.to(x.device, acc), dim=1)
        self._append(la.normalise_rows(x.to(acc)) * confidence[:, None])

    def _finalize(self) -> None:
        self.bank_size_ = int(self._collect_bank().shape[0])
        self._check_k(self.k)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        x = self._features(outputs, self.bank_.shape[1])
        acc = accumulation_dtype(x.dtype)
        guidance = la.top_k_similarity_mean(la.normalise_rows(x.to(acc)), self.bank_.to(x.device, acc), self.k)
        energy = torch.logsumexp(outputs.logits.to(x.device, acc), dim=1)
        return self._finite_scores(-(guidance * energy), x)


# ----- class patterns: SHE ----------------------------------------------------------------------


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


# ----- decision boundaries: fDBD ----------------------------------------------------------------


@register
class FDBD(_KeepsHead, _FeatureDetector):
    """fDBD: fast decision-boundary-based detection (Liu & Qin, "Fast Decision Boundary based
    Out-of-Distribution Detector", ICML 2024).

    With the head ``z = W x + b`` and ``f = argmax_c z_c``, the distance of ``x`` to the decision
    boundary between ``f`` and ``c`` is ``|(w_f - w_c) . x + (b_f - b_c)| / ||w_f - w_c||``. The
    paper's confidence is the average of these distances over ``c != f``, regularised by the
    distance to the training mean:
    ``(1 / (C - 1)) sum_{c != f} |z_f - z_c| / ||w_f - w_c||  /  ||x - mu_train||``
    (OpenOOD v1.5 uses the sum instead of the average, the same ranking, and by default the same
    normaliser ``||x - mu_train||``). Score: its negation (higher = more OOD).

    Fit: the head and the training mean (batch sums accumulated in float64: streams and merges). Pairs of classes
    with identical weight rows have no decision boundary and are left out of the average (with a
    warning); an input exactly at the training mean has its normaliser clamped to
    ``sqrt(tiny)`` of the dtype instead of dividing by zero.
    """

    name = "fdbd"
    paper = "Liu & Qin, ICML 2024"
    fit_requires = ("head",)
    streaming = True

    def __init__(self) -> None:
        pass

    def _reset(self) -> None:
        self._started = True
        self.head_weight_ = None
        self.head_bias_ = None
        self.feature_sum_: torch.Tensor | None = None
        self.sample_count_ = 0

    def _accumulate(self, batch: Outputs) -> None:
        x = batch.feature()
        if batch.head.num_classes < 2:
            raise ValueError(f"{self.name}: the head has {batch.head.num_classes} class; decision boundaries need at least 2 classes")
        self._keep_head(batch.head)
        if self.feature_sum_ is None:
            self.feature_sum_ = torch.zeros(x.shape[1], dtype=torch.float64, device=self.head_weight_.device)
        # the batch's column sums in the features' precision (torch sums by cascades: an error of
        # a few ulps), accumulated over batches in float64
        sums = x.sum(dim=0, dtype=accumulation_dtype(x.dtype)).to(torch.float64)
        if not bool(torch.isfinite(sums).all()):  # NaN / inf in the batch (or an overflow)
            la.check_finite(x, "features", self.name)
            raise ValueError(f"detector {self.name!r}: the feature sums overflow {accumulation_dtype(x.dtype)}")
        self.feature_sum_ += sums.to(self.feature_sum_.device)
        self.sample_count_ = int(self.sample_count_) + int(x.shape[0])

    def _merge(self, other: "FDBD") -> None:
        if other.feature_sum_ is None:
            return
        if self.head_weight_ is None:
            self._keep_head(Head(other.head_weight_, other.head_bias_))
            self.feature_sum_ = torch.zeros_like(other.feature_sum_)
        else:
            self._check_same_head(other.head_weight_, other.head_bias_, "the other fit has")
        self.feature_sum_ += other.feature_sum_.to(self.feature_sum_.device)
        self.sample_count_ = int(self.sample_count_) + int(other.sample_count_)

    def _check_state(self) -> None:
        if not isinstance(self.feature_sum_, torch.Tensor) or self.feature_sum_.ndim != 1:
            raise ValueError("feature_sum_ must be a (D,) tensor")
        self._check_head_state(self.feature_sum_.shape[0])
        self.sample_count_ = _check_count(self.sample_count_, "sample_count_")

    def _finalize(self) -> None:
        if self.sample_count_ <= 0:
            raise ValueError(f"detector {self.name!r}: no training samples were seen")
        c = self.head_weight_.shape[0]
        if c < 2:
            raise ValueError(f"{self.name}: the head has {c} class; decision boundaries need at least 2 classes")
        w = self.head_weight_.to(torch.float64)
        sq = w.square().sum(dim=1)
        gram = w @ w.T
        dist_sq = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
        # pairs whose squared distance is at rounding level of ||w||^2 have identical rows
        degenerate = dist_sq <= 8 * torch.finfo(torch.float64).eps * (sq[:, None] + sq[None, :])
        degenerate.fill_diagonal_(True)
        inverse = torch.where(degenerate, torch.zeros_like(dist_sq), 1 / dist_sq.sqrt().clamp_min(torch.finfo(torch.float64).tiny))
        partners = (~degenerate).sum(dim=1)
        same = degenerate.clone().fill_diagonal_(False)
        if bool(same.any()):
            pairs = torch.nonzero(torch.triu(same))[:10].tolist()
            warnings.warn(
                f"{self.name}: head rows of classes {pairs} are identical (no decision boundary between them); those pairs are left out of the average",
                RuntimeWarning,
                stacklevel=4,
            )
        if bool((partners == 0).any()):
            raise ValueError(f"{self.name}: every row of the head is identical; the classifier has no decision boundary")
        self._inverse_norms = inverse  # 1 / ||w_f - w_c||, 0 on the diagonal and for identical rows
        self._partners = partners.to(torch.float64)
        self._mean = self.feature_sum_ / self.sample_count_
        self._cache: dict[Any, tuple[torch.Tensor, ...]] = {}

    def _params(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (dtype, str(device))
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device, dtype) for t in (self._inverse_norms, self._partners, self._mean))
        return self._cache[key]

    def _score(self, outputs: Outputs) -> torch.Tensor:
        self._check_scoring_head(outputs)
        x = self._features(outputs, self.feature_sum_.shape[0])
        acc = accumulation_dtype(x.dtype)
        inverse, partners, mean = self._params(acc, x.device)
        floor = torch.finfo(acc).tiny ** 0.5
        out = torch.empty(x.shape[0], dtype=acc, device=x.device)
        per_row = (self.head_weight_.shape[0] * 3 + x.shape[1]) * torch.finfo(acc).bits // 8
        for rows in la.row_slices(x.shape[0], per_row):
            xr = x[rows].to(acc)
            z = self._head_logits(xr)
            top, pred = z.max(dim=1)
            average = ((top[:, None] - z) * inverse[pred]).sum(dim=1) / partners[pred]
            spread = torch.linalg.vector_norm(xr - mean, dim=1).clamp_min(floor)
            out[rows] = -(average / spread)
        return self._finite_scores(out, x)


# ----- ConjNorm ---------------------------------------------------------------------------------


@register
class ConjNorm(_FeatureDetector):
    """ConjNorm (Peng, Luo, Zhang, Li & Fang, "ConjNorm: Tractable Density Estimation for
    Out-of-Distribution Detection", ICLR 2024).

    With ``q = p / (p - 1)`` the conjugate exponent, ``psi(v) = 1/2 ||v||_q^2`` and features
    normalised in p-norm, ``x^ = x / ||x||_p``:

    * class prototypes ``mu_k`` = the class means of the training features, p-normalised, and
      ``g_k = grad psi(mu_k) = sign(mu_k) |mu_k|^(q-1) / ||mu_k||_q^(q-2)``;
    * ``d(x, k) = -1/2 ||x^||_q^2 + x^ . g_k`` (the official code's ``dist``; it is the negative
      Bregman divergence ``-D_psi(x^, mu_k)`` plus a per-class constant, which cancels below);
    * partition function, estimated by importance sampling over the class's training samples
      (the official ImageNet code): ``Z_k = sum_{i: y_i = k} exp(d(x^_i, k) / T)``;
    * the paper's density score ``log sum_k exp(d(x, k) / T) / Z_k``, negated here:
      ``score = -logsumexp_k (d(x, k) / T - log Z_k)`` (higher = more OOD).

    Computed in log space (the official code exponentiates, which overflows for small T).
    ``g_k`` uses ``sign(mu)|mu|^(q-1)``, equal to the code's ``mu |mu|^(q-2)`` except that a
    zero entry gives 0 instead of NaN. Defaults ``p = 2.2``, ``temperature = 0.05``: the official
    CIFAR-10 setting (CIFAR-100: 2.5 / 0.08; ImageNet ResNet-50: 1.5 / 0.0005). Classes without
    training samples are left out (with a warning). The prototypes are needed before the partition
    function, so the fit reads all training data (no streaming).
    """

    name = "conjnorm"
    paper = "Peng et al., ICLR 2024"
    fit_requires = ("labels",)

    def __init__(self, p: float = 2.2, temperature: float = 0.05) -> None:
        self.p = p
        self.temperature = temperature
        _check_positive_float(self.name, "p", p, above=1.0)
        _check_positive_float(self.name, "temperature", temperature)

    @property
    def _q(self) -> float:
        p = float(self.p)
        return p / (p - 1.0)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, ord=float(self.p), dim=1, keepdim=True)
        return x / norm.clamp_min(torch.finfo(x.dtype).tiny ** 0.5)

    def _distances(self, xn: torch.Tensor, guides: torch.Tensor) -> torch.Tensor:
        """``d(x, k)`` for p-normalised rows ``xn`` (n, D) and guide vectors (K, D)."""
        half_sq = 0.5 * torch.linalg.vector_norm(xn, ord=self._q, dim=1).square()
        return (xn @ guides.T) - half_sq[:, None]

    def _fit(self, outputs: Outputs) -> None:
        x, labels = outputs.feature(), outputs.labels
        la.check_finite(x, "features", self.name)
        c = _batch_num_classes(outputs)
        la.check_labels(labels, c, self.name)
        c = max(c or 0, int(labels.max()) + 1)
        n, d = x.shape
        labels = labels.to(x.device)
        counts = torch.bincount(labels, minlength=c)
        present = counts > 0
        if not bool(present.all()):
            warnings.warn(
                f"{self.name}: class(es) {_classes_text(torch.nonzero(~present)[:, 0])} have no training samples; they are left out of the density",
                RuntimeWarning,
                stacklevel=3,
            )
        sums = torch.zeros(c, d, dtype=torch.float64, device=x.device)
        for rows in la.row_slices(n, d * 8):
            sums.index_put_((labels[rows],), la.as_float64(x[rows]), accumulate=True)
        prototypes = self._normalise(sums[present] / counts[present, None].to(torch.float64))
        q = self._q
        mu_q = torch.linalg.vector_norm(prototypes, ord=q, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny ** 0.5)
        guides = torch.sign(prototypes) * prototypes.abs().pow(q - 1) / mu_q.pow(q - 2)
        # log Z_k over the class's own samples: each sample's d(x, k) to its own class only;
        # per-sample terms in the features' precision, the log-sum-exp in float64
        acc = accumulation_dtype(x.dtype)
        guides_acc = guides.to(acc)
        slot = torch.cumsum(present.to(torch.long), 0) - 1  # class index -> row of guides
        t = float(self.temperature)
        log_z = torch.full((guides.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        for rows in la.row_slices(n, d * torch.finfo(acc).bits // 8 * 4):
            xn = self._normalise(x[rows].to(acc))
            k = slot[labels[rows]]
            own = (xn * guides_acc[k]).sum(dim=1) - 0.5 * torch.linalg.vector_norm(xn, ord=q, dim=1).square()
            log_z = _scatter_logsumexp(log_z, k, own.to(torch.float64) / t)
        self.guides_ = guides
        self.log_partition_ = log_z
        self.classes_ = torch.nonzero(present)[:, 0]

    def _check_state(self) -> None:
        g, z, classes = self.guides_, self.log_partition_, self.classes_
        if not all(isinstance(t, torch.Tensor) for t in (g, z, classes)):
            raise ValueError("the state lacks guides_, log_partition_ or classes_")
        if g.ndim != 2 or z.shape != (g.shape[0],) or classes.shape != (g.shape[0],):
            raise ValueError(f"guides_ {tuple(g.shape)}, log_partition_ {tuple(z.shape)} and classes_ {tuple(classes.shape)} must be (K, D), (K,), (K,)")
        if not bool(torch.isfinite(z).all()):
            raise ValueError("log_partition_ must be finite")

    def _finalize(self) -> None:
        pass

    def _score(self, outputs: Outputs) -> torch.Tensor:
        x = self._features(outputs, self.guides_.shape[1])
        acc = accumulation_dtype(x.dtype)
        guides = self.guides_.to(x.device, acc)
        log_z = self.log_partition_.to(x.device, acc)
        t = float(self.temperature)
        out = torch.empty(x.shape[0], dtype=acc, device=x.device)
        per_row = (x.shape[1] * 2 + guides.shape[0] * 2) * torch.finfo(acc).bits // 8
        for rows in la.row_slices(x.shape[0], per_row):
            logits = self._distances(self._normalise(x[rows].to(acc)), guides) / t - log_z
            out[rows] = -torch.logsumexp(logits, dim=1)
        return self._finite_scores(out, x)


def _scatter_logsumexp(acc: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``acc[j] = log(exp(acc[j]) + sum_{i: index_i = j} exp(values_i))``, stably."""
    peak = torch.full_like(acc, -math.inf).scatter_reduce(0, index, values, reduce="amax")
    peak = torch.maximum(peak, acc)
    safe = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(acc - safe).index_put((index,), torch.exp(values - safe[index]), accumulate=True)
    return torch.log(total) + safe

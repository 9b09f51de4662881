"""The principal space of the features (mean, scatter and the head, streamed in float64), shared by
ViM and Residual (Wang et al., CVPR 2022)."""

from __future__ import annotations

from typing import Any

import torch

from ...outputs import Head, Outputs
from .. import _linalg as la
from ._common import _check_positive_int, _check_count, _FeatureDetector, _KeepsHead


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

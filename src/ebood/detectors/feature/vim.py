"""ViM: virtual-logit matching (Wang et al., CVPR 2022)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..._arrays import accumulation_dtype
from ...outputs import Outputs
from .. import _linalg as la
from ..base import register
from ._principal import _PrincipalSpace

__all__ = ["ViM"]


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

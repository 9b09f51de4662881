"""ConjNorm: tractable density estimation (Peng et al., ICLR 2024)."""

from __future__ import annotations

import math
import warnings

import torch

from ..._arrays import accumulation_dtype
from ...outputs import Outputs
from .. import _linalg as la
from ..base import register
from ._common import _batch_num_classes, _classes_text, _check_positive_float, _FeatureDetector

__all__ = ["ConjNorm"]


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

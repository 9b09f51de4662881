"""NNGuide: nearest-neighbour guidance (Park et al., ICCV 2023)."""

from __future__ import annotations

import torch

from ..._arrays import accumulation_dtype
from ...outputs import Outputs
from .. import _linalg as la
from ..base import register
from ._bank import _Bank
from ._common import _check_positive_int

__all__ = ["NNGuide"]


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

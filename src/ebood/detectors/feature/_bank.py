"""A bank of training rows that streams and merges by appending (KNN, NNGuide)."""

from __future__ import annotations

import torch

from ._common import _check_count, _FeatureDetector


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

"""Choosing the energy margins ``m_in`` / ``m_out`` from the pre-trained model's energies.

Liu et al. (NeurIPS 2020) tuned the margins per dataset (official run script: ``-23 / -5`` on
CIFAR-10, ``-27 / -5`` on CIFAR-100). Their pre-trained WideResNets put most ID energies above
``m_in`` and most outlier energies below ``m_out``, so both hinges start active for nearly every
sample and fine-tuning pushes the two energy distributions apart. :func:`suggest_margins`
reproduces that situation for any model and data without a search:

    m_in  = quantile(E(ID),       q_in)     (default q_in  = 0.05: 95% of ID above the margin)
    m_out = quantile(E(outliers), q_out)    (default q_out = 0.95: 95% of outliers below it)

If the model separates the sets so poorly that ``m_out - m_in < min_gap``, the margins are put
``min_gap`` apart around the midpoint of the two medians instead (the hinges then ask for a gap
the pre-trained model does not have, which is what fine-tuning is for).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from .. import scores
from ..runtime import model_inputs
from .batches import as_dataset, derived_seed, split_batch
from .loop import resolve_device

__all__ = ["Margins", "suggest_margins", "margins_from_energies", "model_energies"]

_SUBSET_STREAM = 4


class Margins(NamedTuple):
    """Energy margins for :class:`ebood.train.EnergyBoundedLoss`."""

    m_in: float
    m_out: float


def _check_quantile(q: float, name: str) -> float:
    q = float(q)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {q!r}")
    return q


def margins_from_energies(id_energies: Any, outlier_energies: Any, q_in: float = 0.05, q_out: float = 0.95,
                          min_gap: float = 1.0) -> Margins:
    """The rule of :func:`suggest_margins` applied to given energies (1-D, finite)."""
    from .._arrays import as_scores_1d

    e_in = as_scores_1d(id_energies, "id_energies")
    e_out = as_scores_1d(outlier_energies, "outlier_energies")
    q_in, q_out = _check_quantile(q_in, "q_in"), _check_quantile(q_out, "q_out")
    if not math.isfinite(min_gap) or min_gap <= 0:
        raise ValueError(f"min_gap must be > 0, got {min_gap!r}")
    m_in, m_out = float(np.quantile(e_in, q_in)), float(np.quantile(e_out, q_out))
    if m_out - m_in < min_gap:
        centre = 0.5 * (float(np.median(e_in)) + float(np.median(e_out)))
        m_in, m_out = centre - 0.5 * min_gap, centre + 0.5 * min_gap
    return Margins(m_in, m_out)


def model_energies(model: torch.nn.Module, data: Any, *, temperature: float = 1.0, batch_size: int = 512,
                   max_samples: int | None = 10_000, seed: int = 0, device: str | torch.device | None = None,
                   name: str = "data") -> torch.Tensor:
    """Free energies ``-T logsumexp(f(x) / T)`` of the model (eval mode) on at most ``max_samples`` of ``data``.

    A random subset (seeded) is used when the set is larger than ``max_samples``. Float64, on CPU.
    """
    dataset = as_dataset(data, name)
    dev = resolve_device(model, device)
    if isinstance(dataset, DataLoader):
        loader: Any = dataset
    else:
        n = len(dataset)  # type: ignore[arg-type]
        if max_samples is not None and n > max_samples:
            gen = torch.Generator().manual_seed(derived_seed(seed, _SUBSET_STREAM))
            dataset = Subset(dataset, torch.randperm(n, generator=gen)[:max_samples].tolist())
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator().manual_seed(0))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.no_grad():
            for batch in loader:
                x, _ = split_batch(batch, name, need_labels=False)
                with model_inputs(x):
                    logits = model(x.to(dev, dtype))
                parts.append(scores.energy(logits, temperature).to("cpu", torch.float64))
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError(f"{name} yielded no samples")
    return torch.cat(parts)


def suggest_margins(model: torch.nn.Module, id_data: Any, outlier_data: Any, *, q_in: float = 0.05,
                    q_out: float = 0.95, min_gap: float = 1.0, temperature: float = 1.0,
                    max_samples: int | None = 10_000, batch_size: int = 512, seed: int = 0,
                    device: str | torch.device | None = None) -> Margins:
    """Margins ``(m_in, m_out)`` for energy fine-tuning from the pre-trained model's energy quantiles.

    ``m_in`` is the ``q_in`` quantile of the energies on ``id_data`` and ``m_out`` the ``q_out``
    quantile on ``outlier_data`` (see the module docstring for the rule and its fallback). Use the
    training ID data and the auxiliary outliers, never the OOD test sets.
    """
    e_in = model_energies(model, id_data, temperature=temperature, batch_size=batch_size,
                          max_samples=max_samples, seed=seed, device=device, name="id_data")
    e_out = model_energies(model, outlier_data, temperature=temperature, batch_size=batch_size,
                           max_samples=max_samples, seed=seed, device=device, name="outlier_data")
    return margins_from_energies(e_in, e_out, q_in, q_out, min_gap)

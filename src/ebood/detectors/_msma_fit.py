"""Training for :mod:`ebood.detectors.msma`: denoising score matching and the Gaussian-mixture fit.

Imported by ``fit`` only: a fitted detector scores without this module (and without scikit-learn).
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..progress import progress_bar

__all__ = ["dsm_loss", "network_loss", "train_score_network", "fit_density", "DEFAULT_COMPONENTS"]

#: The MSMA code's grid for the number of mixture components (2, 4, ..., 20).
DEFAULT_COMPONENTS = tuple(range(2, 21, 2))


def dsm_loss(score: torch.Tensor, noisy: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Denoising score matching with the ``sigma^2`` weighting (Song & Ermon, NeurIPS 2019, eq. 5-6;
    Mahmood, Lopez & Fua, ICLR 2021, eq. 2)::

        loss = mean_n  1/2 * sigma_n^2 * || s(x~_n, sigma_n) + (x~_n - x_n) / sigma_n^2 ||^2

    ``score``, ``noisy`` (``x~ = x + sigma z``) and ``clean`` are ``(N, ...)``; ``sigma`` is ``(N,)``, the
    noise level each sample was perturbed with (one drawn per sample, as in the MSMA code).
    """
    s = sigma.reshape(-1, *([1] * (clean.ndim - 1)))
    residual = (score + (noisy - clean) / s**2).flatten(1)
    return (0.5 * sigma**2 * residual.pow(2).sum(dim=1)).mean()


def network_loss(network: nn.Module, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """:func:`dsm_loss` of ``network`` on a batch: one noise level drawn per sample, ``x~ = x + sigma z``."""
    idx = torch.randint(len(sigmas), (x.shape[0],), generator=generator)
    sigma = sigmas.to(x.dtype)[idx]
    noisy = x + sigma.reshape(-1, *([1] * (x.ndim - 1))) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    weighted = network(noisy)[torch.arange(x.shape[0]), idx]  # sigma_i * s(x~, sigma_i)
    score = weighted / sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return dsm_loss(score, noisy, x, sigma)


def _validation_loss(network: nn.Module, x: torch.Tensor, sigmas: torch.Tensor, seed: int, batch_size: int) -> float:
    # The same noise every epoch, so that epochs are compared on one fixed objective.
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            total += float(network_loss(network, xb, sigmas, g)) * xb.shape[0]
    return total / x.shape[0]


def train_score_network(network: nn.Module, train: torch.Tensor, val: torch.Tensor, sigmas: torch.Tensor, *, epochs: int,
                        batch_size: int, lr: float, patience: int, seed: int, progress: bool) -> dict[str, object]:
    """Adam on :func:`network_loss` over shuffled batches of ``train``; after every epoch the loss on
    ``val`` (fixed noise); stop when it has not improved for ``patience`` epochs and keep the best
    weights. Deterministic for a given ``seed`` on the CPU. Returns the run's record.

    Runs on one torch thread (restored afterwards): these networks are small, and extra intra-op
    threads mostly wait on each other (8x slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(network, train, val, sigmas, epochs, batch_size, lr, patience, seed, progress)
    finally:
        torch.set_num_threads(before)


def _train(network: nn.Module, train: torch.Tensor, val: torch.Tensor, sigmas: torch.Tensor, epochs: int, batch_size: int,
           lr: float, patience: int, seed: int, progress: bool) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(network.parameters(), lr=lr)
    best, best_state, best_epoch, history = math.inf, copy.deepcopy(network.state_dict()), 0, []
    network.train()
    with progress_bar(progress, epochs, "msma: score matching", unit="epochs") as bar:
        for epoch in range(1, epochs + 1):
            order = torch.randperm(train.shape[0], generator=g)
            for start in range(0, train.shape[0], batch_size):
                loss = network_loss(network, train[order[start : start + batch_size]], sigmas, g)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"msma: non-finite score-matching loss in epoch {epoch}; lower lr or check the inputs")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            current = _validation_loss(network, val, sigmas, seed + 1, 4 * batch_size)
            history.append(current)
            bar.advance(1)
            if current < best:
                best, best_epoch, best_state = current, epoch, copy.deepcopy(network.state_dict())
            elif epoch - best_epoch >= patience:
                break
    network.load_state_dict(best_state)
    network.eval()
    return {"epochs_run": len(history), "best_epoch": best_epoch, "val_loss": best, "val_history": history}


def fit_density(train_norms: torch.Tensor, val_norms: torch.Tensor, n_components: int | Sequence[int], seed: int) -> dict[str, object]:
    """Standardise the score-norm vectors and fit a full-covariance Gaussian mixture (scikit-learn), as
    the MSMA code does (``StandardScaler`` + ``GaussianMixture``). With several candidate component
    counts, the one with the highest mean log-likelihood on ``val_norms`` is kept (the MSMA code
    cross-validates the same grid). Returns float64 tensors and the count chosen."""
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    x = train_norms.double().cpu().numpy()
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    candidates = [n_components] if isinstance(n_components, int) else list(n_components)
    candidates = [k for k in candidates if k <= len(z)] or [1]
    best = None
    # Small (N, L) problems: BLAS threads only wait on each other (10x slower on a busy 2-core machine).
    with threadpool_limits(1):
        for k in candidates:
            gmm = GaussianMixture(n_components=k, covariance_type="full", random_state=seed).fit(z)
            held = float(gmm.score((val_norms.double().cpu().numpy() - mean) / scale)) if len(candidates) > 1 else 0.0
            if best is None or held > best[0]:
                best = (held, gmm)
    gmm = best[1]
    return {
        "norm_mean": torch.from_numpy(mean), "norm_scale": torch.from_numpy(scale),
        "weights": torch.from_numpy(np.asarray(gmm.weights_, dtype=np.float64)),
        "means": torch.from_numpy(np.asarray(gmm.means_, dtype=np.float64)),
        "precisions_cholesky": torch.from_numpy(np.asarray(gmm.precisions_cholesky_, dtype=np.float64)),
        "n_components": int(gmm.n_components),
    }

"""Multiscale score matching (MSMA): a density model of the score norms of in-distribution data.

Mahmood, Lopez & Fua, "Multiscale Score Matching for Out-of-Distribution Detection", ICLR 2021.

* ``create("msma")``: on feature vectors (``Outputs.features``, e.g. a classifier's penultimate
  layer), with an MLP score network. A post-hoc detector like ``knn`` or ``mahalanobis``.
* ``create("msma", on="inputs")``: on the inputs themselves (images ``(N, C, H, W)``), with a small
  convolutional score network. A model-level-style detector: ``fit_inputs(model, data)`` and
  ``score_inputs(model, inputs)`` (the classifier is not used; the API lets
  ``ebood.evaluate_detectors`` hand it the batches of its single pass).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from ..extraction import as_loader, split_batch
from ..outputs import Outputs
from ._score_networks import build_network, geometric_sigmas, score_norms
from .base import Detector, register
from .model import ModelDetector

__all__ = ["MSMA", "MSMAInputs", "gmm_log_density"]

_LOG_2PI = math.log(2.0 * math.pi)


def gmm_log_density(z: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, precisions_cholesky: torch.Tensor) -> torch.Tensor:
    """``log p(z)`` (float64) under a full-covariance Gaussian mixture given as scikit-learn stores it::

        log p(z) = logsumexp_k [ log w_k - d/2 log(2 pi) + sum_j log P_k,jj - 1/2 || (z - mu_k) P_k ||^2 ]

    with ``P_k`` the Cholesky factor of component ``k``'s precision (``Sigma_k^-1 = P_k P_k^T``).
    """
    z = z.to(torch.float64)
    p = precisions_cholesky.to(z.device, torch.float64)
    y = torch.einsum("nd,kde->nke", z, p) - torch.einsum("kd,kde->ke", means.to(z.device, torch.float64), p)[None]
    log_det = torch.log(torch.diagonal(p, dim1=1, dim2=2)).sum(dim=1)
    log_prob = -0.5 * (z.shape[1] * _LOG_2PI + y.pow(2).sum(dim=2)) + log_det
    return torch.logsumexp(log_prob + torch.log(weights.to(z.device, torch.float64)), dim=1)


def _check_int(value: Any, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"msma: {name} must be an integer >= {minimum}, got {value!r}")


@register
class MSMA(Detector):
    """Multiscale Score Matching (Mahmood, Lopez & Fua, ICLR 2021).

    A score network ``s(x, sigma)`` is trained on in-distribution data by denoising score matching
    at ``L = num_scales`` noise levels ``sigma_1 > ... > sigma_L`` (geometric, ``sigma_high`` to
    ``sigma_low``: the paper's ``1 .. 0.01``, ``L = 10``)::

        loss = mean over (x, i)  1/2 sigma_i^2 || s(x + sigma_i z, sigma_i) + z / sigma_i ||^2

    Each input is summarised by its ``L`` weighted score norms ``n_i(x) = || sigma_i s(x, sigma_i) ||``
    (the MSMA code's ``compute_weighted_scores``), a Gaussian mixture (full covariance, on the
    standardised norms, as in the paper's code) is fitted to the vectors ``n(x)`` of the training
    data, and the OOD score is the negative log-density::

        score(x) = -log p_GMM((n(x) - mean) / std)        (higher = more OOD)

    Inputs (features per dimension, images per channel) are standardised with the training
    statistics before the noise is added. ``on``: ``"features"`` (``Outputs.features``, MLP of
    ``depth = 2`` layers of ``hidden`` units, default 256) or ``"inputs"`` (images; convolutional
    network with ``hidden`` channels, default 32; see :class:`MSMAInputs`). ``fit`` trains with Adam
    (``lr``, ``batch_size``) for at most ``epochs`` epochs on all but ``val_fraction`` of the data
    and stops early when the score-matching loss on that held-out part has not improved for
    ``patience`` epochs (the best weights are kept). ``n_components``: the mixture's size, or
    ``None`` for the paper's grid 2, 4, ..., 20 selected by held-out log-likelihood. ``max_samples``:
    fit on a seeded random subset of at most this many samples (``None``: all). ``seed`` fixes
    the split, the initial weights, the batches and the noise; ``progress`` shows a bar (on a
    terminal). The network conditions on the noise level in its output layer, so one forward pass
    gives all ``L`` norms (see ``_score_networks``). A fitted detector's state (network weights,
    mixture) saves with :meth:`save`; scoring needs neither the training code nor scikit-learn.
    """

    name = "msma"
    paper = "Mahmood, Lopez & Fua, ICLR 2021"
    requires = ("features",)

    def __new__(cls, *args: Any, **kwargs: Any) -> "MSMA":
        # create("msma", on="inputs") gives the input-level variant under the same registry name.
        on = kwargs.get("on", args[0] if args else "features")
        if cls is MSMA and on == "inputs":
            return super().__new__(MSMAInputs)
        return super().__new__(cls)

    def __init__(self, on: str = "features", num_scales: int = 10, sigma_high: float = 1.0, sigma_low: float = 0.01,
                 hidden: int | None = None, epochs: int = 100, batch_size: int = 128, lr: float = 1e-3, patience: int = 5,
                 val_fraction: float = 0.1, n_components: int | Sequence[int] | None = None, max_samples: int | None = None,
                 seed: int = 0, progress: bool = True) -> None:
        expected = "inputs" if isinstance(self, MSMAInputs) else "features"
        if on not in ("features", "inputs"):
            raise ValueError(f"msma: on must be 'features' or 'inputs', got {on!r}")
        if on != expected:
            raise ValueError(f"msma: {type(self).__name__} works on {expected!r}; use create('msma', on={on!r})")
        self.on = on
        self.num_scales, self.sigma_high, self.sigma_low = num_scales, sigma_high, sigma_low
        geometric_sigmas(sigma_high, sigma_low, num_scales)  # validates the schedule
        for name, value in (("epochs", epochs), ("batch_size", batch_size), ("patience", patience)):
            _check_int(value, name)
        if hidden is not None:
            _check_int(hidden, "hidden")
        if max_samples is not None:
            _check_int(max_samples, "max_samples", minimum=3)
        if not (math.isfinite(float(lr)) and lr > 0):
            raise ValueError(f"msma: lr must be finite and > 0, got {lr!r}")
        if not 0 < float(val_fraction) < 1:
            raise ValueError(f"msma: val_fraction must be in (0, 1), got {val_fraction!r}")
        if n_components is not None:
            for k in [n_components] if isinstance(n_components, int) else list(n_components):
                _check_int(k, "n_components")
            if not isinstance(n_components, int):
                n_components = [int(k) for k in n_components]
                if not n_components:
                    raise ValueError("msma: n_components is an empty list; give a count, a list of counts or None")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"msma: seed must be an integer, got {seed!r}")
        self.hidden, self.epochs, self.batch_size, self.lr, self.patience = hidden, epochs, batch_size, lr, patience
        self.val_fraction, self.n_components, self.seed, self.progress = val_fraction, n_components, seed, bool(progress)
        self.max_samples = max_samples

    # ----- fitting -------------------------------------------------------------------------------
    def _network_config(self, sample_shape: tuple[int, ...]) -> dict[str, Any]:
        if self.on == "features":
            return {"kind": "mlp", "dim": sample_shape[0], "num_scales": self.num_scales, "hidden": self.hidden or 256, "depth": 2}
        return {"kind": "conv", "channels": sample_shape[0], "num_scales": self.num_scales, "hidden": self.hidden or 32}

    def _standardiser(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = [0] if x.ndim == 2 else [0, *range(2, x.ndim)]
        shift = x.mean(dim=dims, keepdim=True)[0]
        scale = x.std(dim=dims, keepdim=True)[0].clamp_min(1e-6)
        return shift, scale

    def _fit_tensor(self, x: torch.Tensor) -> None:
        """Train the score network and the mixture on ID samples ``x`` (N, ...)."""
        from ._msma_fit import DEFAULT_COMPONENTS, fit_density, train_score_network

        if self.max_samples is not None and x.shape[0] > self.max_samples:
            keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(self.seed))[: self.max_samples]
            x = x[keep.sort().values]
        n = x.shape[0]
        n_val = max(1, int(round(self.val_fraction * n)))
        if n - n_val < 2:
            raise ValueError(f"msma: fit needs at least 3 samples (2 to train, 1 to validate), got {n}")
        x = x.detach().to("cpu", torch.float32)
        self.input_shape_ = list(x.shape[1:])
        self.sigmas_ = geometric_sigmas(self.sigma_high, self.sigma_low, self.num_scales)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            order = torch.randperm(n)
            train, val = x[order[n_val:]], x[order[:n_val]]
            self.shift_, self.scale_ = self._standardiser(train)
            train, val = (train - self.shift_) / self.scale_, (val - self.shift_) / self.scale_
            self.network_config_ = self._network_config(tuple(x.shape[1:]))
            network = build_network(self.network_config_)
            self.training_ = train_score_network(network, train, val, self.sigmas_.float(), epochs=self.epochs,
                                                 batch_size=self.batch_size, lr=self.lr, patience=self.patience,
                                                 seed=self.seed, progress=self.progress)
        self.network_state_ = {k: v.detach().clone() for k, v in network.state_dict().items()}
        self._network = network
        density = fit_density(score_norms(network, train), score_norms(network, val),
                              self.n_components if self.n_components is not None else DEFAULT_COMPONENTS, self.seed)
        self.norm_mean_, self.norm_scale_ = density["norm_mean"], density["norm_scale"]
        self.gmm_weights_, self.gmm_means_ = density["weights"], density["means"]
        self.gmm_precisions_cholesky_ = density["precisions_cholesky"]
        self.n_components_ = density["n_components"]

    def _fit(self, outputs: Outputs) -> None:
        self._fit_tensor(self._features(outputs, "fit"))

    # ----- scoring -------------------------------------------------------------------------------
    def network(self) -> nn.Module:
        """The trained score network (built from the saved state on first use)."""
        self._check_fitted()
        net = getattr(self, "_network", None)
        if net is None:
            net = build_network(self.network_config_)
            net.load_state_dict(self.network_state_)
            self._network = net.eval()
        return net

    def norms(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(N, L)`` weighted score norms ``||sigma_i s(x, sigma_i)||`` of raw samples ``x``."""
        net = self.network()
        dev = x.device
        net.to(dev)
        z = (x.to(torch.float32) - self.shift_.to(dev)) / self.scale_.to(dev)
        return score_norms(net, z)

    def _score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if list(x.shape[1:]) != list(self.input_shape_):
            raise ValueError(f"msma: samples have shape {tuple(x.shape[1:])}, but the detector was fitted on {tuple(self.input_shape_)}")
        n = self.norms(x).to(torch.float64)
        z = (n - self.norm_mean_.to(n.device)) / self.norm_scale_.to(n.device)
        return -gmm_log_density(z, self.gmm_weights_, self.gmm_means_, self.gmm_precisions_cholesky_)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        f = self._features(outputs, "score")
        s = self._score_tensor(f)
        return s.to(torch.float64 if f.dtype == torch.float64 else torch.float32)

    def _features(self, outputs: Outputs, action: str) -> torch.Tensor:
        f = outputs.features
        if isinstance(f, dict):
            raise ValueError(f"msma: {action} needs one feature matrix (N, D), got features of layers {', '.join(map(repr, f))}")
        if f.ndim != 2:
            raise ValueError(f"msma: features must be (N, D), got shape {tuple(f.shape)}")
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"msma: the features to {action} contain NaN or inf")
        return f

    def _validate_state(self) -> None:
        k, d = self.gmm_means_.shape
        if d != self.num_scales or self.sigmas_.shape != (self.num_scales,):
            raise ValueError(f"mixture of dimension {d} and {tuple(self.sigmas_.shape)} noise levels, expected {self.num_scales}")
        if self.gmm_weights_.shape != (k,) or self.gmm_precisions_cholesky_.shape != (k, d, d):
            raise ValueError(f"mixture weights {tuple(self.gmm_weights_.shape)} / precisions {tuple(self.gmm_precisions_cholesky_.shape)} "
                             f"do not fit {k} components of dimension {d}")
        if self.norm_mean_.shape != (d,) or self.norm_scale_.shape != (d,):
            raise ValueError(f"norm statistics {tuple(self.norm_mean_.shape)} / {tuple(self.norm_scale_.shape)} do not fit {d} scales")
        per_sample = tuple(self.input_shape_)
        stats = (per_sample[0],) if len(per_sample) == 1 else (per_sample[0], *[1] * (len(per_sample) - 1))
        if tuple(self.shift_.shape) != stats or tuple(self.scale_.shape) != stats:
            raise ValueError(f"input statistics {tuple(self.shift_.shape)} / {tuple(self.scale_.shape)} do not fit inputs of shape {per_sample}")
        net = build_network(self.network_config_)
        net.load_state_dict(self.network_state_)
        self._network = net.eval()


class MSMAInputs(ModelDetector, MSMA):
    """MSMA on the inputs (images ``(N, C, H, W)``; ``(N, H, W)`` gets a channel axis), made by
    ``create("msma", on="inputs")``. See :class:`MSMA` for the method.

    ``fit_inputs(model, data)`` reads the in-distribution inputs of ``data`` (a Dataset, DataLoader
    or array) and trains on them; ``score_inputs(model, inputs)`` scores a batch. The classifier
    ``model`` is not used (``None`` is accepted): the model-level API lets
    ``ebood.evaluate_detectors`` fit and score this detector on the batches of its single pass.
    """

    needs_fit = True

    @staticmethod
    def _images(x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4:
            raise ValueError(f"msma: on='inputs' needs images (N, C, H, W) or (N, H, W), got shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("msma: the inputs contain NaN or inf")
        return x

    def fit_inputs(self, model: nn.Module | None, data: Any, *, batch_size: int | None = None, output: Any = None,
                   **kwargs: Any) -> "MSMAInputs":
        """Train on the inputs of in-distribution ``data`` (labels, if any, are ignored)."""
        parts = [split_batch(b)[0] for b in as_loader(data, batch_size)]
        if not parts:
            raise ValueError("msma: fit_inputs received no data")
        x = torch.cat([torch.as_tensor(p) for p in parts])
        self._fit_tensor(self._images(x if x.is_floating_point() else x.float()))
        self._fitted = True
        return self

    def score_inputs(self, model: nn.Module | None, inputs: Any, *, output: Any = None) -> torch.Tensor:
        """One OOD score per input (higher = more OOD), on the inputs' device."""
        self._check_fitted()
        x = torch.as_tensor(inputs)
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"msma: inputs must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
        x = self._images(x if x.is_floating_point() else x.float())
        s = self._score_tensor(x)
        return s.to(torch.float64 if x.dtype == torch.float64 else torch.float32)

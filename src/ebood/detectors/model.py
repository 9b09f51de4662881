"""Detectors that need the model itself: input perturbation, gradients, stochastic passes.

They are told apart from post-hoc detectors by ``requires = ("model",)`` (see
:class:`ModelDetector`). Instead of ``score(outputs)`` they offer

* ``score_inputs(model, inputs) -> Tensor[N]``: OOD scores (higher = more OOD) of one batch of
  inputs, with every submodule in eval mode during the call and each module's mode restored after;
* ``score_data(model, data)``: the same over a Dataset / DataLoader, batch by batch;
* ``fit_inputs(model, data)`` for those that learn something (``mahalanobis_ensemble``).

``ebood.evaluate_detectors`` calls ``score_inputs`` on the batches of its single pass over each
dataset, next to the extraction that feeds every post-hoc detector.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import scores
from .._arrays import accumulation_dtype
from ..extraction import PENULTIMATE, ExtractionError, LayerTap, as_loader, eval_mode, extract, resolve_layers, select_output, split_batch
from ..metrics import id_threshold
from ..outputs import Outputs
from ._finite import check_finite_rows, check_scores
from ._learned import number, tensor, tensors, text, texts
from .base import Detector, register

__all__ = ["ModelDetector", "ODIN", "MahalanobisEnsemble", "GradNorm", "MCDropout"]


def _input_tensor(inputs: Any, name: str) -> torch.Tensor:
    if isinstance(inputs, np.ndarray):
        inputs = torch.from_numpy(inputs)
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"{name}: inputs must be a tensor (a batch of inputs), got {type(inputs).__name__}")
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise ValueError(f"{name}: inputs must be a non-empty batch (N, ...), got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        inputs = inputs.float()
    return inputs


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    t = next(iter(model.parameters()), None)
    return fallback if t is None else t.device


def _input_scale(std: float | Sequence[float] | None, x: torch.Tensor, name: str) -> torch.Tensor | float:
    """``1 / std`` shaped to broadcast over the channel axis (1) of ``x``."""
    if std is None:
        return 1.0
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(-1)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"{name}: std must be positive and finite, got {std!r}")
    if s.numel() == 1:
        return 1.0 / s
    if x.ndim < 2 or x.shape[1] != s.numel():
        raise ValueError(f"{name}: std has {s.numel()} entries but the inputs have shape {tuple(x.shape)} (channels on axis 1)")
    return (1.0 / s).reshape(1, -1, *([1] * (x.ndim - 2)))


def _check_std(std: float | Sequence[float] | None, name: str) -> float | list[float] | None:
    if std is None:
        return None
    values = [float(v) for v in (std if isinstance(std, (tuple, list)) else [std])]
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name}: std must be a positive number or a list of them (one per channel), got {std!r}")
    return values if isinstance(std, (tuple, list)) else values[0]


def _check_positive(value: float, what: str, name: str, allow_zero: bool = False) -> None:
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}: {what} must be finite and {'>= 0' if allow_zero else '> 0'}, got {value!r}")


class ModelDetector(Detector):
    """Base class of detectors that need the model, marked by ``requires = ("model",)``.

    Subclasses implement ``_score_inputs(model, inputs, output)`` (inputs already on the model's
    device, model in eval mode) and, when they learn state, ``fit_inputs``. ``score(outputs)`` and
    ``fit(outputs)`` raise a TypeError pointing to the input-based methods.
    """

    requires = ("model",)
    needs_fit = False

    # ----- the Outputs API does not apply -------------------------------------------------------
    def score(self, outputs: Outputs) -> torch.Tensor:
        raise TypeError(
            f"detector {self.name!r} needs the model, not precomputed outputs: call score_inputs(model, inputs), "
            "score_data(model, data) or ebood.evaluate_detectors"
        )

    def fit(self, data: Any) -> "ModelDetector":
        raise TypeError(f"detector {self.name!r} needs the model: call fit_inputs(model, data)")

    def calibrate(self, id_outputs: Outputs, tpr: float = 0.95) -> "ModelDetector":
        raise TypeError(f"detector {self.name!r} needs the model: call calibrate_inputs(model, id_data, tpr)")

    def predict(self, outputs: Outputs) -> torch.Tensor:
        raise TypeError(f"detector {self.name!r} needs the model: call predict_inputs(model, inputs)")

    # ----- input-based API ---------------------------------------------------------------------
    def fit_inputs(self, model: nn.Module, data: Any, **kwargs: Any) -> "ModelDetector":
        """Learn from in-distribution data (a no-op for detectors that learn nothing)."""
        return self

    def score_inputs(self, model: nn.Module, inputs: Any, *, output: Any = None) -> torch.Tensor:
        """One OOD score per input (higher = more OOD), a 1-D tensor on the inputs' device.

        ``output`` selects the logits when the model returns a tuple / dict (as in ``ebood.extract``).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.name}: model must be a torch.nn.Module, got {type(model).__name__}")
        x = _input_tensor(inputs, self.name)
        self._check_fitted()
        check_finite_rows(x, "inputs", self.name)
        dev = _model_device(model, x.device)
        with eval_mode(model):
            s = self._score_inputs(model, x.to(dev), output)
        return check_scores(s.detach().to(x.device, accumulation_dtype(x.dtype)), None, self.name)

    def score_data(self, model: nn.Module, data: Any, *, batch_size: int | None = None, output: Any = None) -> torch.Tensor:
        """Scores of every input in ``data`` (a Dataset, DataLoader or array), in order, on the CPU."""
        parts = []
        for batch in as_loader(data, batch_size):
            x, _ = split_batch(batch)
            parts.append(self.score_inputs(model, x, output=output).cpu())
        if not parts:
            raise ValueError(f"{self.name}: data is empty")
        return torch.cat(parts)

    def calibrate_inputs(self, model: nn.Module, id_data: Any, tpr: float = 0.95, **kwargs: Any) -> "ModelDetector":
        """Set ``threshold_`` so that at least ``tpr`` of ``id_data`` is kept (see ``Detector.calibrate``)."""
        s = self.score_data(model, id_data, **kwargs)
        self.threshold_ = id_threshold(s, tpr)
        self.calibration_tpr_ = float(tpr)
        return self

    def predict_inputs(self, model: nn.Module, inputs: Any, **kwargs: Any) -> torch.Tensor:
        """True where an input is flagged as OOD (``score > threshold_``)."""
        return self.score_inputs(model, inputs, **kwargs) > self._threshold("calibrate_inputs() on ID validation data")

    # ----- hooks for ebood.evaluate_detectors ------------------------------------------------------
    def fit_layers(self, model: nn.Module) -> list[str] | None:
        """Layers whose ID-training features :meth:`fit_outputs` learns from (``None``: it does not)."""
        return None

    def fit_outputs(self, outputs: Outputs, layers: Sequence[str] | None = None) -> "ModelDetector":
        """Fit from extracted ID-training outputs holding (at least) the features of ``layers``."""
        raise TypeError(f"detector {self.name!r} does not fit from extracted outputs")

    def _score_inputs(self, model: nn.Module, x: torch.Tensor, output: Any) -> torch.Tensor:
        raise NotImplementedError


def _logits(model: nn.Module, x: torch.Tensor, output: Any) -> torch.Tensor:
    return select_output(model(x), output)


# ----- ODIN --------------------------------------------------------------------------------------


@register
class ODIN(ModelDetector):
    """ODIN (Liang, Li & Srikant, "Enhancing the Reliability of Out-of-distribution Image Detection
    in Neural Networks", ICLR 2018): temperature scaling plus input pre-processing.

    With ``S(x; T) = softmax(f(x) / T)`` and ``y = argmax_j f_j(x)``::

        x' = x - epsilon * sign(-grad_x log S_y(x; T)) / std
        score = -max_j S_j(x'; T)

    ``-log S_y`` is the cross-entropy to the predicted class, so the step moves the input to make
    the prediction more confident. ``std`` is the per-channel standard deviation of the input
    normalisation (a scalar or one value per channel on axis 1): the step is ``epsilon`` in the
    original pixel scale, as in the reference code. The paper's confidence ``max_j S_j`` is negated
    (higher = more OOD). Defaults ``T = 1000``, ``epsilon = 0.0014`` are the paper's CIFAR setting.
    """

    name = "odin"
    paper = "Liang, Li & Srikant, ICLR 2018"

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014, std: float | Sequence[float] | None = None) -> None:
        self.temperature = temperature
        self.epsilon = epsilon
        self.std = _check_std(std, self.name)
        scores._check_temperature(temperature)
        _check_positive(epsilon, "epsilon", self.name, allow_zero=True)

    def perturb(self, model: nn.Module, x: torch.Tensor, output: Any = None) -> torch.Tensor:
        """The pre-processed inputs ``x'``."""
        if self.epsilon == 0:
            return x
        # Gradients are needed even when the caller runs under inference_mode / no_grad.
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            z = _logits(model, x, output) / self.temperature
            loss = F.cross_entropy(z, z.argmax(dim=1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        return (x - self.epsilon * torch.sign(grad) * _input_scale(self.std, x, self.name)).detach()

    def _score_inputs(self, model: nn.Module, x: torch.Tensor, output: Any) -> torch.Tensor:
        x_pert = self.perturb(model, x, output)
        with torch.no_grad():
            return scores.msp(_logits(model, x_pert, output), self.temperature)


# ----- GradNorm ----------------------------------------------------------------------------------


@register
class GradNorm(ModelDetector):
    """GradNorm (Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional
    Shifts in the Wild", NeurIPS 2021).

    The L1 norm of the gradient, with respect to the weights ``W`` of the last linear layer, of the
    KL divergence between the uniform distribution ``u`` and ``softmax(f(x) / T)``::

        S(x) = || d KL(u || softmax(f(x)/T)) / dW ||_1 = (1/T) * ||softmax(f(x)/T) - u||_1 * ||h(x)||_1

    where ``h(x)`` is the head's input: the gradient is the outer product of
    ``(softmax(f/T) - u) / T`` and ``h``, whose L1 norm factorises, so one forward pass gives it
    exactly (no backward pass per sample). GradNorm is larger for ID data; the score is ``-S(x)``
    (higher = more OOD). The model's output must be the output of its last ``nn.Linear``.
    """

    name = "gradnorm"
    paper = "Huang, Geng & Li, NeurIPS 2021"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature
        scores._check_temperature(temperature)

    def _score_inputs(self, model: nn.Module, x: torch.Tensor, output: Any) -> torch.Tensor:
        with torch.no_grad(), LayerTap(model, [PENULTIMATE]) as tap:
            tap.start_batch()
            logits = _logits(model, x, output)
            tap.finish_batch()
            head_out = tap.head_output
        h = tap.values.get(PENULTIMATE)
        if h is None or head_out is None or head_out.shape != logits.shape or not torch.allclose(head_out, logits, rtol=1e-4, atol=1e-5):
            raise ExtractionError(f"{self.name}: the model's logits must be the output of its last nn.Linear (the gradient is taken w.r.t. its weights)")
        return self.from_features(logits, h)

    def from_features(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The score from logits (N, C) and the head's input features (N, D)."""
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        p = torch.softmax(logits.to(acc) / self.temperature, dim=1)
        c = logits.shape[1]
        grad_scale = (p - 1.0 / c).abs().sum(dim=1) / self.temperature
        return -(grad_scale * features.to(acc).abs().sum(dim=1))


# ----- MC-Dropout --------------------------------------------------------------------------------


def _dropout_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


@register
class MCDropout(ModelDetector):
    """Monte-Carlo Dropout (Gal & Ghahramani, "Dropout as a Bayesian Approximation: Representing
    Model Uncertainty in Deep Learning", ICML 2016): predictive entropy of the mean of ``passes``
    stochastic forward passes with dropout on.

    ``p_bar = (1/T) sum_t softmax(f_t(x))``, ``score = -sum_j p_bar_j log p_bar_j`` (nats; already
    higher = more OOD). Only the dropout modules (``nn.Dropout``, ``Dropout2d``, ...) are switched
    to training mode, for the duration of the call: batch norm keeps its running statistics, and
    every module's mode is restored afterwards. ``seed`` makes the dropout masks reproducible
    (the global random state is left untouched); ``None`` uses torch's global generator.
    """

    name = "mc_dropout"
    paper = "Gal & Ghahramani, ICML 2016"

    def __init__(self, passes: int = 10, seed: int | None = None) -> None:
        self.passes = passes
        self.seed = seed
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ValueError(f"{self.name}: passes must be an integer >= 1, got {passes!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{self.name}: seed must be an integer or None, got {seed!r}")

    def _score_inputs(self, model: nn.Module, x: torch.Tensor, output: Any) -> torch.Tensor:
        drops = _dropout_modules(model)
        if not drops:
            raise ValueError(
                f"{self.name}: {type(model).__name__} has no dropout module (nn.Dropout, nn.Dropout2d, ...); "
                "functional dropout (F.dropout) cannot be switched on at test time"
            )
        for m in drops:
            m.train()  # eval_mode() in score_inputs restores every module afterwards
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=self.seed is not None):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            total = None
            for _ in range(self.passes):
                logits = _logits(model, x, output)
                acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
                p = torch.softmax(logits.to(acc), dim=1)
                total = p if total is None else total + p
        p_bar = total / self.passes
        return -(torch.special.xlogy(p_bar, p_bar)).sum(dim=1)


# ----- Mahalanobis ensemble ----------------------------------------------------------------------


def _mahalanobis(f: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(N, K) squared Mahalanobis distances of the rows of ``f`` to each class mean (float64)."""
    f = f.to(torch.float64)
    fp = f @ precision
    return (fp * f).sum(1, keepdim=True) - 2.0 * fp @ means.T + ((means @ precision) * means).sum(1)[None, :]


@register
class MahalanobisEnsemble(ModelDetector):
    """Mahalanobis detector with input pre-processing and a multi-layer ensemble (Lee, Lee, Lee &
    Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
    Attacks", NeurIPS 2018).

    For every layer ``l`` (feature maps global-average-pooled): class means ``mu_{l,c}`` and a
    shared covariance ``Sigma_l`` (pseudo-inverted) from labelled ID training data. With
    ``d_{l,c}(x) = (f_l(x) - mu_{l,c})^T Sigma_l^{-1} (f_l(x) - mu_{l,c})`` and the closest class
    ``c* = argmin_c d_{l,c}(x)``::

        x'_l = x - epsilon * sign(grad_x d_{l,c*}(x)) / std        (move towards the closest class)
        M_l(x) = -min_c d_{l,c}(x'_l)                               (the paper's confidence score)
        score = b + sum_l w_l M_l(x)

    The weights ``w, b`` are a logistic regression (scikit-learn, C = 1, on standardised ``M_l``)
    separating ID validation data (label 0) from OOD validation data (label 1), so the score is
    the log-odds of OOD (higher = more OOD), as in the paper. Give them with
    ``fit_inputs(model, id_train, validation=(id_val, ood_val))`` (or ``ebood.evaluate_detectors(...,
    id_val=..., ood_val=...)``). Without validation data the layers are weighted equally after
    standardising each ``M_l`` by its mean and standard deviation on the training data:
    ``score = -(1/L) sum_l (M_l - mean_l) / sd_l``.

    ``layers``: module names (see ``ebood.extract``); ``None`` uses the model's ``ood_layers``
    attribute when it has one (ebood's architectures list their stage outputs), else the
    penultimate layer only. ``std``: the input normalisation's per-channel std, as for ODIN.
    """

    name = "mahalanobis_ensemble"
    paper = "Lee, Lee, Lee & Shin, NeurIPS 2018"
    needs_fit = True
    fit_requires = ("labels",)
    learned_state = {
        "layers_": texts(),
        "classes_": tensor("K", dtype="int"),
        "means_": tensors(2, dtype="float64"),
        "precisions_": tensors(2, dtype="float64"),
        "weights_": tensor("L", dtype="float64"),
        "bias_": number(),
        "weighting_": text("standardised-mean", "logistic-regression"),
    }

    def __init__(self, epsilon: float = 0.0014, layers: Sequence[str] | None = None, std: float | Sequence[float] | None = None) -> None:
        self.epsilon = epsilon
        self.layers = [layers] if isinstance(layers, str) else (list(layers) if layers is not None else None)
        self.std = _check_std(std, self.name)
        _check_positive(epsilon, "epsilon", self.name, allow_zero=True)
        if self.layers is not None and not self.layers:
            raise ValueError(f"{self.name}: layers is empty; give module names or None")
        if self.layers is not None and not all(isinstance(n, str) for n in self.layers):
            raise TypeError(f"{self.name}: layers must be module names (strings), got {self.layers!r}")

    # ----- fitting -----------------------------------------------------------------------------
    def fit_layers(self, model: nn.Module) -> list[str]:
        """The layer names to extract (resolved against ``model``; the penultimate layer last)."""
        names = self.layers if self.layers is not None else list(getattr(model, "ood_layers", None) or [PENULTIMATE])
        resolve_layers(model, names)  # raises with suggestions for unknown names
        return list(names)

    def fit_inputs(self, model: nn.Module, data: Any, validation: tuple[Any, Any] | None = None, *, batch_size: int | None = None,
                   device: Any = None, output: Any = None, progress: bool = False) -> "MahalanobisEnsemble":
        """Fit the class-conditional Gaussians on labelled ID ``data``; with ``validation = (id_val,
        ood_val)`` also fit the layer weights by logistic regression."""
        outs = extract(model, data, layers=self.fit_layers(model), batch_size=batch_size, device=device, output=output, progress=progress)
        self.fit_outputs(outs)
        if validation is not None:
            if not (isinstance(validation, (tuple, list)) and len(validation) == 2):
                raise TypeError(f"{self.name}: validation must be a pair (id_val, ood_val) of datasets")
            self.fit_validation(model, validation[0], validation[1], batch_size=batch_size, output=output)
        return self

    def fit(self, data: Outputs | Iterable[Outputs]) -> "MahalanobisEnsemble":
        """Fit the Gaussians from extracted outputs (features of ``layers`` and labels)."""
        parts = [data] if isinstance(data, Outputs) else list(data)
        if not parts:
            raise ValueError(f"detector {self.name!r}: fit received no data")
        return self.fit_outputs(parts[0] if len(parts) == 1 else Outputs.concat(parts))

    def fit_outputs(self, outputs: Outputs, layers: Sequence[str] | None = None) -> "MahalanobisEnsemble":
        """Class means and tied covariance of each layer from ID training outputs, as returned by
        ``ebood.extract(model, data, layers=det.fit_layers(model))``. The layers used are
        ``layers``, else the ``layers`` hyperparameter, else every layer in the outputs."""
        if not isinstance(outputs, Outputs):
            raise TypeError(f"{self.name}.fit_outputs expects ebood.Outputs, got {type(outputs).__name__}")
        if outputs.labels is None:
            raise ValueError(f"{self.name}: fitting needs class labels of the ID training data; the outputs have none")
        if outputs.features is None:
            raise ValueError(f"{self.name}: the outputs have no features")
        names = list(layers) if layers is not None else self.layers
        if names is None:
            names = list(outputs.features) if isinstance(outputs.features, dict) else [PENULTIMATE]
        labels = outputs.labels
        if int(labels.min()) < 0:
            raise ValueError(f"{self.name}: training labels must be class indices >= 0, got {int(labels.min())}")
        classes = torch.unique(labels)
        means, precisions, train_scores = {}, {}, []
        for name in names:
            f = self._layer_features(outputs, name)
            check_finite_rows(f, f"features of layer {name!r}", self.name)
            f = f.to(torch.float64)
            mu = torch.stack([f[labels == c].mean(0) for c in classes])
            centred = f - mu[torch.searchsorted(classes, labels)]
            cov = centred.T @ centred / f.shape[0]
            means[name] = mu
            precisions[name] = torch.linalg.pinv(cov, hermitian=True)
            train_scores.append(-_mahalanobis(f, mu, precisions[name]).min(dim=1).values)
        self.layers_ = list(names)
        self.classes_ = classes
        self.means_ = means
        self.precisions_ = precisions
        m = torch.stack(train_scores, dim=1)
        sd = m.std(dim=0).clamp_min(1e-12)
        self.weights_ = -1.0 / (sd * len(names))
        self.bias_ = float((m.mean(dim=0) / (sd * len(names))).sum())
        self.weighting_ = "standardised-mean"
        self._fitted = True
        return self

    def _layer_features(self, outputs: Outputs, name: str) -> torch.Tensor:
        if isinstance(outputs.features, dict):
            if name not in outputs.features:
                raise ValueError(f"{self.name}: the outputs have no features for layer {name!r}; extract with layers={self.layers or [name]!r}")
            return outputs.features[name]
        if name != PENULTIMATE:
            raise ValueError(f"{self.name}: the outputs hold only penultimate features; extract with layers=[{name!r}, ...]")
        return outputs.features

    def fit_validation(self, model: nn.Module, id_val: Any, ood_val: Any, *, batch_size: int | None = None, output: Any = None) -> "MahalanobisEnsemble":
        """Fit the layer weights: logistic regression of OOD (1) vs ID (0) on the per-layer scores.

        ``ood_val`` is a dataset, or a list / dict of datasets (pooled).
        """
        self._check_fitted()
        m_id = self.layer_scores_data(model, id_val, batch_size=batch_size, output=output)
        sets = list(ood_val.values()) if isinstance(ood_val, dict) else list(ood_val) if isinstance(ood_val, list) else [ood_val]
        if not sets:
            raise ValueError(f"{self.name}: no OOD validation set given")
        m_ood = torch.cat([self.layer_scores_data(model, d, batch_size=batch_size, output=output) for d in sets])
        return self.fit_weights(m_id, m_ood)

    def fit_weights(self, id_layer_scores: torch.Tensor, ood_layer_scores: torch.Tensor) -> "MahalanobisEnsemble":
        """Fit ``w, b`` from per-layer scores (N, L) of ID and OOD validation inputs."""
        from sklearn.linear_model import LogisticRegression

        a = torch.as_tensor(id_layer_scores, dtype=torch.float64).cpu().numpy()
        b = torch.as_tensor(ood_layer_scores, dtype=torch.float64).cpu().numpy()
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != len(self.layers_) or b.shape[1] != len(self.layers_):
            raise ValueError(f"{self.name}: layer scores must be (N, {len(self.layers_)}), got {a.shape} and {b.shape}")
        if len(a) == 0 or len(b) == 0:
            raise ValueError(f"{self.name}: the ID and the OOD validation sets must both be non-empty")
        x = np.concatenate([a, b])
        y = np.r_[np.zeros(len(a)), np.ones(len(b))]
        mean, sd = x.mean(0), x.std(0)
        sd[sd == 0] = 1.0
        lr = LogisticRegression(C=1.0, max_iter=1000).fit((x - mean) / sd, y)
        w = lr.coef_[0] / sd
        self.weights_ = torch.from_numpy(w)
        self.bias_ = float(lr.intercept_[0] - (lr.coef_[0] * mean / sd).sum())
        self.weighting_ = "logistic-regression"
        return self

    # ----- scoring -----------------------------------------------------------------------------
    def _validate_state(self) -> None:
        k = self.classes_.shape[0]
        if self.weights_.shape != (len(self.layers_),):
            raise ValueError(f"weights_ has shape {tuple(self.weights_.shape)}, expected ({len(self.layers_)},) for layers_ {self.layers_}")
        for what in ("means_", "precisions_"):
            if sorted(getattr(self, what)) != sorted(self.layers_):
                raise ValueError(f"{what} holds layers {sorted(getattr(self, what))}, layers_ lists {self.layers_}")
        for name in self.layers_:
            mu, p = self.means_[name], self.precisions_[name]
            if mu.ndim != 2 or mu.shape[0] != k or p.shape != (mu.shape[1], mu.shape[1]):
                raise ValueError(f"layer {name!r}: means_ {tuple(mu.shape)} and precisions_ {tuple(p.shape)} do not fit the {k} classes of classes_")

    def layer_scores(self, model: nn.Module, inputs: Any, *, output: Any = None) -> torch.Tensor:
        """The per-layer confidences ``M_l`` (N, L) of a batch (before the weighted sum)."""
        x = _input_tensor(inputs, self.name)
        self._check_fitted()
        dev = _model_device(model, x.device)
        with eval_mode(model):
            return self._layer_scores(model, x.to(dev), output).to(x.device)

    def layer_scores_data(self, model: nn.Module, data: Any, *, batch_size: int | None = None, output: Any = None) -> torch.Tensor:
        parts = [self.layer_scores(model, split_batch(b)[0], output=output).cpu() for b in as_loader(data, batch_size)]
        if not parts:
            raise ValueError(f"{self.name}: data is empty")
        return torch.cat(parts)

    def _features(self, model: nn.Module, x: torch.Tensor, layers: list[str], output: Any, grad: bool) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(grad), LayerTap(model, layers, detach=not grad) as tap:
            tap.start_batch()
            _logits(model, x, output)
            tap.finish_batch()
        missing = [n for n in layers if n not in tap.values]
        if missing:
            raise ExtractionError(f"{self.name}: layer(s) {', '.join(map(repr, missing))} produced no output in the forward pass")
        return tap.values

    def _layer_scores(self, model: nn.Module, x: torch.Tensor, output: Any) -> torch.Tensor:
        layers = self.layers_
        means = {n: self.means_[n].to(x.device, torch.float64) for n in layers}
        precs = {n: self.precisions_[n].to(x.device, torch.float64) for n in layers}
        if self.epsilon == 0:
            feats = self._features(model, x, layers, output, grad=False)
            cols = [-_mahalanobis(feats[n], means[n], precs[n]).min(dim=1).values for n in layers]
            return torch.stack(cols, dim=1)
        scale = _input_scale(self.std, x, self.name)
        cols = []
        # Gradients are needed even when the caller runs under inference_mode / no_grad.
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            feats = self._features(model, xg, layers, output, grad=True)
            grads = []
            for i, n in enumerate(layers):
                closest = _mahalanobis(feats[n], means[n], precs[n]).min(dim=1).values
                (g,) = torch.autograd.grad(closest.sum(), xg, retain_graph=i < len(layers) - 1)
                grads.append(g)
        for n, g in zip(layers, grads):
            x_pert = (x - self.epsilon * torch.sign(g) * scale).detach()
            f = self._features(model, x_pert, [n], output, grad=False)[n]
            cols.append(-_mahalanobis(f, means[n], precs[n]).min(dim=1).values)
        return torch.stack(cols, dim=1)

    def _score_inputs(self, model: nn.Module, x: torch.Tensor, output: Any) -> torch.Tensor:
        m = self._layer_scores(model, x, output)
        return m @ self.weights_.to(m.device, m.dtype) + self.bias_

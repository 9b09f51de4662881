"""PALM: learning with a mixture of prototypes per class (Lu, Zhang, Xu, Leng & Liu, ICLR 2024).

Lu et al., "Learning with Mixture of Prototypes for Out-of-Distribution Detection", ICLR 2024.
Each class ``c`` owns ``M = cache_size`` prototypes on the unit sphere. An L2-normalised embedding
``z = g(h(x)) / ||g(h(x))||`` (``h``: the classifier's penultimate features, ``g``: a projection
head) is softly assigned to the prototypes of its class by Sinkhorn-Knopp and top-``k`` pruning; an
MLE loss pulls it towards them and a prototype-level contrastive loss separates the classes. The
prototypes move by an exponential moving average of their assigned embeddings, not by gradients.
OOD detection then uses the classifier's penultimate features with the existing ``knn`` or
``mahalanobis`` detectors, as the paper does.

* :class:`PALMLoss` (an ``nn.Module`` holding the prototypes), :class:`ProjectionHead`;
* :func:`train_palm`: the training entry point (``ebood train --loss palm`` on the command line).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..extraction import PENULTIMATE, LayerTap
from ..progress import progress_bar
from .batches import LabelledSource, as_dataset, derived_seed
from .checkpoint import save_weights
from .loop import check_count, check_positive, cosine_factor, describe_data, resolve_device

__all__ = ["PALMLoss", "PALMParts", "ProjectionHead", "PALMEpoch", "train_palm", "fit_linear_head", "sinkhorn"]

_AUG_STREAMS = (11, 12)


class PALMParts(NamedTuple):
    """``total = mle + lambda_pcon * proto_contra`` (0-d tensors)."""

    total: torch.Tensor
    mle: torch.Tensor
    proto_contra: torch.Tensor


def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Soft assignment of ``B`` samples to ``P`` prototypes by Sinkhorn-Knopp (Cuturi, NeurIPS 2013),
    as in PALM (eq. 4) and SwAV: from ``Q = exp(scores / epsilon)^T`` (P x B), alternately rescale the
    rows to sum to ``1/P`` and the columns to ``1/B``; returns ``B * Q^T`` (each sample's row sums to 1).
    ``scores`` are the cosine similarities ``z_i . p_j`` (B x P)."""
    # exp(s / eps) with the largest value shifted to 1: the normalisation cancels the shift
    q = torch.exp((scores - scores.max()) / epsilon).T
    q = q / q.sum()
    p, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-12) / p
        q = q / q.sum(dim=0, keepdim=True).clamp_min(1e-12) / b
    return (q * b).T


def _l1_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t / t.abs().sum(dim=dim, keepdim=True).clamp_min(1e-12)


class PALMLoss(nn.Module):
    """PALM's objective (Lu et al., ICLR 2024, eq. 3-8), called as ``loss(features, labels)`` with
    L2-normalised embeddings ``features`` of shape ``(B, D)`` or ``(B, V, D)`` (``V`` augmented views).

    With prototypes ``p_j`` (class ``j mod C``), ``w`` the Sinkhorn assignment (eq. 4) restricted to
    the sample's own class and pruned to its top ``k`` prototypes, re-normalised per sample::

        MLE:  L_mle  = -1/N sum_i [ sum_j w_ij z_i.p_j / temp - log sum_j exp(z_i.p_j / temp) ]
        PCON: L_pcon = -1/P sum_j [ 1/|S_j| sum_{l in S_j} s_jl - log sum_{l != j} exp(s_jl) ]
              with s_jl = p_j.p_l / 0.5 and S_j the other prototypes of p_j's class
        total = L_mle + lambda_pcon * L_pcon

    Before the loss, each prototype moves by EMA towards the mean of the embeddings assigned to it
    (assignments normalised per sample, then per prototype)::

        p_j <- normalize(proto_m * p_j + (1 - proto_m) * sum_i a_ij z_i)

    As in the official code the assignment is computed twice (before the EMA step, for the update
    and the top-``k`` choice; after it, for the MLE weights), PCON's temperature is 0.5, and the
    PCON gradient reaches the embeddings through the EMA step (the prototypes are detached after
    the call). Defaults are the official code's: ``cache_size = 6`` prototypes per class, ``k = 5``,
    ``proto_m = 0.999``, ``temp = 0.1``, ``lambda_pcon = 1``, ``epsilon = 0.05``, 3 Sinkhorn
    iterations, ``feat_dim = 128``. The prototypes start uniform on ``[0, 1)`` and normalised (the
    official initialisation), drawn from ``seed``.
    """

    def __init__(self, num_classes: int, cache_size: int = 6, proto_m: float = 0.999, temp: float = 0.1, lambda_pcon: float = 1.0,
                 k: int = 5, feat_dim: int = 128, epsilon: float = 0.05, sinkhorn_iterations: int = 3, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("cache_size", cache_size), ("feat_dim", feat_dim),
                            ("sinkhorn_iterations", sinkhorn_iterations)):
            check_count(value, name)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an integer >= 0 (0: no top-k pruning), got {k!r}")
        if not 0 <= float(proto_m) < 1:
            raise ValueError(f"proto_m must be in [0, 1), got {proto_m!r}")
        self.num_classes, self.cache_size, self.feat_dim = num_classes, cache_size, feat_dim
        self.proto_m = float(proto_m)
        self.temp = check_positive(temp, "temp")
        self.lambda_pcon = check_positive(lambda_pcon, "lambda_pcon", allow_zero=True)
        self.epsilon = check_positive(epsilon, "epsilon")
        self.k = min(k, cache_size)
        self.sinkhorn_iterations = sinkhorn_iterations
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("prototypes", F.normalize(torch.rand(num_classes * cache_size, feat_dim, generator=g), dim=1))
        self.register_buffer("prototype_labels", torch.arange(num_classes).repeat(cache_size))

    def config(self) -> dict[str, Any]:
        """The settings as plain values (saved with the trained weights)."""
        return {"loss": "palm", "cache_size": self.cache_size, "proto_m": self.proto_m, "temp": self.temp,
                "lambda_pcon": self.lambda_pcon, "k": self.k, "feat_dim": self.feat_dim, "epsilon": self.epsilon,
                "sinkhorn_iterations": self.sinkhorn_iterations}

    def _check(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(features, torch.Tensor) or not features.is_floating_point() or features.ndim not in (2, 3):
            raise ValueError(f"features must be a floating tensor (B, D) or (B, views, D), got {getattr(features, 'shape', type(features))}")
        if features.shape[-1] != self.feat_dim:
            raise ValueError(f"features have dimension {features.shape[-1]}, but the prototypes have {self.feat_dim} (feat_dim)")
        if labels.ndim != 1 or labels.shape[0] != features.shape[0] or labels.is_floating_point():
            raise ValueError(f"labels must be integer class indices of shape ({features.shape[0]},), got {tuple(labels.shape)} {labels.dtype}")
        if labels.numel() == 0:
            raise ValueError("the batch is empty")
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes - 1}], found {int(labels.min())}..{int(labels.max())}")
        views = features.shape[1] if features.ndim == 3 else 1
        flat = torch.cat(torch.unbind(features, dim=1)) if features.ndim == 3 else features  # view-major, as the official code
        return flat, labels.repeat(views)

    def _top_k(self, weights: torch.Tensor) -> torch.Tensor:
        idx = torch.topk(weights, self.k, dim=1).indices
        return torch.zeros_like(weights).scatter(1, idx, 1.0)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> PALMParts:
        z, y = self._check(features, labels)
        own = (y[:, None] == self.prototype_labels[None, :].to(y.device)).to(z.dtype)
        protos = self.prototypes.to(z.device, z.dtype)

        # EMA update of the prototypes from the assignments (gradient flows through z, as in the paper's code)
        q = sinkhorn(z.detach() @ protos.T, self.epsilon, self.sinkhorn_iterations)
        update = own * q
        if self.k > 0:
            update = update * self._top_k(update)
        update = _l1_rows(_l1_rows(update, 1), 0)
        moved = F.normalize(self.proto_m * protos + (1 - self.proto_m) * update.T @ z, dim=1)

        # MLE: soft-assigned positives among the own-class prototypes, all prototypes as the partition
        q = sinkhorn(z.detach() @ moved.detach().T, self.epsilon, self.sinkhorn_iterations)
        weights = own * q
        if self.k > 0:
            weights = weights * self._top_k(update)
        weights = _l1_rows(weights, 1)
        logits = z @ moved.detach().T / self.temp
        mle = -(torch.sum(weights * logits, dim=1) - torch.logsumexp(logits, dim=1)).mean()

        pcon = self._prototype_contrast(moved) if self.lambda_pcon > 0 else torch.zeros((), dtype=z.dtype, device=z.device)
        with torch.no_grad():
            self.prototypes.copy_(moved.detach().to(self.prototypes.dtype))
        return PALMParts(mle + self.lambda_pcon * pcon, mle, pcon)

    def _prototype_contrast(self, protos: torch.Tensor) -> torch.Tensor:
        p = F.normalize(protos, dim=1)
        sim = p @ p.T / 0.5
        sim = sim - sim.max(dim=1, keepdim=True).values.detach()
        labels = self.prototype_labels.to(p.device)
        not_self = 1.0 - torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
        same = (labels[:, None] == labels[None, :]).to(p.dtype) * not_self
        pos = (_l1_rows(same, 1) * sim).sum(dim=1)
        neg = torch.log((not_self * torch.exp(sim)).sum(dim=1))
        return -(pos - neg).mean()


class ProjectionHead(nn.Module):
    """The official code's MLP head: ``Linear(d, d) - ReLU - Linear(d, feat_dim)``, output L2-normalised."""

    def __init__(self, in_features: int, feat_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(), nn.Linear(in_features, feat_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(h), dim=-1)


@dataclass(frozen=True)
class PALMEpoch:
    """Means over one epoch of :func:`train_palm` (passed to ``on_epoch``)."""

    epoch: int
    loss: float
    mle: float
    proto_contra: float
    lr: float
    seconds: float


def _penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with LayerTap(model, [PENULTIMATE], detach=False) as tap:
        tap.start_batch()
        model(x)
        tap.finish_batch()
    h = tap.values.get(PENULTIMATE)
    if h is None:
        raise ValueError(f"{type(model).__name__}: PALM trains the input of the model's last nn.Linear (its penultimate features), "
                         "but the forward pass called no nn.Linear on (N, D) features")
    return h


def train_palm(
    model: nn.Module,
    data: Any,
    *,
    loss: PALMLoss | None = None,
    head: nn.Module | None = None,
    epochs: int = 100,
    lr: float = 0.5,
    optimizer: Literal["sgd", "adam"] = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 1e-6,
    batch_size: int = 512,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    fit_classifier: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    output: str | Path | None = None,
    progress: bool = True,
    on_epoch: Callable[[PALMEpoch], None] | None = None,
) -> nn.Module:
    """Train ``model``'s penultimate representation with PALM on labelled ``data``; return the model (eval mode).

    The embedding is ``head(h(x))`` with ``h(x)`` the input of the model's last ``nn.Linear`` (read
    by a forward hook: any classifier works) and ``head`` a :class:`ProjectionHead` (made when
    None). ``loss``: a :class:`PALMLoss` (default: the official settings, classes from the labels).
    With ``augment`` (a batch augmentation ``augment(batch, generator)``, e.g.
    :class:`ebood.train.RandomCropFlip`) each step uses two augmented views, as the official code;
    without, one view (its "noaug" setting). Optimiser: SGD with momentum (the official recipe:
    lr 0.5, batch 512, weight decay 1e-6, cosine annealing) or Adam; the learning rate is annealed
    per step on a cosine to 0. ``fit_classifier``: afterwards, fit the model's last ``nn.Linear`` on
    the frozen features by cross-entropy (so that the model still classifies; PALM's OOD scores use
    the features only). ``output``: write the weights (safetensors, with the settings). Seeded: on
    the CPU the same seed gives the same weights.
    """
    dev = resolve_device(model, device)
    check_count(epochs, "epochs")
    check_count(batch_size, "batch_size")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    source = LabelledSource(as_dataset(data, "data"), batch_size, seed, 0, "data")
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(derived_seed(seed, 3))
        x0, y0 = next(iter(source.epoch(0)))
        model.to(dev)
        with torch.no_grad():
            dim = _penultimate(model.eval(), x0.to(dev)).shape[1]
        if loss is None:
            loss = PALMLoss(max(int(y.max()) for _, y in source.epoch(0)) + 1, seed=seed)
        head = (head or ProjectionHead(dim, loss.feat_dim)).to(dev)
        loss.to(dev)
        params = list(model.parameters()) + list(head.parameters())
        opt: torch.optim.Optimizer = (torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay) if optimizer == "sgd"
                                      else torch.optim.Adam(params, lr=lr, weight_decay=weight_decay))
        total = epochs * len(source)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, total, 0.0))
        history = _palm_epochs(model, head, loss, source, opt, sched, epochs, augment, seed, dev, progress, on_epoch)
        if fit_classifier:
            fit_linear_head(model, data, seed=seed, device=dev)
    model.eval()
    if output is not None:
        settings = {"kind": "palm", "loss": loss.config(), "epochs": epochs, "lr": lr, "optimizer": optimizer, "momentum": momentum,
                    "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed, "data": describe_data(data),
                    "augment": (augment.config() if hasattr(augment, "config") else repr(augment)) if augment else None}
        save_weights(model, Path(output), {"training": {"settings": settings, "history": history}})
    return model


def _palm_epochs(model: nn.Module, head: nn.Module, loss: PALMLoss, source: LabelledSource, opt: torch.optim.Optimizer,
                 sched: Any, epochs: int, augment: Any, seed: int, dev: torch.device, progress: bool,
                 on_epoch: Callable[[PALMEpoch], None] | None) -> list[dict[str, float]]:
    history, step = [], 0
    model.train()
    head.train()
    with progress_bar(progress, epochs * len(source), "PALM", unit="steps") as bar:
        for epoch in range(1, epochs + 1):
            started, sums, n = time.perf_counter(), [0.0, 0.0, 0.0], 0
            lr = opt.param_groups[0]["lr"]
            for x, y in source.epoch(epoch - 1):
                x, y = x.to(dev), y.to(dev)
                if augment is not None:
                    views = [augment(x, torch.Generator().manual_seed(derived_seed(seed, s, step))) for s in _AUG_STREAMS]
                    z = head(_penultimate(model, torch.cat(views))).view(len(views), x.shape[0], -1).transpose(0, 1)
                else:
                    z = head(_penultimate(model, x))
                parts = loss(z, y)
                if not torch.isfinite(parts.total):
                    raise FloatingPointError(f"PALM: non-finite loss at step {step + 1} (epoch {epoch}); lower the learning rate")
                lr = opt.param_groups[0]["lr"]
                opt.zero_grad(set_to_none=True)
                parts.total.backward()
                opt.step()
                sched.step()
                step, n = step + 1, n + 1
                sums = [a + float(b.detach()) for a, b in zip(sums, parts)]
                bar.advance(1)
            record = PALMEpoch(epoch, sums[0] / n, sums[1] / n, sums[2] / n, lr, time.perf_counter() - started)
            history.append(record.__dict__.copy())
            if on_epoch is not None:
                on_epoch(record)
    return history


def fit_linear_head(model: nn.Module, data: Any, *, epochs: int = 200, lr: float = 0.01, seed: int = 0,
                    device: str | torch.device | None = None) -> nn.Module:
    """Fit the model's last ``nn.Linear`` (its classifier head) on the frozen penultimate features of
    labelled ``data`` by full-batch cross-entropy (Adam), leaving every other weight as it is."""
    dev = resolve_device(model, device)
    feats, labels = [], []
    model.eval()
    with torch.no_grad(), LayerTap(model, [PENULTIMATE]) as tap:
        for x, y in LabelledSource(as_dataset(data, "data"), 1024, seed, 0, "data").epoch(0):
            tap.start_batch()
            model(x.to(dev))
            tap.finish_batch()
            feats.append(tap.values[PENULTIMATE])
            labels.append(y.to(dev))
        fc = tap.head
    if fc is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head to fit")
    h, y = torch.cat(feats), torch.cat(labels)
    opt = torch.optim.Adam(fc.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(fc(h), y).backward()
        opt.step()
    return model

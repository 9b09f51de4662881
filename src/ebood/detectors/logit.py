"""Detectors that read only the logits."""

from __future__ import annotations

import math
import warnings
from typing import Iterator

import torch

from .. import scores
from .._arrays import accumulation_dtype
from ..outputs import Outputs
from ._finite import check_finite_rows
from ._learned import number, tensor
from .base import Detector, register, warn_unseen_classes

__all__ = ["MSP", "MaxLogit", "Energy", "Entropy", "GEN", "KLMatching", "TemperatureScaling"]


@register
class MSP(Detector):
    """Maximum softmax probability (Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and
    Out-of-Distribution Examples in Neural Networks", ICLR 2017).

    ``score = -max_j softmax(z / T)_j`` (the paper's confidence, negated: higher = more OOD).
    """

    name = "msp"
    needs_fit = False
    paper = "Hendrycks & Gimpel, ICLR 2017"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature
        scores._check_temperature(temperature)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return scores.msp(outputs.logits, self.temperature)


@register
class MaxLogit(Detector):
    """Maximum logit (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World
    Settings", ICML 2022). ``score = -max_j z_j`` (negated: higher = more OOD)."""

    name = "max_logit"
    needs_fit = False
    paper = "Hendrycks et al., ICML 2022"

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return scores.max_logit(outputs.logits)


@register
class Energy(Detector):
    """Energy score (Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020).

    ``score = E(x) = -T * logsumexp(z / T)`` (already higher = more OOD; no sign flip).
    """

    name = "energy"
    needs_fit = False
    paper = "Liu et al., NeurIPS 2020"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature
        scores._check_temperature(temperature)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return scores.energy(outputs.logits, self.temperature)


@register
class Entropy(Detector):
    """Predictive entropy ``H = -sum_j p_j log p_j`` of ``p = softmax(z)``, in nats (higher = more OOD)."""

    name = "entropy"
    needs_fit = False
    paper = "Shannon entropy of the softmax (a classic uncertainty baseline)"

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return scores.entropy(outputs.logits)


# ----- helpers shared by the fitted logit detectors -------------------------------------------


def _row_chunks(n: int, width: int, dtype: torch.dtype, copies: int = 4) -> Iterator[slice]:
    """Row slices whose ``copies`` temporary (rows, width) arrays stay within ``scores.CHUNK_BYTES``."""
    itemsize = torch.finfo(dtype).bits // 8
    rows = max(1, scores.CHUNK_BYTES // max(1, copies * width * itemsize))
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


_check_finite = check_finite_rows  # training logits / features must be finite (CONVENTIONS.md)


def _saturate(z: torch.Tensor) -> torch.Tensor:
    """``z`` with every row that holds ``+inf`` (and no NaN) replaced by its limit: 0 at the ``+inf``
    entries and ``-inf`` elsewhere, so that its softmax is uniform over the ``+inf`` entries (the
    limit that ``ebood.scores`` uses, see CONVENTIONS.md "Non-finite values")."""
    rows = torch.isposinf(z.amax(dim=1))  # a NaN row has a NaN max and stays as it is
    if not bool(rows.any()):
        return z
    limit = torch.where(torch.isposinf(z), torch.zeros_like(z), torch.full_like(z, -math.inf))
    return torch.where(rows[:, None], limit, z)


def _check_labels(labels: torch.Tensor, num_classes: int, detector: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"detector {detector!r}: labels must be in 0..{num_classes - 1} (the logits have {num_classes} classes), "
            f"got values from {int(labels.min())} to {int(labels.max())}"
        )


@register
class GEN(Detector):
    """Generalized entropy (Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based
    Out-of-Distribution Detection", CVPR 2023).

    With ``p = softmax(z)`` and ``p_(1) >= p_(2) >= ...`` its sorted entries,
    ``score = G_gamma(p) = sum_{j=1..M} p_(j)^gamma * (1 - p_(j))^gamma`` with ``M = min(top_m, C)``.

    The paper (and OpenOOD) use ``-G`` as a confidence; G itself is already an OOD score (higher =
    more uncertain = more OOD), so no sign flip here. Defaults ``gamma = 0.1``, ``top_m = 100`` are
    the paper's. Computed in log space (``log(1 - p_max)`` as the log-sum-exp of the other logits
    minus the total), so that a confident prediction keeps its (small, informative) ``1 - p_max``
    instead of rounding it to 0. Infinite logits give the limit (CONVENTIONS.md): a row with
    ``k`` entries at ``+inf`` has ``p`` uniform over them, ``G = min(k, M) (1/k)^gamma (1 - 1/k)^gamma``
    (0 for ``k = 1``); ``-inf`` entries have ``p = 0`` and add nothing.
    """

    name = "gen"
    needs_fit = False
    paper = "Liu et al., CVPR 2023"

    def __init__(self, gamma: float = 0.1, top_m: int = 100) -> None:
        self.gamma = gamma
        self.top_m = top_m
        g = float(gamma)
        if not math.isfinite(g) or g <= 0:
            raise ValueError(f"gen: gamma must be finite and > 0, got {gamma!r}")
        if isinstance(top_m, bool) or not isinstance(top_m, int) or top_m < 1:
            raise ValueError(f"gen: top_m must be an integer >= 1, got {top_m!r}")

    def _score(self, outputs: Outputs) -> torch.Tensor:
        logits = outputs.logits
        acc = accumulation_dtype(logits.dtype)
        n, c = logits.shape
        m = min(self.top_m, c)
        parts = [self._chunk(logits[rows].to(acc), m) for rows in _row_chunks(n, c, acc)]
        return torch.cat(parts) if parts else torch.empty(0, dtype=acc, device=logits.device)

    def _chunk(self, z: torch.Tensor, m: int) -> torch.Tensor:
        z = _saturate(z)
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        top, idx = torch.topk(z, m, dim=1)
        log_p = top - lse
        # Only the largest probability can exceed 1/2; for the others log1p(-p) is accurate.
        log_1mp = torch.log1p(-torch.exp(log_p))
        others = z.scatter(1, idx[:, :1], -math.inf)
        log_1mp[:, 0] = (torch.logsumexp(others, dim=1, keepdim=True) - lse)[:, 0]
        return torch.exp(float(self.gamma) * (log_p + log_1mp)).sum(dim=1)


@register
class KLMatching(Detector):
    """KL matching (Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, "Scaling
    Out-of-Distribution Detection for Real-World Settings", ICML 2022).

    Fit: one template per class, the mean softmax of the training samples *predicted* as that
    class (no labels needed): ``d_c = mean_{x: argmax p(x) = c} p(x)``.
    Score: ``min_c KL(p(x) || d_c) = min_c sum_j p_j(x) log(p_j(x) / d_{c,j})`` (the paper's
    direction, as in the official code and OpenOOD). Already higher = more OOD; OpenOOD negates it
    into a confidence.

    The fit is a sum (class sums of softmax vectors and counts, float64), so it streams and merges.
    Classes that no training sample is predicted as have no template and are left out of the
    minimum (with a warning). The nearest template is found with one matrix product; its KL is then
    recomputed element-wise, so the score does not suffer the cancellation of the expanded form.
    Infinite logits give the limit (CONVENTIONS.md): ``p`` uniform over a row's ``+inf`` entries,
    and ``p_j log p_j = 0`` where ``p_j = 0`` (a ``-inf`` logit).
    """

    name = "kl_matching"
    streaming = True
    paper = "Hendrycks et al., ICML 2022"
    learned_state = {"class_sums_": tensor("C", "C", dtype="float64"), "class_counts_": tensor("C", dtype="float64")}

    def __init__(self) -> None:
        pass

    def _reset(self) -> None:
        self._started = True
        self.class_sums_ = None
        self.class_counts_ = None

    def _accumulate(self, batch: Outputs) -> None:
        logits = batch.logits
        _check_finite(logits, "logits", self.name)
        n, c = logits.shape
        if self.class_sums_ is None:
            self.class_sums_ = torch.zeros(c, c, dtype=torch.float64, device=logits.device)
            self.class_counts_ = torch.zeros(c, dtype=torch.float64, device=logits.device)
        elif self.class_sums_.shape[0] != c:
            raise ValueError(f"kl_matching: this batch has {c} classes, earlier batches had {self.class_sums_.shape[0]}")
        for rows in _row_chunks(n, c, torch.float64):
            p = torch.softmax(logits[rows].to(self.class_sums_.device, torch.float64), dim=1)
            pred = p.argmax(dim=1)
            self.class_sums_.index_add_(0, pred, p)
            self.class_counts_ += torch.bincount(pred, minlength=c).to(torch.float64)

    def _merge(self, other: "KLMatching") -> None:
        if self.class_sums_ is None:
            self.class_sums_ = other.class_sums_.clone()
            self.class_counts_ = other.class_counts_.clone()
            return
        if other.class_sums_.shape != self.class_sums_.shape:
            raise ValueError(f"kl_matching: cannot merge fits over {other.class_sums_.shape[0]} and {self.class_sums_.shape[0]} classes")
        self.class_sums_ += other.class_sums_.to(self.class_sums_.device)
        self.class_counts_ += other.class_counts_.to(self.class_counts_.device)

    def _finalize(self) -> None:
        present = self.class_counts_ > 0
        if not bool(present.any()):
            raise ValueError("kl_matching: no training samples were seen")
        warn_unseen_classes(present, "kl_matching: no training sample is predicted as class(es) {classes}; they get no template",
                            stacklevel=4)
        templates = self.class_sums_[present] / self.class_counts_[present, None]
        # A template entry can only be 0 through underflow; keep its log finite.
        self._log_templates = torch.log(templates.clamp_min(torch.finfo(torch.float64).tiny))

    def _validate_state(self) -> None:
        if not bool((self.class_counts_ > 0).any()):
            raise ValueError("class_counts_ has no class with samples")
        self._finalize()

    def _score(self, outputs: Outputs) -> torch.Tensor:
        logits = outputs.logits
        n, c = logits.shape
        log_d = self._log_templates
        if c != log_d.shape[1]:
            raise ValueError(f"kl_matching was fitted on {log_d.shape[1]} classes, these logits have {c}")
        acc = accumulation_dtype(logits.dtype)
        parts = []
        for rows in _row_chunks(n, c, torch.float64):
            log_p = torch.log_softmax(_saturate(logits[rows].to(log_d.device, torch.float64)), dim=1)
            p = log_p.exp()
            nearest = (p.to(acc) @ log_d.to(acc).T).argmax(dim=1)  # max cross term = min KL
            terms = p * (log_p - log_d[nearest])
            kl = torch.where(p == 0, torch.zeros_like(terms), terms).sum(dim=1)  # 0 log 0 = 0 (a -inf logit); NaN stays NaN
            parts.append(kl.clamp_min(0).to(acc))
        out = torch.cat(parts) if parts else torch.empty(0, dtype=acc)
        return out.to(logits.device)


@register
class TemperatureScaling(Detector):
    """Temperature scaling (Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural
    Networks", ICML 2017), used as an OOD score.

    Fit: ``T = argmin_T mean_i [logsumexp(z_i / T) - z_{i, y_i} / T]``, the negative
    log-likelihood of the labelled in-distribution outputs (bounded scalar search on ``log T``,
    ``T`` in [1e-3, 1e3], float64). Score: ``-max_j softmax(z / T)_j`` (the calibrated confidence,
    negated: higher = more OOD).
    """

    name = "temperature_scaling"
    fit_requires = ("labels",)
    paper = "Guo et al., ICML 2017"
    learned_state = {"temperature_": number(positive=True)}

    #: search interval of log T
    LOG_T_BOUNDS = (math.log(1e-3), math.log(1e3))

    def __init__(self) -> None:
        pass

    def _fit(self, outputs: Outputs) -> None:
        from scipy.optimize import minimize_scalar

        logits, labels = outputs.logits, outputs.labels
        _check_finite(logits, "logits", self.name)
        _check_labels(labels, logits.shape[1], self.name)
        z = logits.detach().to("cpu", torch.float64)
        y = labels.to("cpu")
        target = z.gather(1, y[:, None])[:, 0]

        def nll(log_t: float) -> float:
            beta = math.exp(-log_t)
            total = 0.0
            for rows in _row_chunks(z.shape[0], z.shape[1], torch.float64, copies=2):
                total += float((torch.logsumexp(z[rows] * beta, dim=1) - target[rows] * beta).sum())
            return total / z.shape[0]

        lo, hi = self.LOG_T_BOUNDS
        res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
        log_t, best = float(res.x), float(res.fun)
        # A bound that does as well as the interior optimum means the NLL is still decreasing (or
        # numerically flat) there: no finite temperature minimises it.
        if nll(lo) <= best or nll(hi) <= best:
            warnings.warn(
                f"temperature_scaling: the NLL has no interior minimum in T in [1e-3, 1e3] (fitted T = {math.exp(log_t):.4g}): "
                "perfectly separated training logits push T to 0, labels that the logits do not predict push it up; "
                "the scores may saturate",
                RuntimeWarning,
                stacklevel=3,
            )
        self.temperature_ = math.exp(log_t)

    def _score(self, outputs: Outputs) -> torch.Tensor:
        return scores.msp(outputs.logits, self.temperature_)

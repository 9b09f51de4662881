"""LogitNormLoss against the paper's formula in float64 (numpy / scipy), and its use in training."""

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

from ebood.train import LogitNormLoss, LossParts, finetune, make_loss, train_classifier


def _reference(logits: np.ndarray, labels: np.ndarray, tau: float) -> float:
    """Wei et al. (ICML 2022), eq. 5: CE(f / (tau * ||f||), y), with the official code's 1e-7."""
    z = logits / (tau * (np.sqrt((logits ** 2).sum(axis=1, keepdims=True)) + 1e-7))
    return float(-log_softmax(z, axis=1)[np.arange(len(labels)), labels].mean())


@pytest.mark.parametrize("tau", [0.01, 0.04, 1.0])
def test_logitnorm_matches_float64_formula(tau):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=5.0, size=(64, 10))
    labels = rng.integers(0, 10, size=64)
    parts = LogitNormLoss(tau)(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
    assert isinstance(parts, LossParts)
    ref = _reference(logits, labels, tau)
    assert parts.total.item() == pytest.approx(ref, rel=1e-5)
    assert parts.ce.item() == pytest.approx(ref, rel=1e-5)
    assert parts.in_term.item() == 0.0 and parts.out_term.item() == 0.0


def test_logitnorm_is_invariant_to_logit_scale_and_ignores_outliers():
    # Only the direction of the logits matters: scaling them by 7 changes nothing.
    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.normal(size=(8, 3)))
    labels = torch.tensor(rng.integers(0, 3, size=8))
    loss = LogitNormLoss(0.1)
    a = loss(logits, labels).total
    b = loss(7 * logits, labels, torch.zeros(4, 3)).total
    assert a.item() == pytest.approx(b.item(), rel=1e-6)  # up to the 1e-7 guard


def test_logitnorm_gradient_matches_finite_differences():
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0])
    assert torch.autograd.gradcheck(lambda z: LogitNormLoss(0.5)(z, labels).total, (logits,))


@pytest.mark.parametrize("bad, match", [(0.0, "tau"), (-1.0, "tau"), (float("nan"), "tau")])
def test_logitnorm_rejects_bad_tau(bad, match):
    with pytest.raises(ValueError, match=match):
        LogitNormLoss(bad)


def test_logitnorm_rejects_bad_inputs():
    loss = LogitNormLoss()
    with pytest.raises(ValueError, match="labels must be class indices"):
        loss(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels must have shape"):
        loss(torch.zeros(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="logits"):
        loss(torch.zeros(3), torch.tensor([0, 1, 2]))


def _toy(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return x, y


def test_train_classifier_and_finetune_with_logitnorm(one_thread):
    x, y = _toy()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    loss = LogitNormLoss(0.1)
    with torch.no_grad():
        before = loss(model(x), y).total.item()
    history = []
    train_classifier(model, (x, y), epochs=15, lr=1e-2, optimizer="adam", batch_size=32, loss=loss, progress=False,
                     on_epoch=history.append)
    with torch.no_grad():
        after = loss(model(x), y).total.item()
    assert after < before - 0.1
    assert history[-1].ce == pytest.approx(history[-1].loss)
    # fine-tuning needs no outliers for LogitNorm, and the loss is made by name as well
    finetune(model, (x, y), None, make_loss("logitnorm", tau=0.1), epochs=1, id_batch_size=32, progress=False)
    with pytest.raises(ValueError, match="needs auxiliary outliers"):
        finetune(model, (x, y), None, "energy", epochs=1, progress=False)

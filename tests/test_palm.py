"""PALM: one loss step against a float64 numpy re-implementation of the paper's equations; training
on toy data; OOD scoring of the learned features with the existing knn / mahalanobis detectors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp

from ebood import Outputs, extract
from ebood.detectors import create
from ebood.metrics import auroc
from ebood.train import PALMLoss, ProjectionHead, train_palm


def _sinkhorn_ref(scores, eps, iters):
    """Eq. 4 / SwAV: Q = exp(S / eps)^T normalised to total 1, rows -> 1/P, columns -> 1/B; returns B Q^T."""
    q = np.exp(scores / eps).T
    q /= q.sum()
    p, b = q.shape
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= p
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def _top_k_mask(w, k):
    m = np.zeros_like(w)
    idx = np.argsort(-w, axis=1, kind="stable")[:, :k]
    np.put_along_axis(m, idx, 1.0, axis=1)
    return m


def _palm_ref(z, y, protos, proto_labels, *, proto_m, temp, lam, k, eps, iters=3):
    """One PALM step in float64: assignment, EMA update, MLE and prototype contrastive losses."""
    own = (y[:, None] == proto_labels[None, :]).astype(float)
    w = own * _sinkhorn_ref(z @ protos.T, eps, iters)
    if k:
        w = w * _top_k_mask(w, k)
    w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
    w = w / np.maximum(w.sum(axis=0, keepdims=True), 1e-12)
    moved = proto_m * protos + (1 - proto_m) * w.T @ z
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    a = own * _sinkhorn_ref(z @ moved.T, eps, iters)
    if k:
        a = a * _top_k_mask(w, k)
    a = a / a.sum(axis=1, keepdims=True)
    logits = z @ moved.T / temp
    mle = -np.mean((a * logits).sum(axis=1) - logsumexp(logits, axis=1))
    s = moved @ moved.T / 0.5
    p = len(moved)
    losses = []
    for j in range(p):
        same = [l for l in range(p) if l != j and proto_labels[l] == proto_labels[j]]
        others = [l for l in range(p) if l != j]
        losses.append(np.mean(s[j, same]) - logsumexp(s[j, others]))
    pcon = -np.mean(losses)
    return mle + lam * pcon, mle, pcon, moved


@pytest.mark.parametrize("k", [0, 2])
def test_one_palm_step_matches_float64_reference(k):
    rng = np.random.default_rng(0)
    classes, views, batch, dim = 3, 2, 10, 8
    loss = PALMLoss(classes, cache_size=3, proto_m=0.9, temp=0.1, lambda_pcon=1.0, k=k, feat_dim=dim, epsilon=0.05).double()
    protos0 = loss.prototypes.clone().numpy()
    feats = F.normalize(torch.tensor(rng.normal(size=(batch, views, dim))), dim=-1)
    labels = torch.tensor(rng.integers(0, classes, size=batch))
    parts = loss(feats, labels)
    z = torch.cat(torch.unbind(feats, dim=1)).numpy()  # view-major, as the official code
    total, mle, pcon, moved = _palm_ref(z, np.tile(labels.numpy(), views), protos0, loss.prototype_labels.numpy(),
                                        proto_m=0.9, temp=0.1, lam=1.0, k=k, eps=0.05)
    assert parts.mle.item() == pytest.approx(mle, rel=1e-9)
    assert parts.proto_contra.item() == pytest.approx(pcon, rel=1e-9)
    assert parts.total.item() == pytest.approx(total, rel=1e-9)
    np.testing.assert_allclose(loss.prototypes.numpy(), moved, rtol=1e-9, atol=1e-12)


def test_palm_defaults_are_the_official_codes():
    loss = PALMLoss(10)
    assert (loss.cache_size, loss.k, loss.proto_m, loss.temp, loss.lambda_pcon, loss.epsilon, loss.feat_dim) == (6, 5, 0.999, 0.1, 1.0, 0.05, 128)
    assert loss.prototypes.shape == (60, 128)
    torch.testing.assert_close(loss.prototypes.norm(dim=1), torch.ones(60))
    assert loss.prototype_labels.tolist() == list(range(10)) * 6


def test_palm_errors():
    loss = PALMLoss(3, feat_dim=4)
    with pytest.raises(ValueError, match="dimension"):
        loss(torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be in"):
        loss(F.normalize(torch.ones(2, 4), dim=1), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="proto_m"):
        PALMLoss(3, proto_m=1.0)


def _clusters(n, seed, centres):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % len(centres)
    return centres[y] + 0.4 * torch.randn(n, centres.shape[1], generator=g), y


def test_train_palm_then_knn_and_mahalanobis_score_ood(one_thread):
    centres = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [-3.0, 0, 0, 0]])
    x, y = _clusters(300, 0, centres)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    history = []
    train_palm(model, (x, y), loss=PALMLoss(3, cache_size=3, k=2, feat_dim=16, proto_m=0.9), epochs=15, lr=1e-2, optimizer="adam",
               batch_size=64, progress=False, on_epoch=history.append)
    assert history[-1].loss < history[0].loss
    xt, yt = _clusters(150, 1, centres)
    xo, _ = _clusters(150, 2, torch.tensor([[0, 0, 4.0, 0], [0, 0, 0, 4.0], [0, -3.0, 0, 0]]))
    train, test, ood = (extract(model, (a, b), progress=False) for a, b in ((x, y), (xt, yt), (xo, torch.zeros(150, dtype=torch.long))))
    assert float((test.logits.argmax(1) == yt).float().mean()) > 0.9  # the fitted classifier head
    for name in ("knn", "mahalanobis"):
        det = create(name, **({"k": 10} if name == "knn" else {})).fit(train)
        assert float(auroc(det.score(test), det.score(ood))) > 0.9, name


def test_projection_head_is_normalised():
    h = ProjectionHead(6, 3)(torch.randn(5, 6))
    torch.testing.assert_close(h.norm(dim=1), torch.ones(5))

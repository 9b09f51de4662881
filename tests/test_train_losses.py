"""EnergyBoundedLoss and OutlierExposureLoss against hand-worked values, float64 formulas and gradcheck."""

import math

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, logsumexp

from ebood.train import EnergyBoundedLoss, LossParts, OutlierExposureLoss


def t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


# ---------- hand-worked values (2 classes) ----------

def test_energy_loss_hand_worked_both_margins_active():
    # ID logits (log 3, 0): softmax (3/4, 1/4); E = -log(3 + 1) = -log 4; CE(label 0) = log(4/3).
    # Outlier logits (0, 0): E = -log 2.
    # m_in = -3: E_in - m_in = 3 - log 4 > 0, active.   m_out = 1: m_out - E_out = 1 + log 2 > 0, active.
    loss = EnergyBoundedLoss(m_in=-3.0, m_out=1.0, weight=0.1)
    parts = loss(t([[math.log(3), 0.0]]), torch.tensor([0]), t([[0.0, 0.0]]))
    assert isinstance(parts, LossParts)
    ce = math.log(4 / 3)
    in_term = (3 - math.log(4)) ** 2
    out_term = (1 + math.log(2)) ** 2
    assert parts.ce.item() == pytest.approx(ce, abs=1e-12)
    assert parts.in_term.item() == pytest.approx(in_term, abs=1e-12)
    assert parts.out_term.item() == pytest.approx(out_term, abs=1e-12)
    assert parts.total.item() == pytest.approx(ce + 0.1 * (in_term + out_term), abs=1e-12)


def test_energy_loss_margins_inactive_give_pure_cross_entropy():
    # ID logits (10, 10): E = -(10 + log 2) ~ -10.69 < m_in = -3 -> no in-term.
    # Outlier logits (-10, -10): E = 10 - log 2 ~ 9.31 > m_out = 1 -> no out-term.
    loss = EnergyBoundedLoss(m_in=-3.0, m_out=1.0, weight=0.1)
    parts = loss(t([[10.0, 10.0]]), torch.tensor([1]), t([[-10.0, -10.0]]))
    assert parts.in_term.item() == 0.0
    assert parts.out_term.item() == 0.0
    assert parts.total.item() == pytest.approx(math.log(2), abs=1e-12)


def test_energy_loss_hinge_is_averaged_over_the_whole_batch():
    # Two ID rows: (0, 0) has E = -log 2, active against m_in = -1 by (1 - log 2); (10, 10) inactive.
    # Two outlier rows: (0, 0) active against m_out = 0 by log 2; (-10, -10) inactive.
    loss = EnergyBoundedLoss(m_in=-1.0, m_out=0.0, weight=1.0)
    parts = loss(t([[0.0, 0.0], [10.0, 10.0]]), torch.tensor([0, 1]), t([[0.0, 0.0], [-10.0, -10.0]]))
    assert parts.in_term.item() == pytest.approx((1 - math.log(2)) ** 2 / 2, abs=1e-12)
    assert parts.out_term.item() == pytest.approx(math.log(2) ** 2 / 2, abs=1e-12)
    assert parts.ce.item() == pytest.approx(math.log(2), abs=1e-12)


def test_energy_loss_temperature():
    # T = 2, logits (2, 0): E = -2 log(e^1 + e^0) = -2 log(1 + e).
    loss = EnergyBoundedLoss(m_in=-10.0, m_out=0.0, weight=1.0, temperature=2.0)
    parts = loss(t([[2.0, 0.0]]), torch.tensor([0]), t([[2.0, 0.0]]))
    e = -2 * math.log(1 + math.e)
    assert parts.in_term.item() == pytest.approx((e + 10) ** 2, abs=1e-12)
    assert parts.out_term.item() == pytest.approx(e**2, abs=1e-12)


def test_oe_loss_hand_worked():
    # Outlier logits (log 3, 0): softmax (3/4, 1/4); cross-entropy from uniform:
    # -(1/2)(log 3/4 + log 1/4) = (1/2) log(16/3).  ID logits (0, 0), label 1: CE = log 2.
    loss = OutlierExposureLoss(weight=0.5)
    parts = loss(t([[0.0, 0.0]]), torch.tensor([1]), t([[math.log(3), 0.0]]))
    out_term = 0.5 * math.log(16 / 3)
    assert parts.out_term.item() == pytest.approx(out_term, abs=1e-12)
    assert parts.in_term.item() == 0.0
    assert parts.ce.item() == pytest.approx(math.log(2), abs=1e-12)
    assert parts.total.item() == pytest.approx(math.log(2) + 0.5 * out_term, abs=1e-12)


def test_oe_out_term_is_log_c_for_uniform_softmax_and_larger_otherwise():
    loss = OutlierExposureLoss()
    c = 7
    flat = loss(t([[0.0] * c]), torch.tensor([0]), torch.full((3, c), 4.2, dtype=torch.float64))
    assert flat.out_term.item() == pytest.approx(math.log(c), abs=1e-12)
    peaked = loss(t([[0.0] * c]), torch.tensor([0]), t([[5.0] + [0.0] * (c - 1)]))
    assert peaked.out_term.item() > math.log(c)


# ---------- float64 re-computation with an independent formula ----------

def _reference(in_logits, labels, out_logits, m_in, m_out, weight, temperature):
    z_in, z_out = in_logits.numpy(), out_logits.numpy()
    ce = -np.mean(log_softmax(z_in, axis=1)[np.arange(len(labels)), labels.numpy()])
    e_in = -temperature * logsumexp(z_in / temperature, axis=1)
    e_out = -temperature * logsumexp(z_out / temperature, axis=1)
    in_term = np.mean(np.maximum(e_in - m_in, 0) ** 2)
    out_term = np.mean(np.maximum(m_out - e_out, 0) ** 2)
    uniform_ce = np.mean(-np.mean(log_softmax(z_out, axis=1), axis=1))
    return ce, in_term, out_term, uniform_ce


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_against_float64_reference(temperature):
    g = torch.Generator().manual_seed(0)
    in_logits = torch.randn(9, 6, generator=g, dtype=torch.float64) * 4
    out_logits = torch.randn(13, 6, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 6, (9,), generator=g)
    m_in, m_out = -5.0, -1.0  # chosen so that some rows are on each side of each margin
    ce, in_term, out_term, uniform_ce = _reference(in_logits, labels, out_logits, m_in, m_out, 0.1, temperature)
    assert 0 < in_term and 0 < out_term
    parts = EnergyBoundedLoss(m_in, m_out, 0.1, temperature)(in_logits, labels, out_logits)
    np.testing.assert_allclose([parts.ce.item(), parts.in_term.item(), parts.out_term.item()],
                               [ce, in_term, out_term], rtol=1e-12)
    assert parts.total.item() == pytest.approx(ce + 0.1 * (in_term + out_term), rel=1e-12)
    oe = OutlierExposureLoss(0.5)(in_logits, labels, out_logits)
    assert oe.out_term.item() == pytest.approx(uniform_ce, rel=1e-12)
    assert oe.total.item() == pytest.approx(ce + 0.5 * uniform_ce, rel=1e-12)
    # float32 input agrees to float32 precision
    p32 = EnergyBoundedLoss(m_in, m_out, 0.1, temperature)(in_logits.float(), labels, out_logits.float())
    assert p32.total.dtype == torch.float32
    assert p32.total.item() == pytest.approx(parts.total.item(), rel=1e-5)


def test_large_logits_stay_finite():
    big = t([[1000.0, -1000.0], [800.0, 800.0]])
    parts = EnergyBoundedLoss()(big, torch.tensor([0, 1]), big)
    assert all(torch.isfinite(p) for p in parts)
    # energies -1000 and -(800 + log 2): far below m_in = -25 (no in-term) and m_out = -7 (large out-term)
    assert parts.in_term.item() == 0.0
    expected = ((1000 - 7) ** 2 + (800 + math.log(2) - 7) ** 2) / 2
    assert parts.out_term.item() == pytest.approx(expected, rel=1e-12)


# ---------- gradients ----------

def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    in_logits = (torch.randn(5, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    out_logits = (torch.randn(6, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, 4, (5,), generator=g)
    return in_logits, labels, out_logits


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradcheck_energy_loss(temperature):
    in_logits, labels, out_logits = _inputs(1)
    loss = EnergyBoundedLoss(m_in=-3.0, m_out=0.0, weight=0.1, temperature=temperature)
    # keep every energy clear of its margin so the finite differences do not straddle a hinge kink
    with torch.no_grad():
        e_in = -temperature * torch.logsumexp(in_logits / temperature, 1)
        e_out = -temperature * torch.logsumexp(out_logits / temperature, 1)
    assert (e_in + 3.0).abs().min() > 1e-3 and e_out.abs().min() > 1e-3
    assert torch.autograd.gradcheck(lambda a, b: tuple(loss(a, labels, b)), (in_logits, out_logits))


def test_gradcheck_oe_loss():
    in_logits, labels, out_logits = _inputs(2)
    loss = OutlierExposureLoss(0.5)

    def parts(a, b):
        p = loss(a, labels, b)
        return p.total, p.ce, p.out_term  # in_term is the constant 0

    assert torch.autograd.gradcheck(parts, (in_logits, out_logits))


def test_energy_gradient_matches_closed_form():
    # d total / d z_in = (softmax - onehot) / N + w * 2 relu(E - m_in) * (-softmax) / N
    # d total / d z_out = w * 2 relu(m_out - E) * softmax / M          (T = 1)
    in_logits, labels, out_logits = _inputs(3)
    w, m_in, m_out = 0.3, -4.0, 1.0
    EnergyBoundedLoss(m_in, m_out, w)(in_logits, labels, out_logits).total.backward()
    z_in, z_out = in_logits.detach().numpy(), out_logits.detach().numpy()
    p_in, p_out = np.exp(log_softmax(z_in, 1)), np.exp(log_softmax(z_out, 1))
    onehot = np.eye(4)[labels.numpy()]
    hinge_in = np.maximum(-logsumexp(z_in, 1) - m_in, 0)[:, None]
    hinge_out = np.maximum(m_out + logsumexp(z_out, 1), 0)[:, None]
    g_in = (p_in - onehot) / 5 - w * 2 * hinge_in * p_in / 5
    g_out = w * 2 * hinge_out * p_out / 6
    np.testing.assert_allclose(in_logits.grad.numpy(), g_in, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out_logits.grad.numpy(), g_out, rtol=1e-10, atol=1e-12)


# ---------- argument validation ----------

@pytest.mark.parametrize("kwargs, match", [
    ({"weight": -0.1}, "weight"),
    ({"weight": float("nan")}, "weight"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"m_in": float("nan")}, "m_in"),
    ({"m_out": float("inf")}, "m_out"),
])
def test_energy_loss_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnergyBoundedLoss(**kwargs)


def test_oe_rejects_negative_weight():
    with pytest.raises(ValueError, match="weight"):
        OutlierExposureLoss(weight=-1)


@pytest.mark.parametrize("loss", [EnergyBoundedLoss(), OutlierExposureLoss()], ids=["energy", "oe"])
@pytest.mark.parametrize("in_logits, labels, out_logits, error, match", [
    (torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.zeros(2, 4), ValueError, r"in_logits must have shape"),
    (torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.zeros(2, 5), ValueError, "same number of classes"),
    (torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4), ValueError, r"labels must have shape \(3,\)"),
    (torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, 4), TypeError, "integer"),
    (torch.zeros(3, 4), torch.tensor([0, -1, 2]), torch.zeros(2, 4), ValueError, "found -1"),
    (torch.zeros(3, 4), torch.tensor([0, 4, 2]), torch.zeros(2, 4), ValueError, "found 4"),
    (torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), torch.zeros(0, 4), ValueError, "out_logits is empty"),
    (torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long), torch.zeros(2, 4), TypeError, "floating"),
])
def test_bad_inputs_raise_clear_errors(loss, in_logits, labels, out_logits, error, match):
    with pytest.raises(error, match=match):
        loss(in_logits, labels, out_logits)

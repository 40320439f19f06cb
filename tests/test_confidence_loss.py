"""Confidence-driven loss, paper Eq. 1: L = |y - x|_1 + lam * (C * e^2 - eta * log C), e^2 = channel-mean sq. error."""
import math

import pytest
import torch
from basicsr.losses import build_loss

import patchscaler  # noqa: F401  (registration; conftest.py imports it before BasicSR)
from patchscaler.losses.confidence_loss import ConfidenceLoss
from patchscaler.utils.errors import ConfigError


def _example(seed=0, b=2, c=3, h=4, w=5):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    target = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    conf = torch.rand(b, 1, h, w, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return pred, target, conf


def _by_hand(pred, target, conf, lam, eta):
    """Eq. 1 with explicit loops over positions (independent of the implementation's vectorisation)."""
    b, c, h, w = pred.shape
    l1_sum, conf_map = 0.0, torch.zeros(b, 1, h, w, dtype=torch.float64)
    l1_map = torch.zeros(b, 1, h, w, dtype=torch.float64)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                d = [float(pred[i, k, y, x] - target[i, k, y, x]) for k in range(c)]
                e2 = sum(v * v for v in d) / c
                cc = float(conf[i, 0, y, x])
                term = cc * e2 - eta * math.log(cc)
                conf_map[i, 0, y, x] = term
                l1_map[i, 0, y, x] = sum(abs(v) for v in d) / c
                l1_sum += sum(abs(v) for v in d)
    n_pos = b * h * w
    return {'mean': l1_sum / (n_pos * c) + lam * float(conf_map.sum()) / n_pos,
            'sum': l1_sum + lam * float(conf_map.sum()),
            'none': l1_map + lam * conf_map}


@pytest.mark.parametrize('lam,eta,weight', [(1.0, 1e-2, 1.0), (0.5, 0.3, 2.0), (0.0, 1.0, 1.0)])
@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_matches_eq1(reduction, lam, eta, weight):
    pred, target, conf = _example()
    loss_fn = ConfidenceLoss(lam=lam, eta=eta, loss_weight=weight, reduction=reduction)
    got = loss_fn(pred, target, conf)
    expected = _by_hand(pred, target, conf, lam, eta)[reduction]
    if reduction == 'none':
        assert got.shape == (2, 1, 4, 5)
        assert torch.allclose(got, weight * expected, rtol=1e-10, atol=1e-12)
        # 'none' averages back to 'mean'
        mean = ConfidenceLoss(lam=lam, eta=eta, loss_weight=weight)(pred, target, conf)
        assert torch.allclose(got.mean(), mean, rtol=1e-10)
    else:
        assert got.dim() == 0
        assert float(got) == pytest.approx(weight * expected, rel=1e-10)


def test_single_position_value():
    # one position, two channels: errors 0.3 and -0.1 -> L1 mean 0.2, e^2 = (0.09 + 0.01) / 2 = 0.05
    pred = torch.tensor([[[[0.3]], [[-0.1]]]], dtype=torch.float64)
    target = torch.zeros_like(pred)
    conf = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64)
    loss = ConfidenceLoss(lam=2.0, eta=0.1)(pred, target, conf)
    assert float(loss) == pytest.approx(0.2 + 2.0 * (0.5 * 0.05 - 0.1 * math.log(0.5)), rel=1e-12)


def test_built_from_basicsr_registry():
    loss_fn = build_loss(dict(type='ConfidenceLoss', lam=0.5, eta=0.2, reduction='sum'))
    assert isinstance(loss_fn, ConfidenceLoss)
    assert (loss_fn.lam, loss_fn.eta, loss_fn.reduction) == (0.5, 0.2, 'sum')


@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_finite_at_extreme_confidence(reduction):
    pred = torch.randn(1, 4, 1, 3, requires_grad=True)
    target = torch.randn(1, 4, 1, 3)
    conf = torch.tensor([0.0, 1e-30, 1.0]).view(1, 1, 1, 3).requires_grad_(True)
    loss = ConfidenceLoss(reduction=reduction)(pred, target, conf)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.isfinite(conf.grad).all()
    # clamped positions (C below eps) get no gradient into C
    assert conf.grad.view(-1)[0] == 0 and conf.grad.view(-1)[1] == 0


def test_finite_at_zero_error_and_zero_confidence():
    pred = torch.zeros(1, 2, 2, 2, requires_grad=True)
    conf = torch.zeros(1, 1, 2, 2, requires_grad=True)
    loss = ConfidenceLoss()(pred, torch.zeros(1, 2, 2, 2), conf)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all() and torch.isfinite(conf.grad).all()
    # -eta * log(eps) with eps = 1e-6
    assert float(loss.detach()) == pytest.approx(-1e-2 * math.log(1e-6), rel=1e-5)


def _loss_of_confidence(c, sq_err, eta, lam=1.0):
    """ConfidenceLoss as a function of a scalar confidence for a fixed error with channel-mean e^2 = sq_err."""
    err = math.sqrt(sq_err)
    pred = torch.tensor([err, -err], dtype=torch.float64).view(1, 2, 1, 1)  # e^2 = sq_err in both channels
    return ConfidenceLoss(lam=lam, eta=eta)(pred, torch.zeros_like(pred), c.view(1, 1, 1, 1))


@pytest.mark.parametrize('sq_err,eta', [(0.04, 1e-2), (0.5, 0.1), (2.0, 0.3), (1e-3, 1e-2), (0.05, 0.05)])
def test_learned_confidence_reaches_optimum(sq_err, eta):
    """Gradient descent on a free C = sigmoid(logit) for a fixed error ends at C* = min(eta / e^2, 1)."""
    logit = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logit], lr=0.1)
    for _ in range(400):
        opt.zero_grad()
        _loss_of_confidence(torch.sigmoid(logit), sq_err, eta).backward()
        opt.step()
    c_learned = float(torch.sigmoid(logit.detach()))
    expected = min(eta / sq_err, 1.0)
    c_star = float(ConfidenceLoss.optimal_confidence(torch.tensor(sq_err, dtype=torch.float64), eta))
    assert c_star == pytest.approx(expected, rel=1e-12)
    if eta / sq_err < 1:
        assert c_learned == pytest.approx(expected, rel=2e-2)
    else:  # C saturates at 1 when the error is below sqrt(eta)
        assert c_learned > 0.97


@pytest.mark.parametrize('sq_err,eta', [(0.04, 1e-2), (2.0, 0.3)])
def test_gradient_zero_at_optimum_and_signs(sq_err, eta):
    c_star = eta / sq_err
    grads = {}
    for name, c in (('below', 0.5 * c_star), ('at', c_star), ('above', min(1.0, 1.5 * c_star))):
        cc = torch.tensor(c, dtype=torch.float64, requires_grad=True)
        _loss_of_confidence(cc, sq_err, eta).backward()
        grads[name] = float(cc.grad)
        # analytic d/dC (C e^2 - eta log C) = e^2 - eta / C
        assert grads[name] == pytest.approx(sq_err - eta / c, rel=1e-9, abs=1e-12)
    assert abs(grads['at']) < 1e-12
    assert grads['below'] < 0 < grads['above']


def test_gradient_negative_up_to_one_when_error_small():
    # e^2 < eta: the loss decreases all the way to C = 1 (the clip)
    sq_err, eta = 1e-3, 1e-2
    for c in (0.1, 0.5, 0.99, 0.999999):
        cc = torch.tensor(c, dtype=torch.float64, requires_grad=True)
        _loss_of_confidence(cc, sq_err, eta).backward()
        assert float(cc.grad) < 0


def test_optimal_confidence_tensor():
    sq_err = torch.tensor([0.0, 1e-4, 0.01, 0.02, 1.0, 100.0])
    c = ConfidenceLoss.optimal_confidence(sq_err, 0.01)
    expected = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.01, 1e-4])
    assert torch.allclose(c, expected, rtol=1e-6)
    assert torch.isfinite(c).all() and (c > 0).all() and (c <= 1).all()


def test_optimal_confidence_is_minimiser_on_grid():
    eta = 0.05
    grid = torch.linspace(1e-3, 1.0, 20001, dtype=torch.float64)
    for sq_err in (0.02, 0.1, 0.5, 3.0):
        values = grid * sq_err - eta * torch.log(grid)
        c_grid = float(grid[values.argmin()])
        c_star = float(ConfidenceLoss.optimal_confidence(torch.tensor(sq_err, dtype=torch.float64), eta))
        assert c_grid == pytest.approx(c_star, abs=1e-3)


@pytest.mark.parametrize('kwargs', [dict(reduction='avg'), dict(reduction=None), dict(eta=0.0), dict(eta=-1.0),
                                    dict(lam=-0.1)])
def test_invalid_options(kwargs):
    with pytest.raises(ConfigError):
        ConfidenceLoss(**kwargs)


@pytest.mark.parametrize('conf_shape', [(2, 3, 4, 5), (2, 1, 4, 4), (2, 4, 5), (2, 1, 5, 4)])
def test_wrong_confidence_shape(conf_shape):
    pred, target, _ = _example()
    with pytest.raises(ValueError, match='confidence must be'):
        ConfidenceLoss()(pred, target, torch.rand(*conf_shape, dtype=torch.float64))

"""Global Restoration Module: shapes for any latent size, zero-init residual, confidence in (0, 1]."""
import copy

import pytest
import torch
from basicsr.archs import build_network

import patchscaler  # noqa: F401  (registration; conftest.py imports it before BasicSR)
from patchscaler.archs.grm_arch import GRM
from patchscaler.utils.errors import ConfigError

SIZES = [(5, 7), (13, 9), (1, 1), (33, 17)]


@pytest.fixture(scope='module')
def demo_grm():
    import yaml
    from conftest import DEMO_YML
    with open(DEMO_YML) as f:
        opt = yaml.safe_load(f)['network_grm']
    torch.manual_seed(0)
    net = build_network(copy.deepcopy(opt))
    return net, opt


@pytest.fixture(scope='module')
def rrdb_grm():
    torch.manual_seed(0)
    return build_network(dict(type='GRM', in_channels=4, num_feat=8, body='rrdb', num_blocks=1, num_grow_ch=4))


def _check_output(net, y_lr):
    y_hr, conf = net(y_lr)
    b, _, h, w = y_lr.shape
    assert y_hr.shape == y_lr.shape
    assert conf.shape == (b, 1, h, w)
    assert torch.isfinite(y_hr).all() and torch.isfinite(conf).all()
    assert conf.min() > 0 and conf.max() <= 1
    assert conf.min() >= net.conf_eps
    # zero-initialised last conv of the residual head: an untrained GRM returns y_LR
    assert torch.equal(y_hr, y_lr)
    return y_hr, conf


def test_demo_grm_built_from_yaml(demo_grm):
    net, opt = demo_grm
    assert isinstance(net, GRM)
    assert net.conv_first.in_channels == opt['in_channels'] == 48
    assert net.conv_first.out_channels == opt['num_feat']
    assert len(net.body.blocks) == opt['num_blocks']
    assert net.body.window_size == opt['window_size']


@pytest.mark.parametrize('hw', SIZES + [(32, 32)])
def test_demo_grm_any_size(demo_grm, hw):
    net, opt = demo_grm
    torch.manual_seed(1)
    with torch.no_grad():
        batch = 2 if hw[0] * hw[1] < 256 else 1  # keep the big Swin runs cheap on CPU
        _check_output(net, torch.randn(batch, opt['in_channels'], *hw))


@pytest.mark.parametrize('hw', SIZES)
def test_rrdb_grm_any_size(rrdb_grm, hw):
    torch.manual_seed(2)
    with torch.no_grad():
        _check_output(rrdb_grm, torch.randn(2, 4, *hw))


def test_residual_head_zero_init(rrdb_grm, demo_grm):
    for net in (rrdb_grm, demo_grm[0]):
        last = net.residual_head[-1]
        assert torch.count_nonzero(last.weight) == 0
        assert torch.count_nonzero(last.bias) == 0


@pytest.mark.parametrize('body', ['rrdb', 'swin'])
def test_gradients_flow(body):
    torch.manual_seed(3)
    kwargs = dict(num_blocks=1, num_grow_ch=4) if body == 'rrdb' else dict(
        num_blocks=1, depth=2, num_heads=2, window_size=4, img_size=8)
    net = GRM(in_channels=4, num_feat=8, body=body, **kwargs)
    y_lr = torch.randn(1, 4, 7, 5, requires_grad=True)
    y_hr, conf = net(y_lr)
    (y_hr.square().mean() + conf.mean()).backward()
    assert y_lr.grad is not None and torch.isfinite(y_lr.grad).all() and y_lr.grad.abs().sum() > 0
    # the zero-initialised head still gets a gradient (so training can move it away from identity)
    assert net.residual_head[-1].weight.grad.abs().sum() > 0
    assert net.conv_first.weight.grad.abs().sum() > 0
    assert net.confidence_head[-1].weight.grad.abs().sum() > 0
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    # after one optimiser step the residual is no longer zero
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    with torch.no_grad():
        y_hr2, _ = net(y_lr)
    assert not torch.equal(y_hr2, y_lr)


def test_confidence_clamped_when_sigmoid_underflows():
    net = GRM(in_channels=4, num_feat=8, body='rrdb', num_blocks=1, num_grow_ch=4, conf_eps=1e-4)
    with torch.no_grad():
        net.confidence_head[-1].weight.zero_()
        net.confidence_head[-1].bias.fill_(-1000.0)  # sigmoid(-1000) == 0 in float32
        _, conf = net(torch.randn(1, 4, 3, 3))
        assert torch.all(conf == 1e-4)
        net.confidence_head[-1].bias.fill_(1000.0)
        _, conf = net(torch.randn(1, 4, 3, 3))
        assert torch.all(conf == 1.0)


def test_unknown_body():
    with pytest.raises(ConfigError, match="body must be 'swin' or 'rrdb'"):
        GRM(in_channels=4, num_feat=8, body='unet')
    with pytest.raises(ConfigError, match='unet'):
        build_network(dict(type='GRM', in_channels=4, num_feat=8, body='unet'))


def test_heads_must_divide_features():
    with pytest.raises(ConfigError, match='divisible by num_heads'):
        GRM(in_channels=4, num_feat=10, body='swin', num_heads=4)

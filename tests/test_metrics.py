"""The paper's metrics offline: pyiqa networks from a local folder, never a download, and the per-set table.

Real weights cannot be had here, so the "weights present" tests write files of the right names and layout with
random values (tiny CLIP, fp16 AlexNet/MUSIQ) and check the plumbing and the numerics that do not depend on the
values: the same score as pyiqa's own network on the RGB tensor, LPIPS(x, x) = 0. The network is off for all
of them (a socket connect fails the test).
"""
import socket

import numpy as np
import pytest
import torch
from basicsr.metrics import calculate_metric
from basicsr.utils.registry import METRIC_REGISTRY

import patchscaler  # noqa: F401  (registers the metrics)
from patchscaler.metrics import MetricTable, MetricUnavailable, build_metric, iqa, needs_reference


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('a metric tried to use the network')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)


def _img(seed, h=96, w=112):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _tiny_clip_archive(path):
    """A TorchScript archive with the state-dict keys of a tiny CLIP ResNet (what ``clip.load`` reads from RN50.pt:
    it rebuilds the model from the shapes)."""
    from pyiqa.archs.clip_model import CLIP
    clip = CLIP(embed_dim=64, image_resolution=224, vision_layers=(1, 1, 1, 1), vision_width=16,
                vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=64,
                transformer_heads=1, transformer_layers=1)

    class Holder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in clip.state_dict().items():
        *parents, leaf = key.split('.')
        module = root
        for p in parents:
            if not hasattr(module, p):
                module.add_module(p, Holder())
            module = getattr(module, p)
        module.register_buffer(leaf, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """A weights folder with random-valued files for LPIPS, MUSIQ and CLIPIQA (not ManIQA: a ViT-B/8)."""
    import torchvision
    from pyiqa.archs.lpips_arch import LPIPS
    from pyiqa.archs.musiq_arch import MUSIQ
    folder = tmp_path_factory.mktemp('pyiqa')
    torch.manual_seed(0)
    torch.save({k: v.half() for k, v in torchvision.models.alexnet().state_dict().items()},
               folder / 'alexnet-owt-7be5be79.pth')
    with iqa._Offline('lpips', str(folder))():
        lpips = LPIPS(pretrained=False, net='alex', version='0.1')
    torch.save({k: torch.rand_like(v) for k, v in lpips.state_dict().items() if k.startswith('lin')},
               folder / 'LPIPS_v0.1_alex-df73285e.pth')
    torch.save({k: v.half() for k, v in MUSIQ(pretrained=False, num_class=1).state_dict().items()},
               folder / 'musiq_koniq_ckpt-e95806b9.pth')
    _tiny_clip_archive(folder / 'RN50.pt')
    return folder


def test_registered_and_reference_kinds():
    for name in ('calculate_maniqa', 'calculate_clipiqa', 'calculate_musiq', 'calculate_lpips', 'calculate_pyiqa',
                 'calculate_niqe', 'calculate_psnr', 'calculate_ssim'):
        assert name in METRIC_REGISTRY
    assert not needs_reference({'type': 'calculate_musiq'}) and not needs_reference({'type': 'calculate_niqe'})
    assert needs_reference({'type': 'calculate_lpips'}) and needs_reference({'type': 'calculate_psnr'})
    assert not needs_reference({'type': 'calculate_pyiqa', 'metric': 'clipiqa'})
    # any other pyiqa metric: its mode and direction from pyiqa's own table
    from patchscaler.metrics import better
    assert not needs_reference({'type': 'calculate_pyiqa', 'metric': 'brisque'})
    assert needs_reference({'type': 'calculate_pyiqa', 'metric': 'dists'})
    assert better({'type': 'calculate_pyiqa', 'metric': 'dists'}) == 'lower'
    assert better({'type': 'calculate_pyiqa', 'metric': 'topiq_nr'}) == 'higher'
    assert better({'type': 'calculate_lpips'}) == better({'type': 'calculate_niqe'}) == 'lower'


@pytest.mark.parametrize('metric, files', [('maniqa', ['ckpt_koniq10k.pt']), ('clipiqa', ['RN50.pt']),
                                           ('musiq', ['musiq_koniq_ckpt-e95806b9.pth']),
                                           ('lpips', ['LPIPS_v0.1_alex-df73285e.pth', 'alexnet-owt-7be5be79.pth'])])
def test_missing_weights_name_every_file_and_its_source(tmp_path, metric, files):
    with pytest.raises(MetricUnavailable) as err:
        calculate_metric({'img': _img(0), 'img2': _img(1)}, {'type': f'calculate_{metric}', 'weights_dir': tmp_path})
    message = str(err.value)
    assert str(tmp_path) in message and all(f in message for f in files) and 'https://' in message
    assert err.value.short == f'missing {", ".join(files)} in {tmp_path}'


def test_weights_folder_from_the_environment(tmp_path, monkeypatch, weights):
    monkeypatch.setenv(iqa.ENV_VAR, str(tmp_path))
    with pytest.raises(MetricUnavailable, match=str(tmp_path)):
        calculate_metric({'img': _img(0)}, {'type': 'calculate_musiq'})
    monkeypatch.setenv(iqa.ENV_VAR, str(weights))
    assert np.isfinite(calculate_metric({'img': _img(0)}, {'type': 'calculate_musiq'}))
    assert iqa.weights_dir('elsewhere') == 'elsewhere'  # the option wins over the variable


def test_any_pyiqa_metric_is_redirected_not_downloaded(tmp_path):
    """A metric outside the table (DISTS): the first file pyiqa would fetch is looked up locally, and named."""
    with pytest.raises(MetricUnavailable, match=r'DISTS.*\.pth|vgg16.*\.pth') as err:
        calculate_metric({'img': _img(0), 'img2': _img(1)}, {'type': 'calculate_pyiqa', 'metric': 'dists',
                                                             'weights_dir': tmp_path})
    assert 'https://' in str(err.value) and err.value.short.startswith('missing ')  # not re-wrapped


def test_timm_backbones_are_built_without_hub_weights(tmp_path, monkeypatch):
    """ManIQA's ViT comes from timm with pretrained=True; for ManIQA (whose checkpoint replaces it strictly) it is
    built without hub weights; for any other metric the hub is offline, so a timm fetch fails instead."""
    import os

    import timm
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    original = timm.create_model
    with iqa._Offline('maniqa', str(tmp_path))():
        assert os.environ['HF_HUB_OFFLINE'] == '1'
        net = timm.create_model('resnet18', pretrained=True)
    assert isinstance(net, torch.nn.Module) and timm.create_model is original and 'HF_HUB_OFFLINE' not in os.environ
    with iqa._Offline('other', str(tmp_path))():
        assert timm.create_model is original


def test_lpips_and_musiq_from_local_files(weights):
    a, b = _img(0), _img(1)
    opt = {'weights_dir': str(weights), 'device': 'cpu'}
    assert calculate_metric({'img': a, 'img2': a}, {'type': 'calculate_lpips', **opt}) == pytest.approx(0, abs=1e-6)
    d = calculate_metric({'img': a, 'img2': b}, {'type': 'calculate_lpips', **opt})
    assert d > 0 and d == pytest.approx(calculate_metric({'img': b, 'img2': a}, {'type': 'calculate_lpips', **opt}))
    # the same number as pyiqa's own network on the RGB [0, 1] tensor: BGR -> RGB and the scale are right
    net = build_metric('musiq', str(weights), 'cpu')
    rgb = torch.from_numpy(a[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = float(net(rgb))
    assert calculate_metric({'img': a}, {'type': 'calculate_musiq', **opt}) == pytest.approx(expected, rel=1e-5)
    assert build_metric('musiq', str(weights), 'cpu') is net  # built once per process
    # crop_border cuts the border before scoring
    framed = np.pad(a, ((4, 4), (4, 4), (0, 0)), constant_values=255)
    assert calculate_metric({'img': framed}, {'type': 'calculate_musiq', 'crop_border': 4, **opt}) == \
        pytest.approx(expected, rel=1e-5)


def test_clipiqa_with_a_local_clip_archive(weights):
    score = calculate_metric({'img': _img(2)}, {'type': 'calculate_clipiqa', 'weights_dir': str(weights),
                                                'device': 'cpu'})
    assert 0 <= score <= 1


def test_metric_table_scores_what_it_can(tmp_path, monkeypatch):
    monkeypatch.setenv(iqa.ENV_VAR, str(tmp_path))  # no weights
    metrics = {'psnr': {'type': 'calculate_psnr', 'crop_border': 0},
               'niqe': {'type': 'calculate_niqe', 'crop_border': 0},
               'musiq': {'type': 'calculate_musiq'},
               'lpips': {'type': 'calculate_lpips'}}
    table = MetricTable(metrics)
    sr, hr = _img(0, 200, 200), _img(1, 200, 200)  # NIQE needs several 96 px blocks
    table.add('a', {'': sr, '_bicubic': hr}, hr)
    table.add('b', {'': _img(3, 200, 200)}, None)     # LR-only: no PSNR, NIQE still
    table.add('tiny', {'': _img(4, 64, 64)}, None)    # NIQE cannot score 64 px: recorded, others go on
    means = table.means()
    assert means['psnr'] == pytest.approx(calculate_metric({'img': sr, 'img2': hr}, metrics['psnr']))
    assert means['psnr_bicubic'] == float('inf')  # identical images, as BasicSR scores them
    assert set(table.unavailable) == {'musiq', 'lpips'}
    assert [e[:2] for e in table.errors] == [('tiny', 'niqe')]
    summary = {m: (mean, direction, note) for m, mean, direction, note in table.summary()}
    assert summary['niqe'][1] == 'lower' and summary['niqe'][2] == '2 of 3 images'
    assert summary['musiq'][0] is None and summary['musiq'][2].startswith('unavailable: missing musiq_koniq')
    assert summary['psnr'][2] == '1 of 3 images'
    path = table.save(str(tmp_path / 'out'), 'metrics_x')
    text = open(path).read()
    assert '| psnr |' in text and 'musiq_koniq_ckpt-e95806b9.pth   (from https://' in text
    assert (tmp_path / 'out' / 'metrics_x.csv').read_text().splitlines()[0].startswith('image,psnr')

"""Real-ESRGAN and SwinIR-GAN baselines: BasicSR's models and archs on PatchScaler's shared degradation."""
import glob
import os

import pytest
import torch
import yaml
from conftest import ROOT

from patchscaler.utils.errors import MissingWeightsError

DEMOS = {'realesrgan': 'train_realesrgan_demo.yml', 'swinir': 'train_swinir_gan_demo.yml'}


def _opt(which, tmp_path):
    with open(os.path.join(ROOT, 'options', 'baselines', 'demo', DEMOS[which])) as f:
        opt = yaml.safe_load(f)
    opt.update(is_train=True, dist=False, rank=0, world_size=1, num_gpu=0)
    opt['path'] = dict(opt['path'], models=str(tmp_path), training_states=str(tmp_path),
                       experiments_root=str(tmp_path), visualization=str(tmp_path))
    opt['train']['gt_size'] = 64
    return opt


def _kernel_batch(n=2, size=96):
    delta = torch.zeros(n, 21, 21)
    delta[:, 10, 10] = 1
    return {'gt': torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)), 'kernel1': delta,
            'kernel2': delta.clone(), 'sinc_kernel': delta.clone()}


@pytest.mark.parametrize('which', sorted(DEMOS))
def test_demo_baseline_trains_on_the_shared_degradation(which, tmp_path):
    from basicsr.models import build_model
    torch.manual_seed(0)
    model = build_model(_opt(which, tmp_path))
    assert type(model).__name__ == 'RealESRGANBaselineModel'
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    for it in (1, 2):
        model.feed_data(_kernel_batch())
        assert model.lq.shape == (2, 3, 16, 16) and model.gt.shape == (2, 3, 64, 64)  # degraded here, on CPU
        model.optimize_parameters(it)
    log = model.get_current_log()
    assert {'l_g_pix', 'l_g_gan', 'l_d_real', 'l_d_fake'} <= set(log)
    assert any(not torch.equal(before[k], v) for k, v in model.net_g.state_dict().items())
    model.feed_data({'lq': torch.rand(1, 3, 12, 20), 'gt': torch.rand(1, 3, 48, 80)})  # paired val data as is
    model.test()
    assert model.output.shape == (1, 3, 48, 80)


def test_perceptual_loss_without_vgg_weights_is_a_clear_error(tmp_path, monkeypatch):
    from basicsr.models import build_model
    monkeypatch.chdir(tmp_path)  # no experiments/pretrained_models/vgg19-dcbb9e9d.pth here
    opt = _opt('realesrgan', tmp_path)
    opt['train']['perceptual_opt'] = {'type': 'PerceptualLoss', 'layer_weights': {'conv5_4': 1.0},
                                      'vgg_type': 'vgg19', 'perceptual_weight': 1.0, 'style_weight': 0}
    with pytest.raises(MissingWeightsError, match='vgg19-dcbb9e9d.pth'):
        build_model(opt)


SHIPPED = sorted(os.path.relpath(p, os.path.join(ROOT, 'options'))
                 for p in glob.glob(os.path.join(ROOT, 'options', '**', '*.yml'), recursive=True)
                 if 'model_type:' in open(p).read())


def test_every_model_option_file_is_checked():
    assert len(SHIPPED) >= 19 and 'stablesr/demo/test_stablesr_pgs_demo.yml' in SHIPPED


@pytest.mark.parametrize('name', SHIPPED)
def test_option_files_pass_the_check(name, monkeypatch):
    """Keys, types, registry names and network arguments of every shipped option file. Datasets, weights and RTMs
    are not on a fresh machine, so paths are taken as present (the file itself is read before that)."""
    from patchscaler.utils.cli import load_option_file
    from patchscaler.utils.options_check import check_options
    monkeypatch.chdir(ROOT)
    opt = load_option_file(os.path.join(ROOT, 'options', name))
    monkeypatch.setattr(os.path, 'exists', lambda p: True)
    monkeypatch.setattr(os.path, 'isfile', lambda p: True)
    check_options(opt)

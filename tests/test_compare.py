"""tools/compare.py: every model in its own process on the same pairs; table, plot and HTML page; a failing
model is a failed row with its reason. The option files are the shipped demo ones, shrunk, with random-init
weights saved as checkpoints."""
import csv
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network
from conftest import ROOT, write_png

from patchscaler.compare import check_compare_options, run_comparison
from patchscaler.compare.report import texture_window
from patchscaler.utils.errors import ConfigError

TINY_UNET = dict(sample_size=8, in_channels=12, out_channels=12, block_out_channels=[16, 32], layers_per_block=1,
                 down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D'],
                 up_block_types=['CrossAttnUpBlock2D', 'UpBlock2D'], cross_attention_dim=16, attention_head_dim=4,
                 norm_num_groups=8)
TINY_GRM = {'type': 'GRM', 'in_channels': 12, 'num_feat': 8, 'body': 'rrdb', 'num_blocks': 1, 'num_grow_ch': 4}


def _load(rel):
    with open(os.path.join(ROOT, 'options', rel)) as f:
        return yaml.safe_load(f)


def _save_opt(opt, path):
    with open(path, 'w') as f:
        yaml.safe_dump(opt, f)
    return str(path)


def _pairs(root):
    """img0: a 200×200 crop of a photo scikit-image ships (2×2 of NIQE's 96 px blocks); img1: a 64×48 synthetic
    image (too small for NIQE: a metric that cannot score one image); their ×4 area-downsampled LR; and an HR
    whose LR file is not an image."""
    from skimage import data
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:48]
    small = np.stack([(np.sin(x / 3) * 60 + 120 + rng.normal(0, 20, x.shape)) for _ in range(3)], -1)
    photo = cv2.cvtColor(np.ascontiguousarray(data.astronaut()[20:220, 180:380]), cv2.COLOR_RGB2BGR)
    for i, hr in enumerate([photo, small.clip(0, 255).astype(np.uint8)]):
        h, w = hr.shape[:2]
        write_png(str(root / 'HR' / f'img{i}.png'), hr)
        write_png(str(root / 'LR' / f'img{i}.png'), cv2.resize(hr, (w // 4, h // 4), interpolation=cv2.INTER_AREA))
    write_png(str(root / 'HR' / 'broken.png'), hr)
    (root / 'LR' / 'broken.png').write_bytes(b'not a png')


@pytest.fixture
def comparison(tmp_path):
    """Option files for Real-ESRGAN-tiny, StableSR, StableSR+PGS (random weights) and a model whose checkpoint
    is missing, on 2 good pairs and one unreadable one."""
    torch.manual_seed(0)
    _pairs(tmp_path / 'data')
    ae = {'type': 'PixelUnshuffleAutoencoder', 'downscale': 2}
    esr = _load('baselines/demo/test_realesrgan_demo.yml')
    torch.save({'params_ema': build_network(dict(esr['network_g'])).state_dict()}, tmp_path / 'esr.pth')
    esr['path'] = {'pretrain_network_g': str(tmp_path / 'esr.pth'), 'param_key_g': 'params_ema'}
    sr = _load('stablesr/demo/test_stablesr_demo.yml')
    sr['autoencoder'] = ae
    sr['network_g'] = dict(type='StableSRUNet', unet=TINY_UNET, patch_size=8, prediction_type='v_prediction',
                           encoder=dict(model_channels=32, out_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                                        attention_resolutions=[2], num_heads=2))
    sr['sampler'] = dict(sr['sampler'], patch_size=8, stride=8)  # no overlap: fewer tiles, a faster test
    torch.save({'params_ema': build_network(dict(sr['network_g'])).state_dict()}, tmp_path / 'sr.pth')
    sr['path'] = {'pretrain_network_g': str(tmp_path / 'sr.pth'), 'param_key_g': 'params_ema'}
    pgs = _load('stablesr/demo/test_stablesr_pgs_demo.yml')
    pgs.update(autoencoder=ae, network_g=sr['network_g'], network_grm=TINY_GRM,
               sampler=dict(pgs['sampler'], patch_size=8, stride=8,
                            grouping={'mode': 'quantile', 'quantiles': [0.7, 0.4]}))
    torch.save({'params': build_network(dict(TINY_GRM)).state_dict()}, tmp_path / 'grm.pth')
    pgs['path'] = dict(sr['path'], pretrain_network_grm=str(tmp_path / 'grm.pth'))
    for o in (esr, sr, pgs):
        o.pop('datasets')
    opt = _load('compare_x4.yml')
    # a learned metric without its weights: noted once per model, the others scored
    opt['metrics']['musiq'] = {'type': 'calculate_musiq', 'weights_dir': str(tmp_path / 'no_weights')}
    opt.update(name='cmp', crop=24, dataset=dict(opt['dataset'], dataroot_lq=str(tmp_path / 'data' / 'LR'),
                                                 dataroot_gt=str(tmp_path / 'data' / 'HR')),
               qmap_model='StableSR+PGS', models=[
                   {'name': 'Real-ESRGAN', 'opt': _save_opt(esr, tmp_path / 'esr.yml')},
                   {'name': 'StableSR', 'opt': _save_opt(sr, tmp_path / 'sr.yml')},
                   {'name': 'StableSR+PGS', 'opt': _save_opt(pgs, tmp_path / 'pgs.yml')},
                   {'name': 'Missing', 'opt': _save_opt(sr, tmp_path / 'sr2.yml'),
                    'path': {'pretrain_network_g': str(tmp_path / 'nope.pth')}}])
    return opt


@pytest.mark.slow
def test_compare_writes_table_plot_and_offline_page(comparison, tmp_path):
    rows, folder = run_comparison(comparison, str(tmp_path), device='cpu', progress=False)
    assert [r['model'] for r in rows] == ['Bicubic', 'Real-ESRGAN', 'StableSR', 'StableSR+PGS', 'Missing']
    by = {r['model']: r for r in rows}
    assert by['Missing']['status'] == 'failed' and 'nope.pth' in by['Missing']['reason']
    for name in ('Bicubic', 'Real-ESRGAN', 'StableSR', 'StableSR+PGS'):
        r = by[name]
        assert r['status'] == 'ok' and r['images'] == 2, r
        assert 'broken' in r['reason']  # the unreadable pair is named, the good ones are scored
        # NIQE cannot score 64×48 (nor the flat output of a random-init GAN): named; PSNR/SSIM score both
        assert 'niqe not computable on' in r['reason'] and 'img1 (' in r['reason'].split('niqe')[1]
        assert 'musiq unavailable: missing musiq_koniq_ckpt-e95806b9.pth' in r['reason'] and r['musiq'] is None
        assert 0 < r['psnr'] < 60 and 0 < r['ssim'] <= 1 and r['seconds_per_image'] > 0
        assert r['peak_memory_mb'] > 50  # process RSS on CPU
    # PSNR is the same code on the same images: recompute the bicubic one from its saved files
    from basicsr.metrics import calculate_psnr
    own = [calculate_psnr(cv2.imread(os.path.join(folder, 'models', 'Bicubic', f'img{i}.png')),
                          cv2.imread(str(tmp_path / 'data' / 'HR' / f'img{i}.png')), 4, test_y_channel=True)
           for i in range(2)]
    assert by['Bicubic']['psnr'] == pytest.approx(np.mean(own), abs=1e-6)
    from basicsr.metrics import calculate_niqe
    assert by['Bicubic']['niqe'] == pytest.approx(  # the mean over the images NIQE can score: img0 alone
        calculate_niqe(cv2.imread(os.path.join(folder, 'models', 'Bicubic', 'img0.png')), 4), abs=1e-6)
    # StableSR: 20 steps on every tile; +PGS: the same weights, fewer patch evaluations
    assert by['StableSR']['nfe_per_image'] == by['StableSR']['nfe_uniform_per_image']
    assert by['StableSR+PGS']['nfe_per_image'] < by['StableSR+PGS']['nfe_uniform_per_image']
    assert by['Real-ESRGAN']['nfe_per_image'] is None
    with open(os.path.join(folder, 'metrics.csv')) as f:
        assert [r['model'] for r in csv.DictReader(f)] == [r['model'] for r in rows]
    with open(os.path.join(folder, 'metrics.json')) as f:
        assert json.load(f) == rows
    assert 'failed: ' in open(os.path.join(folder, 'metrics.md')).read()
    plot = cv2.imread(os.path.join(folder, 'runtime_quality.png'))
    assert plot is not None and plot.shape[0] > 200
    page = open(os.path.join(folder, 'report.html')).read()
    assert 'http://' not in page and 'https://' not in page  # offline
    srcs = [s.split('"')[0] for s in page.split('src="')[1:]]
    assert all(os.path.isfile(os.path.join(folder, s)) for s in srcs)
    crops = [s for s in srcs if s.startswith('crops/img0/')]
    assert len(crops) == 5  # bicubic, three models, HR; the failed model has none
    assert {cv2.imread(os.path.join(folder, s)).shape for s in crops} == {(24, 24, 3)}  # crop: 24
    assert sum('_qmap.png' in s for s in srcs) == 2 and 'failed: ' in page


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')),
                    reason='no headless browser installed')
def test_report_renders_in_a_headless_browser(comparison, tmp_path):
    """The page opened from disk in a real browser: every image decodes (the page's own load script counts
    them into <body data-images-loaded>)."""
    comparison['models'] = comparison['models'][2:3]  # StableSR+PGS: crops and Qmap overlays
    _, folder = run_comparison(comparison, str(tmp_path), device='cpu', progress=False)
    browser = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
    run = subprocess.run([browser, '--headless', '--no-sandbox', '--disable-gpu', '--virtual-time-budget=5000',
                          '--dump-dom', 'file://' + os.path.abspath(os.path.join(folder, 'report.html'))],
                         capture_output=True, text=True, timeout=120)
    if run.returncode != 0 or '<body' not in run.stdout:  # e.g. a snap stub that cannot read /tmp
        pytest.skip(f'{browser} could not open a local page (exit {run.returncode})')
    loaded = run.stdout.split('data-images-loaded="')[1].split('"')[0]
    ok, total = map(int, loaded.split('/'))
    assert total >= 7 and ok == total, loaded


def test_comparison_options_are_checked_before_any_model_runs():
    opt = _load('compare_x4.yml')
    check_compare_options(opt)
    with pytest.raises(ConfigError, match="did you mean 'metrics'"):
        check_compare_options(dict(opt, metric={}))
    with pytest.raises(ConfigError, match='unique'):
        check_compare_options(dict(opt, models=opt['models'] + opt['models'][:1]))
    with pytest.raises(ConfigError, match='models\\[0\\]'):
        check_compare_options(dict(opt, models=[{'name': 'x'}]))
    with pytest.raises(ConfigError, match='qmap_model'):
        check_compare_options(dict(opt, qmap_model='Nobody'))
    with pytest.raises(ConfigError, match='folder names'):  # both would write models/A_B/
        check_compare_options(dict(opt, models=[{'name': 'A+B', 'opt': 'x'}, {'name': 'A B', 'opt': 'y'}]))
    with pytest.raises(ConfigError, match='warmup must be'):
        check_compare_options(dict(opt, warmup='one'))
    with pytest.raises(ConfigError, match='plot_metric'):
        check_compare_options(dict(opt, plot_metric='lpips'))


def test_crop_window_is_the_most_textured():
    img = np.full((50, 60, 3), 128, np.uint8)
    img[30:40, 5:15] = np.random.default_rng(0).integers(0, 255, (10, 10, 3))
    top, left, h, w = texture_window(img, 10)
    assert (h, w) == (10, 10) and abs(top - 30) <= 1 and abs(left - 5) <= 1
    assert texture_window(img[:8, :8], 10)[2:] == (8, 8)  # a crop larger than the image is the image


def test_cli_exit_status_and_one_line_error(tmp_path):
    bad = _save_opt({'name': 'x', 'scale': 4, 'dataset': {'type': 'PairedSRDataset'}, 'models': []},
                    tmp_path / 'bad.yml')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'compare.py'), '-opt', bad],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith('error: models must be')


@pytest.mark.parametrize('script, timeout, reason', [
    ('exit 3', None, 'the process exited with status 3'),
    ('kill -9 $$', None, 'the process was killed by signal 9 (out of memory?)'),
    ('sleep 30', 1, 'timed out after 1 s'),
    ('kill -11 $$', None, 'the process was killed by signal 11'),
])
def test_a_model_process_that_crashes_is_killed_or_hangs_is_a_failed_row(tmp_path, monkeypatch, script, timeout,
                                                                         reason):
    """The child process of one model ends badly: its row says how (status, signal, timeout); nothing else
    breaks. A stand-in interpreter plays the child."""
    from patchscaler.compare import compare
    fake = tmp_path / 'python'
    fake.write_text(f'#!/bin/sh\n{script}\n')
    fake.chmod(0o755)
    monkeypatch.setattr(sys, 'executable', str(fake))
    out = tmp_path / 'model'
    out.mkdir()
    job = {'name': 'M', 'opt': 'm.yml', 'out': str(out)}
    record = compare._run_job(job, str(out / 'job.json'), timeout, progress=False)
    assert record['status'] == 'failed' and record['reason'] == reason and record['images'] == []
    assert json.loads((out / 'record.json').read_text())['reason'] == reason

"""tools/evaluate_detail.py (patchscaler/compare/detail.py) end to end on a tiny model and a tiny labelled set,
and the labelled pairs it reads (PairedSRDataset's dataroot_labels)."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import yaml
from conftest import ROOT, write_png

from patchscaler.data.paired_image_dataset import PairedSRDataset
from patchscaler.utils.errors import DataError

TOOL = os.path.join(ROOT, 'tools', 'evaluate_detail.py')


def _labelled_set(root, n=2):
    """n pairs: 64x64 HR, left half flat, right half a vertical grating; LR = 4x area downscale; class maps."""
    y, x = np.mgrid[0:64, 0:64]
    classes = [{'name': 'flat', 'index': 0}, {'name': 'grating', 'index': 1}]
    for i in range(n):
        hr = np.full((64, 64, 3), 100 + 20 * i, np.uint8)
        hr[:, 32:] = np.clip(128 + 40 * np.cos(2 * np.pi * 0.3 * x[:, 32:] + i), 0, 255).astype(np.uint8)[..., None]
        labels = np.zeros((64, 64), np.uint8)
        labels[:, 32:] = 1
        labels[:, 31:33] = 255
        write_png(root / 'HR' / f'im{i}.png', hr)
        write_png(root / 'LR' / f'im{i}.png', cv2.resize(hr, (16, 16), interpolation=cv2.INTER_AREA))
        write_png(root / 'labels' / f'im{i}.png', labels)
    (root / 'classes.json').write_text(json.dumps({'classes': classes, 'flat_class': 0}))
    return {'name': 'tiny_labelled', 'type': 'PairedSRDataset', 'dataroot_lq': str(root / 'LR'),
            'dataroot_gt': str(root / 'HR'), 'dataroot_labels': str(root / 'labels')}


def test_labels_come_with_the_pairs_and_bad_maps_are_named(tmp_path):
    ds_opt = _labelled_set(tmp_path)
    item = PairedSRDataset(dict(ds_opt, scale=4))[0]
    assert item['labels'].shape == item['gt'].shape[1:] and set(item['labels'].unique().tolist()) == {0, 1, 255}
    write_png(tmp_path / 'labels' / 'im1.png', np.zeros((8, 8), np.uint8))
    assert 'smaller than the GT' in PairedSRDataset(dict(ds_opt, scale=4))[1]['error']
    with pytest.raises(DataError, match='folder not found'):
        PairedSRDataset(dict(ds_opt, scale=4, dataroot_labels=str(tmp_path / 'nowhere')))


def test_evaluate_detail_end_to_end(trained, tmp_path):
    opt_path, run = trained
    opt = yaml.safe_load(open(opt_path))
    labelled = _labelled_set(tmp_path / 'set')
    photos = {k: labelled[k] for k in ('type', 'dataroot_lq', 'dataroot_gt')}
    opt['datasets'] = {'test_1': labelled, 'test_2': dict(photos, name='photos')}
    opt['name'] = 'tiny'
    path = tmp_path / 'eval.yml'
    path.write_text(yaml.safe_dump(opt))
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, TOOL, '-opt', str(path), '-o', str(out), '--no-progress',
                           '--no-prompt-opt', str(path), '--margin', '2'], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / 'detail.json').read_text())  # strict JSON: NaN written as null
    s = result['sets']['tiny_labelled']
    assert set(s['outputs']) == {'bicubic', 'GRM', 'PGS', 'uniform', 'no prompt'}
    assert s['outputs']['uniform']['nfe_ratio'] == 1.0 and s['outputs']['PGS']['nfe_ratio'] <= 1.0
    assert set(s['classes']) == {'flat', 'grating'}
    assert s['classes']['grating']['GRM']['hf_energy_ratio'] is not None
    assert 'niqe' not in s['outputs']['PGS']  # class-mapped synthetic set: no NIQE
    assert 'niqe' in result['sets']['photos']['outputs']['PGS']  # photos get it (None when too small for NIQE)
    assert (out / 'strip_tiny_labelled.png').is_file() and (out / 'strip_photos.png').is_file()
    md = (out / 'detail.md').read_text()
    assert '| PGS |' in md and 'PSNR per class' in md and 'Flat patches graded simple' in md
    assert 'PSNR per class' in proc.stdout


def test_evaluate_detail_needs_a_diffusion_stage(trained, tmp_path):
    opt_path, _ = trained
    opt = yaml.safe_load(open(opt_path))
    for key in ('network_dit', 'network_texture', 'rtm'):
        opt.pop(key)
    opt['path'] = {'pretrain_network_grm': opt_path.replace('test.yml', 'run/models/net_grm_latest.pth')}
    opt['datasets'] = {'test_1': _labelled_set(tmp_path / 'set', 1)}
    path = tmp_path / 'eval.yml'
    path.write_text(yaml.safe_dump(opt))
    proc = subprocess.run([sys.executable, TOOL, '-opt', str(path), '--no-progress'], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'no diffusion stage' in proc.stderr


def test_aggregate_gives_mean_and_std_over_runs(tmp_path):
    runs = []
    for i, psnr in enumerate((30.0, 32.0)):
        result = {'seed': 0, 'sets': {'s': {'images': 2, 'group_shares': [0.5 + 0.1 * i, 0.5 - 0.1 * i],
                                            'flat_patches': 4, 'flat_patches_simple': 1.0 - 0.25 * i,
                                            'outputs': {'GRM': {'psnr': 28.0}, 'PGS': {'psnr': psnr, 'niqe': None}},
                                            'classes': {'flat': {'GRM': {'psnr': 40.0, 'hf_energy_ratio': None,
                                                                         'spectrum_distance_db': None}}}}}}
        (tmp_path / f'r{i}').mkdir()
        (tmp_path / f'r{i}' / 'detail.json').write_text(json.dumps(result))
        runs.append(str(tmp_path / f'r{i}'))
    proc = subprocess.run([sys.executable, TOOL, '--aggregate', *runs, '-o', str(tmp_path / 'agg')],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    agg = json.loads((tmp_path / 'agg' / 'detail.json').read_text())
    s = agg['sets']['s']
    assert s['outputs']['GRM']['psnr'] == 28.0  # the same in every run: kept as it is
    assert s['outputs']['PGS']['psnr'] == {'mean': 31.0, 'std': pytest.approx(2 ** 0.5), 'n': 2}
    assert agg['runs'] == 2 and '| PGS | 31.00 ± 1.41 |' in proc.stdout and '87.5 ± 17.7 % of 4' in proc.stdout
    missing = subprocess.run([sys.executable, TOOL, '--aggregate', str(tmp_path / 'nowhere')], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and 'detail.json not found' in missing.stderr

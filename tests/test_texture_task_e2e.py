"""The known-answer texture task end to end at tiny size, through the tools and YAML users run: build the task
(datasets/make_texture_task.py) and its RTM, train both stages briefly with options/texture_task's training file,
and score it with tools/evaluate_detail.py.

What is asserted is what held for every training seed at this size (3 seeds measured, docs/detail_evaluation.md,
"Known-answer texture task"): the GRM grades every flat patch simple, PGS spends 0.74x the denoiser calls of uniform
sampling, and the diffusion stage adds detail where the GRM (a regression) has none. At this size (500 iterations)
the flat regions are not yet clean: PGS was 2.25-2.64 dB below the GRM there for the three seeds, so the test bounds
the gap at 3.5 dB (a grainy sampler, e.g. the linear schedule with p = 2, is ~9 dB below); that the gap closes (to
0.21 dB below the GRM) is the 3000-iteration result in docs/detail_evaluation.md. No timing.
"""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import yaml

REPO = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
pytestmark = pytest.mark.slow
ITERS, GRM_ITERS = 500, 200


def _run(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
    env['PYTHONUNBUFFERED'] = '1'
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


def _options(name):
    with open(osp.join(REPO, 'options', 'texture_task', name)) as f:
        return yaml.safe_load(f)


def train_and_evaluate(root, seed=0):
    """Build, train and evaluate in ``root``; the detail.json of the validation set."""
    data = root / 'task'
    if not (data / 'classes.json').is_file():
        _run([osp.join(REPO, 'datasets', 'make_texture_task.py'), '--out', str(data), '--train', '32', '--val', '4'],
             cwd=root)
        rtm = _options('build_rtm_texture.yml')
        rtm.update(sources=[str(data / 'train_HR.lmdb')], output=str(root / 'rtm.safetensors'), size=64,
                   preview=False)
        rtm['candidates'].update(num=400)
        (root / 'rtm.yml').write_text(yaml.safe_dump(rtm))
        _run([osp.join(REPO, 'tools', 'build_rtm.py'), '-opt', str(root / 'rtm.yml')], cwd=root)

    opt = _options('train_patchscaler_texture.yml')
    name = f'tiny_texture_s{seed}'
    opt.update(name=name, manual_seed=seed, sampler=osp.join(REPO, opt['sampler']))
    opt['rtm']['path'] = str(root / 'rtm.safetensors')
    train = opt['datasets']['train']
    train.update(dataroot_gt=str(data / 'train_HR.lmdb'), dataroot_lq=str(data / 'train_LR_x4.lmdb'),
                 num_worker_per_gpu=0)
    val = opt['datasets'].pop('val')  # scored once, by evaluate_detail below
    opt.pop('val')
    val.update(dataroot_lq=str(data / 'val' / 'LR_x4'), dataroot_gt=str(data / 'val' / 'HR'),
               dataroot_labels=str(data / 'val' / 'labels'))
    # tiny: 64-px crops (16² latents, one V = 16 patch; the GRM's windows at img_size 16), fewer iterations
    train['gt_size'] = 64
    opt['network_grm']['img_size'] = 16
    opt['train'].update(total_iter=ITERS, grm_iters=GRM_ITERS, gt_size=64)
    opt['train']['scheduler']['periods'] = [ITERS]
    opt['logger'].update(save_checkpoint_freq=ITERS, use_tb_logger=False)
    (root / f'{name}.yml').write_text(yaml.safe_dump(opt, sort_keys=False))
    _run([osp.join(REPO, 'tools', 'train.py'), '-opt', str(root / f'{name}.yml')], cwd=root)

    test = _options('test_patchscaler_texture.yml')
    test.update(sampler=opt['sampler'], rtm=opt['rtm'], network_grm=opt['network_grm'])
    test['datasets']['test_1'].update(val)
    (root / 'test.yml').write_text(yaml.safe_dump(test, sort_keys=False))
    out = root / f'detail_s{seed}'
    _run([osp.join(REPO, 'tools', 'evaluate_detail.py'), '-opt', str(root / 'test.yml'), '--ckpt',
          str(root / 'experiments' / name), '-o', str(out), '--no-progress'], cwd=root)
    return json.loads((out / 'detail.json').read_text())['sets']['texture_val']


def test_known_answer_task_trains_and_pgs_keeps_flat_regions(tmp_path):
    s = train_and_evaluate(tmp_path)
    flat, outputs = s['classes']['flat'], s['outputs']
    assert flat['PGS']['psnr'] >= flat['GRM']['psnr'] - 3.5, flat
    assert s['flat_patches'] > 0 and s['flat_patches_simple'] >= 0.9, s
    assert outputs['PGS']['nfe_ratio'] < 0.8 and outputs['uniform']['nfe_ratio'] == 1.0, outputs
    textured = [c for c in ('grating_v', 'grating_d', 'field') if s['classes'][c]['GRM']['psnr'] is not None]
    assert textured
    for cls in textured:  # detail where the GRM (a regression) has none
        assert s['classes'][cls]['PGS']['hf_energy_ratio'] > 2 * s['classes'][cls]['GRM']['hf_energy_ratio'], cls

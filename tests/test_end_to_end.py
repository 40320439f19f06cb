"""The demo, end to end at tiny size, through the same tools and YAML users run.

Train (with validation and checkpoints), kill -9 the run, resume with --auto_resume, test, and a 2-process
gloo run under torchrun. Each is a real subprocess of ``tools/*.py`` in a temporary folder.
"""
import glob
import json
import os
import os.path as osp
import re
import subprocess
import sys
import time

import pytest
import torch
import yaml

REPO = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
pytestmark = pytest.mark.slow


def _run(args, cwd, timeout=300):
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    if args[:2] == ['-m', 'torch.distributed.run']:  # 2 ranks with gloo on the CPU, also on a 1-GPU machine
        env['CUDA_VISIBLE_DEVICES'] = ''
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """A work folder with the demo data built by datasets/make_demo.py and a tiny copy of the demo options."""
    root = tmp_path_factory.mktemp('e2e')
    _run([osp.join(REPO, 'datasets', 'make_demo.py'), '--out', str(root / 'demo')], cwd=root)
    for side in ('LR_x4', 'HR'):  # a corrupt pair: validation must skip and list it, not crash
        (root / 'demo' / 'val' / side / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    with open(osp.join(REPO, 'options', 'demo', 'train_grm_demo.yml')) as f:
        opt = yaml.safe_load(f)
    opt['name'] = 'tiny_grm'
    opt['network_grm'].update(num_feat=16, num_heads=2, num_blocks=1, depth=2, img_size=16)
    train = opt['datasets']['train']
    train.update(dataroot_gt=str(root / 'demo' / 'train_HR.lmdb'), crop_pad_size=96, batch_size_per_gpu=2,
                 num_worker_per_gpu=0, dataset_enlarge_ratio=1)
    for phase, folder in (('val', 'val'), ('val_unseen', 'val_unseen')):
        opt['datasets'][phase].update(dataroot_lq=str(root / 'demo' / folder / 'LR_x4'),
                                      dataroot_gt=str(root / 'demo' / folder / 'HR'))
    opt['train'].update(total_iter=6, gt_size=64)
    opt['train']['scheduler']['periods'] = [6]
    opt['val']['val_freq'] = 3
    opt['logger'].update(print_freq=1, save_checkpoint_freq=3, use_tb_logger=False)
    opt['sampler'] = osp.join(REPO, opt['sampler'])
    (root / 'train.yml').write_text(yaml.safe_dump(opt, sort_keys=False))

    with open(osp.join(REPO, 'options', 'demo', 'test_grm_demo.yml')) as f:
        test_opt = yaml.safe_load(f)
    test_opt['network_grm'] = opt['network_grm']
    test_opt['sampler'] = opt['sampler']
    test_opt['datasets']['test_1'].update(opt['datasets']['val'], name='demo_val')
    test_opt['datasets']['test_2'].update(opt['datasets']['val_unseen'], name='demo_val_unseen')
    test_opt['path']['pretrain_network_grm'] = str(root / 'experiments' / 'tiny_grm' / 'models' /
                                                   'net_grm_latest.pth')
    # the paper's metrics without their weights (none in this folder): NIQE scores, MUSIQ is marked unavailable;
    # an LR-only set gets the no-reference ones
    test_opt['val']['metrics'].update(niqe={'type': 'calculate_niqe', 'crop_border': 4},
                                      musiq={'type': 'calculate_musiq'})
    test_opt['datasets']['test_3'] = {'name': 'demo_lr_only', 'type': 'PairedSRDataset',
                                      'dataroot_lq': str(root / 'demo' / 'val_unseen' / 'LR_x4')}
    (root / 'test.yml').write_text(yaml.safe_dump(test_opt, sort_keys=False))
    return root


def _log(exp_dir):
    logs = sorted(glob.glob(osp.join(exp_dir, 'train_*.log')), key=os.path.getmtime)
    return open(logs[-1]).read()


def test_train_kill_resume_and_test(workdir):
    exp = workdir / 'experiments' / 'tiny_grm'
    states = exp / 'training_states'
    # a long run, killed with SIGKILL once its iteration-3 checkpoint exists ...
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen([sys.executable, osp.join(REPO, 'tools', 'train.py'), '-opt', 'train.yml',
                             '--force_yml', 'train:total_iter=100000'], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (states / '3.state').is_file():
        assert proc.poll() is None and time.time() < deadline, 'the training run ended before its first checkpoint'
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    done = max(int(f.split('.')[0]) for f in os.listdir(states) if f.endswith('.state'))
    weights = torch.load(exp / 'models' / f'net_grm_{done}.pth', weights_only=True)['params']

    # ... continues from the newest complete checkpoint with --auto_resume, on CPU, for 3 more iterations
    _run([osp.join(REPO, 'tools', 'train.py'), '-opt', 'train.yml', '--auto_resume',
          '--force_yml', f'train:total_iter={done + 3}'], cwd=workdir)
    log = _log(exp)
    assert re.search(rf'Resuming training from epoch: \d+, iter: {done}\.', log), log[-2000:]
    assert f'net_grm_{done}.pth' in log  # the weights of the same checkpoint were loaded
    assert re.search(rf'iter:\s+{done + 1},', log) and not re.search(rf'iter:\s+{done},', log)
    state = torch.load(states / f'{done + 3}.state', weights_only=True)
    assert state['iter'] == done + 3
    resumed = torch.load(exp / 'models' / f'net_grm_{done + 3}.pth', weights_only=True)['params']
    assert any(not torch.equal(weights[k], resumed[k]) for k in weights)  # training went on from there
    assert not glob.glob(str(exp / '**' / '*.tmp'), recursive=True)  # atomic writes leave nothing behind

    assert re.search(r'psnr: [\d.]+\t\(bicubic: [\d.]+, gain [+-][\d.]+\)', log), log[-2000:]
    assert 'demo_val: skipped 1 unreadable image(s)' in log and 'broken.png' in log
    assert 'Validation demo_val_unseen' in log
    vis = exp / 'visualization' / 'astronaut'
    it = done + 3  # a multiple of val_freq (3), like every checkpoint iteration
    assert {f'astronaut_{it}.png', f'astronaut_{it}_confidence.png', f'astronaut_{it}_compare.png',
            f'astronaut_{it}_pgs.png'} <= set(os.listdir(vis))
    # PGS grading of the GRM's confidence (Eq. 2): shares of the 3 groups and the NFE ratio it implies
    grading = re.search(r'PGS grading of demo_val \((\d+) patches.*: simple ([\d.]+)%, medium ([\d.]+)%, '
                        r'hard ([\d.]+)%; NFE (\d+) vs (\d+) uniform', log)
    assert grading, log[-2000:]
    patches, simple, medium, hard, nfe, uniform = map(float, grading.groups())
    assert abs(simple + medium + hard - 100) < 0.2 and uniform == 20 * patches
    assert abs(nfe - patches * (8 * simple + 14 * medium + 20 * hard) / 100) < 0.01 * patches  # shares: 0.1 %

    # test with the final weights
    _run([osp.join(REPO, 'tools', 'test.py'), '-opt', 'test.yml'], cwd=workdir)
    res = workdir / 'results' / 'demo_grm_x4_test'
    for dataset, count in (('demo_val', 14), ('demo_val_unseen', 4)):
        images = os.listdir(res / 'visualization' / dataset)
        assert len([f for f in images if f.endswith('_demo_grm_x4_test.png')]) == count
    test_log = open(glob.glob(str(res / 'test_*.log'))[0]).read()
    assert re.search(r'# psnr: [\d.]+\t\(bicubic', test_log)
    assert 'PGS grading of demo_val_unseen' in test_log
    assert any(f.endswith('_pgs.png') for f in os.listdir(res / 'visualization' / 'demo_val_unseen'))
    # the metric table of each set, printed and saved; missing weights named, never downloaded
    assert re.search(r'# musiq: unavailable \(missing musiq_koniq_ckpt-e95806b9.pth', test_log), test_log[-3000:]
    table = json.loads((res / 'metrics_demo_val_unseen.json').read_text())
    assert set(table['means']) >= {'psnr', 'ssim', 'niqe', 'psnr_bicubic'} and 'musiq' in table['unavailable']
    assert len(table['images']) == 4 and (res / 'metrics_demo_val_unseen.csv').is_file()
    lr_only = json.loads((res / 'metrics_demo_lr_only.json').read_text())
    assert set(lr_only['means']) == {'niqe', 'niqe_bicubic'}  # the GRM stage: its output is the SR
    notes = {row['metric']: row['note'] for row in lr_only['summary']}
    assert notes['psnr'] == 'no HR images' and notes['musiq'].startswith('unavailable')
    assert '| niqe |' in (res / 'metrics_demo_lr_only.md').read_text()


def test_torchrun_two_cpu_processes(workdir):
    """``torchrun --nproc_per_node 2 ... --launcher pytorch`` trains with gloo on CPU and saves."""
    args = ['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29531',
            osp.join(REPO, 'tools', 'train.py'), '-opt', 'train.yml', '--launcher', 'pytorch',
            '--force_yml', 'name=tiny_ddp', 'train:total_iter=2', 'val:val_freq=2', 'logger:save_checkpoint_freq=2']
    _run(args, cwd=workdir)
    exp = workdir / 'experiments' / 'tiny_ddp'
    assert (exp / 'models' / 'net_grm_2.pth').is_file()
    assert (exp / 'training_states' / '2.state').is_file()
    assert 'World size (gpu number): 2' in _log(exp)


def test_demo_rtm_from_the_embedded_data(workdir):
    """``tools/build_rtm.py`` with the demo options on the demo LMDB: the memory, its metadata and picture."""
    with open(osp.join(REPO, 'options', 'demo', 'build_rtm_demo.yml')) as f:
        opt = yaml.safe_load(f)
    opt['sources'] = [str(workdir / 'demo' / 'train_HR.lmdb')]
    (workdir / 'rtm.yml').write_text(yaml.safe_dump(opt, sort_keys=False))
    proc = _run([osp.join(REPO, 'tools', 'build_rtm.py'), '-opt', 'rtm.yml', '--no-progress'], cwd=workdir)
    assert 'RTM: 256 of 2000 candidates kept by FPS (both)' in proc.stdout, proc.stdout
    out = workdir / opt['output']
    meta = yaml.safe_load(out.with_suffix('.json').read_text())  # JSON is YAML
    assert meta['autoencoder']['type'] == 'PixelUnshuffleAutoencoder' and meta['patch_size'] == 16
    assert (out.parent / 'rtm_demo_x4_preview.png').is_file()
    from patchscaler.archs.autoencoder_arch import PixelUnshuffleAutoencoder
    from patchscaler.retrieval import ReferenceTextureMemory
    rtm = ReferenceTextureMemory.load(out, autoencoder=PixelUnshuffleAutoencoder(4), patch_size=16)
    sims, idx = rtm.search(rtm.values[:32])
    assert torch.equal(idx[:, 0], torch.arange(32)) and bool((sims[:, 0] > 0.999).all())


def test_two_stage_demo_train_test_and_infer(workdir):
    """The README's main command at tiny size: both training stages, test.py, then infer.py with --ckpt."""
    rtm = workdir / 'experiments' / 'rtm' / 'rtm_demo_x4.safetensors'
    if not rtm.is_file():
        test_demo_rtm_from_the_embedded_data(workdir)
    with open(osp.join(REPO, 'options', 'demo', 'train_patchscaler_demo.yml')) as f:
        opt = yaml.safe_load(f)
    tiny = yaml.safe_load((workdir / 'train.yml').read_text())
    for key in ('network_grm', 'datasets', 'logger', 'sampler'):
        opt[key] = tiny[key]
    opt['name'] = 'tiny_ps'
    opt['network_dit'].update(hidden_size=32, depth=1, num_heads=2, prompt_dim=16)
    opt['network_texture'].update(dim=16, depth=1, num_heads=2)
    opt['rtm']['path'] = str(rtm)
    opt['train'].update(total_iter=4, grm_iters=2, gt_size=64, patches_per_image=2)
    opt['train']['scheduler']['periods'] = [100]
    opt['val']['val_freq'] = 4
    opt['logger']['save_checkpoint_freq'] = 4
    (workdir / 'train_ps.yml').write_text(yaml.safe_dump(opt, sort_keys=False))
    _run([osp.join(REPO, 'tools', 'train.py'), '-opt', 'train_ps.yml'], cwd=workdir)
    exp = workdir / 'experiments' / 'tiny_ps'
    log = _log(exp)
    assert 'iter 3: GRM frozen after 2 iterations' in log
    assert re.search(r'x0-prediction MSE on demo_val \(fixed noise\): t=49: [\d.e+-]+, .*; y0 itself', log)
    assert re.search(r'# psnr: [\d.]+\t\(GRM: [\d.]+, gain [-+][\d.]+; bicubic: [\d.]+', log), log[-2000:]
    assert re.search(r'PGS grading of demo_val .* sampled \d+ patch evaluations and [\d.]+ s per image', log)
    for name in ('grm', 'dit', 'texture'):
        assert (exp / 'models' / f'net_{name}_latest.pth').is_file()

    # --auto_resume after the GRM stage: every network and the EMA come back, the GRM stays frozen
    _run([osp.join(REPO, 'tools', 'train.py'), '-opt', 'train_ps.yml', '--auto_resume', '--force_yml',
          'train:total_iter=6', 'val:val_freq=100'], cwd=workdir)
    log = _log(exp)
    assert 'Resuming training from epoch' in log and 'iter: 4' in log and 'iter 5: GRM frozen' in log
    assert 'Loaded PatchDiT [params_ema]' in log and 'Loaded TextureEncoder [params_ema]' in log
    assert (exp / 'models' / 'net_dit_6.pth').is_file() or (exp / 'models' / 'net_dit_latest.pth').is_file()

    # both stages under torchrun with gloo: the prompt is encoded inside the DDP forward
    _run(['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29533',
          osp.join(REPO, 'tools', 'train.py'), '-opt', 'train_ps.yml', '--launcher', 'pytorch', '--force_yml',
          'name=tiny_ps_ddp', 'train:total_iter=2', 'train:grm_iters=1', 'val:val_freq=100',
          'logger:save_checkpoint_freq=2'], cwd=workdir)
    assert (workdir / 'experiments' / 'tiny_ps_ddp' / 'models' / 'net_dit_2.pth').is_file()

    with open(osp.join(REPO, 'options', 'demo', 'test_patchscaler_demo.yml')) as f:
        test_opt = yaml.safe_load(f)
    for key in ('network_grm', 'network_dit', 'network_texture', 'rtm', 'sampler'):
        test_opt[key] = opt[key]
    test_opt['datasets'] = {'test_1': dict(opt['datasets']['val_unseen'], name='demo_val_unseen')}
    models = exp / 'models'
    test_opt['path'].update({f'pretrain_network_{n}': str(models / f'net_{n}_latest.pth')
                             for n in ('grm', 'dit', 'texture')})
    (workdir / 'test_ps.yml').write_text(yaml.safe_dump(test_opt, sort_keys=False))
    _run([osp.join(REPO, 'tools', 'test.py'), '-opt', 'test_ps.yml'], cwd=workdir)
    results = workdir / 'results' / 'demo_patchscaler_x4_test' / 'visualization' / 'demo_val_unseen'
    assert len(glob.glob(str(results / '*_compare.png'))) == 4 and len(glob.glob(str(results / '*_pgs.png'))) == 4

    proc = _run([osp.join(REPO, 'tools', 'infer.py'), '-i', str(workdir / 'demo' / 'val_unseen' / 'LR_x4'),
                 '-o', 'sr', '--opt', 'test_ps.yml', '--ckpt', str(exp), '--save-qmap', '--no-progress'], cwd=workdir)
    assert '4 image(s) written, 0 failed' in proc.stdout and '% saved)' in proc.stdout
    import cv2
    lr = cv2.imread(glob.glob(str(workdir / 'demo' / 'val_unseen' / 'LR_x4' / '*.png'))[0])
    sr = cv2.imread(glob.glob(str(workdir / 'sr' / '*_qmap.png'))[0].replace('_qmap', ''))
    assert sr.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)

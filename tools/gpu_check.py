"""The GPU check: what a first GPU machine must show, in one command, writing everything to one folder.

    bash tools/gpu_check.sh                      # on a GPU machine (installs carried wheels first, see below)
    python tools/gpu_check.py --device cpu --size tiny --out results/gpu_check_cpu   # the same steps on a CPU

First the environment (torch, CUDA, the device, native bf16, memory) is recorded. Steps (each one a subprocess of
the project's own tools, its log in ``<out>/<step>.log``; a failing step is recorded and the next one still runs):

1. ``gpu_tests``: ``pytest -m gpu`` (the tests that need CUDA; all skipped on a CPU).
2. ``demo_data``, ``rtm``: the demo set (``datasets/make_demo.py --out <out>/demo``) and its RTM
   (``tools/build_rtm.py``) from option files derived from ``options/demo/*``.
3. ``train``: both training stages (``tools/train.py``, stage ``full``: the GRM, then Patch-DiT with the texture
   prompt) for a few iterations with ``train.autocast: bf16``, one validation with PGS and pictures, a checkpoint.
4. ``benchmark_pgs``: ``tools/benchmark.py --parts pgs``: PGS vs uniform 20-step sampling, per-group and
   step-synchronous execution, with bf16 on the GPU.
5. ``benchmark_e2e``: ``tools/benchmark.py --parts e2e``: the pipeline end to end per stage with peak memory,
   uniform vs PGS per group vs PGS per step; on the GPU the paper-scale networks (random init, SD-VAE
   architecture) on 512 -> 2048.

``<out>/summary.md`` and ``summary.json`` list each step's status, seconds and its key lines; the benchmark
tables are in ``<out>/benchmark_*/benchmark.md``. ``--size tiny`` (the CPU check, in the test suite) shrinks
every step to seconds; ``--size full`` (the default on CUDA) is meant to take a few minutes on one GPU (not
measured yet: no GPU has been lent).
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

import yaml

REPO = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))

SIZES = {  # what each step runs at: tiny (CPU, seconds) and full (one GPU, minutes)
    'tiny': dict(candidates=200, rtm_size=32, total_iter=4, grm_iters=2, val_images=1, pgs_lr=64, pgs_model='tiny',
                 pgs_batch=64, e2e=['--e2e-size', 'demo', '--e2e-lr', '32', '--e2e-opt', '{test}'], repeats=1,
                 warmup=0),
    'full': dict(candidates=2000, rtm_size=256, total_iter=40, grm_iters=20, val_images=2, pgs_lr=512, pgs_model='S',
                 pgs_batch=256, e2e=['--e2e-size', 'paper', '--e2e-lr', '512'], repeats=3, warmup=1),
}


def _derived_options(args, size):
    """Option files for the steps, derived from the demo's: data under <out>/demo, outputs under <out>."""
    demo = osp.join(args.out, 'demo')
    rtm_file = osp.join(args.out, 'rtm', 'rtm_gpu_check.safetensors')
    with open(osp.join(REPO, 'options', 'demo', 'build_rtm_demo.yml')) as f:
        rtm = yaml.safe_load(f)
    rtm.update(name='rtm_gpu_check', sources=[osp.join(demo, 'train_HR.lmdb')], size=size['rtm_size'],
               output=rtm_file, device=args.device)
    rtm['candidates'] = dict(rtm['candidates'], num=size['candidates'])
    with open(osp.join(REPO, 'options', 'demo', 'train_patchscaler_demo.yml')) as f:
        train = yaml.safe_load(f)
    train.update(name='gpu_check_train', num_gpu=0 if args.device == 'cpu' else 1)
    train['rtm'] = dict(train['rtm'], path=rtm_file)
    train['sampler'] = osp.join(REPO, train['sampler'])
    train['datasets']['train']['dataroot_gt'] = osp.join(demo, 'train_HR.lmdb')
    val = train['datasets']['val']  # its first image is a 128x256 crop: a short validation
    train['datasets'] = {'train': train['datasets']['train'],
                         'val': dict(val, dataroot_lq=osp.join(demo, 'val', 'LR_x4'),
                                     dataroot_gt=osp.join(demo, 'val', 'HR'))}
    train['train'].update(total_iter=size['total_iter'], grm_iters=size['grm_iters'], autocast='bf16')
    train['train']['scheduler'] = dict(train['train']['scheduler'], periods=[size['total_iter']])
    train['val'].update(val_freq=10 ** 9, max_images=size['val_images'])  # once, at the end of training
    train['logger'].update(print_freq=1, save_checkpoint_freq=size['total_iter'], use_tb_logger=False)
    with open(osp.join(REPO, 'options', 'demo', 'test_patchscaler_demo.yml')) as f:
        test = yaml.safe_load(f)  # the e2e benchmark of the demo networks (random init) with this RTM
    test['rtm'] = dict(test['rtm'], path=rtm_file)
    test['sampler'] = osp.join(REPO, test['sampler'])
    folder = osp.join(args.out, 'options')
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, opt in (('build_rtm', rtm), ('train', train), ('test', test)):
        paths[name] = osp.join(folder, f'{name}.yml')
        with open(paths[name], 'w') as f:
            yaml.safe_dump(opt, f, sort_keys=False)
    return paths


def _environment(device):
    import torch
    info = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'device': device,
            'cuda_available': torch.cuda.is_available()}
    if device.startswith('cuda') and torch.cuda.is_available():
        info.update(name=torch.cuda.get_device_name(), native_bf16=torch.cuda.get_device_capability()[0] >= 8,
                    memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1))
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda', help='cuda (the check) or cpu (the same steps, to test them)')
    p.add_argument('--size', choices=sorted(SIZES), default=None, help='default: full on cuda, tiny on cpu')
    p.add_argument('--out', default='results/gpu_check')
    p.add_argument('--steps', nargs='+', default=None, help='run only these steps (names as in the docstring)')
    args = p.parse_args(argv)
    size = SIZES[args.size or ('tiny' if args.device == 'cpu' else 'full')]
    args.out = osp.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if args.device == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''  # the CPU check must not pick up a GPU of the machine
    py = sys.executable
    paths = _derived_options(args, size)
    bench = ['--device', args.device, '--repeats', str(size['repeats']), '--warmup', str(size['warmup'])]
    if args.device != 'cpu':
        bench.append('--bf16')
    steps = [
        ('gpu_tests', [py, '-m', 'pytest', '-q', '-m', 'gpu', '-p', 'no:cacheprovider', osp.join(REPO, 'tests')]),
        ('demo_data', [py, osp.join(REPO, 'datasets', 'make_demo.py'), '--out', osp.join(args.out, 'demo'),
                       '--overwrite']),
        ('rtm', [py, osp.join(REPO, 'tools', 'build_rtm.py'), '-opt', paths['build_rtm']]),
        ('train', [py, osp.join(REPO, 'tools', 'train.py'), '-opt', paths['train']]),
        ('benchmark_pgs', [py, osp.join(REPO, 'tools', 'benchmark.py'), '--parts', 'pgs', *bench,
                           '--lr-size', str(size['pgs_lr']), '--model', size['pgs_model'],
                           '--batch-size', str(size['pgs_batch']), '--shares', '0.4/0.3/0.3',
                           '--executions', 'per_group', 'per_step', '--out', osp.join(args.out, 'benchmark_pgs')]),
        ('benchmark_e2e', [py, osp.join(REPO, 'tools', 'benchmark.py'), '--parts', 'e2e', *bench,
                           *(a.format(**paths) for a in size['e2e']), '--executions', 'per_group', 'per_step',
                           '--batch-size', str(size['pgs_batch']), '--e2e-ckpt', '',
                           '--out', osp.join(args.out, 'benchmark_e2e')]),
    ]
    if args.steps:
        unknown = set(args.steps) - {name for name, _ in steps}
        if unknown:
            sys.exit(f'error: unknown step(s) {sorted(unknown)}; steps: {[name for name, _ in steps]}')
        steps = [s for s in steps if s[0] in args.steps]
    results = {'environment': _environment(args.device), 'steps': []}
    print(json.dumps(results['environment']), flush=True)
    for name, cmd in steps:
        start = time.perf_counter()
        log = osp.join(args.out, f'{name}.log')
        with open(log, 'w') as f:
            rc = subprocess.run(cmd, cwd=args.out, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
        with open(log) as f:
            tail = f.read().strip().splitlines()[-3:]
        results['steps'].append({'step': name, 'ok': rc == 0, 'returncode': rc, 'seconds': round(seconds, 1),
                                 'log': osp.basename(log), 'tail': tail})
        print(f"{name:14s} {'ok' if rc == 0 else f'FAILED ({rc})':12s} {seconds:7.1f} s   {log}", flush=True)
    with open(osp.join(args.out, 'summary.json'), 'w') as f:
        json.dump(results, f, indent=2)
    lines = ['# GPU check', '', f"`{json.dumps(results['environment'])}`", '', '| step | status | seconds |',
             '| --- | --- | ---: |']
    lines += [f"| {s['step']} | {'ok' if s['ok'] else 'FAILED'} | {s['seconds']:.1f} |" for s in results['steps']]
    for part in ('benchmark_pgs', 'benchmark_e2e'):
        table = osp.join(args.out, part, 'benchmark.md')
        if osp.isfile(table):
            with open(table) as f:
                lines += ['', f'## {part}', '', f.read()]
    with open(osp.join(args.out, 'summary.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print(f"written: {osp.join(args.out, 'summary.md')}")
    return 0 if all(s['ok'] for s in results['steps']) else 1


if __name__ == '__main__':
    sys.exit(main())

"""tools/gpu_check.py, the one command a GPU machine runs first, runs end to end on the CPU at tiny size: every step
(gpu tests, demo data, RTM, both training stages in bf16, the PGS and end-to-end benchmarks) passes and the
summary holds the per-step status and the benchmark tables, so the check is known to work before a GPU is lent."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_gpu_check_runs_on_the_cpu(tmp_path):
    out = tmp_path / 'gpu_check'
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'gpu_check.py'), '--device', 'cpu', '--out',
                           str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'OMP_NUM_THREADS': '2'})
    summary = json.loads((out / 'summary.json').read_text())
    failed = {s['step']: s['tail'] for s in summary['steps'] if not s['ok']}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-2000:], proc.stderr[-2000:])
    assert [s['step'] for s in summary['steps']] == ['gpu_tests', 'demo_data', 'rtm', 'train', 'benchmark_pgs',
                                                     'benchmark_e2e']
    models = list((out / 'experiments' / 'gpu_check_train' / 'models').glob('net_dit_*.pth'))
    assert models, 'the training step saved no Patch-DiT'
    pgs = json.loads((out / 'benchmark_pgs' / 'benchmark.json').read_text())['pgs']
    calls = {r['scenario']: r['denoiser_calls'] for r in pgs}
    assert calls['pgs shares 0.4/0.3/0.3 per_step'] < calls['pgs shares 0.4/0.3/0.3']  # steps shared across groups
    e2e = {r['variant']: r for r in json.loads((out / 'benchmark_e2e' / 'benchmark.json').read_text())['e2e']['rows']}
    assert e2e['PGS per_step']['nfe'] == e2e['PGS']['nfe'] and \
        e2e['PGS per_step']['denoiser_calls'] < e2e['PGS']['denoiser_calls']
    md = (out / 'summary.md').read_text()
    assert '| train | ok |' in md and '## benchmark_e2e' in md

"""tools/infer.py under torchrun: each file on exactly one rank, one summary from rank 0, the single run's images."""
import importlib.util
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, random_bgr, write_png

from patchscaler.inference import InferSummary
from patchscaler.utils.distributed import rank_device, torchrun_rank
from patchscaler.utils.errors import ConfigError

INFER = os.path.join(ROOT, 'tools', 'infer.py')
TORCHRUN_ENV = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')


def _infer(args, cwd, nproc=None):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    launch = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc)] if nproc else []
    return subprocess.run([sys.executable, *launch, INFER, *args, '--no-progress'], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.slow
def test_torchrun_shards_the_files_and_gathers_the_failures(trained, tmp_path):
    opt_path, _ = trained
    src = tmp_path / 'in'
    names = ['a.png', 'b.png', 'c.png', 'e.png', os.path.join('sub', 'f.png')]
    for i, name in enumerate(names):
        write_png(src / name, random_bgr(10 + i, 12, seed=i))
    (src / 'd_broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not a png')  # 4th of the sorted list: rank 1's
    proc = _infer(['-i', str(src), '-o', str(tmp_path / 'two'), '--opt', opt_path], tmp_path, nproc=2)
    assert proc.returncode != 0, proc.stderr  # because of the broken file ...
    assert proc.stdout.count('image(s) written') == 1, proc.stdout  # ... in rank 0's one summary of both
    assert '5 image(s) written, 1 failed by 2 processes' in proc.stdout, proc.stdout + proc.stderr
    failed = [ln for ln in proc.stderr.splitlines() if ln.startswith('failed:')]
    assert len(failed) == 1 and 'd_broken.png' in failed[0] and failed[0].endswith('(rank 1)'), proc.stderr
    written = sorted(os.path.relpath(os.path.join(d, f), tmp_path / 'two')
                     for d, _, fs in os.walk(tmp_path / 'two') for f in fs)
    assert written == sorted(names)  # every valid image once (5 written in all: none twice), no temporary left
    one = _infer(['-i', str(src), '-o', str(tmp_path / 'one'), '--opt', opt_path], tmp_path)
    assert one.returncode == 1 and '5 image(s) written, 1 failed\n' in one.stdout, one.stderr
    for name in names:
        a, b = (cv2.imread(str(tmp_path / run / name), cv2.IMREAD_UNCHANGED) for run in ('one', 'two'))
        assert np.array_equal(a, b), name


def test_without_torchrun_nothing_is_sharded(monkeypatch):
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    assert torchrun_rank() is None
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')  # torchrun --nproc_per_node 1: one process, as without torchrun
    assert torchrun_rank() is None
    monkeypatch.setenv('RANK', '3')
    monkeypatch.setenv('WORLD_SIZE', '4')
    monkeypatch.setenv('LOCAL_RANK', '1')
    assert torchrun_rank() == (3, 4, 1)
    monkeypatch.setenv('RANK', 'x')
    with pytest.raises(ConfigError, match='must be integers'):
        torchrun_rank()


def test_each_rank_gets_its_own_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert rank_device(None, 1) == torch.device('cpu') and rank_device('cpu', 1) == torch.device('cpu')
    with pytest.raises(ConfigError, match='sees no GPU'):
        rank_device('cuda', 0)
    with pytest.raises(ConfigError, match='would put every rank on one device'):
        rank_device('cuda:1', 0)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: None)
    assert rank_device(None, 1) == torch.device('cuda', 1)
    with pytest.raises(ConfigError, match='LOCAL_RANK 2 has no GPU'):
        rank_device('auto', 2)


def test_the_ranks_summaries_merge_into_one():
    parts = [InferSummary(written=['o/a.png'], nfe=10, nfe_uniform=20, seconds={'pgs': 1.0}, wall_s=3.0),
             InferSummary(written=['o/c.png'], failures=[('in/b.png', 'cannot decode image')], nfe=5,
                          nfe_uniform=10, seconds={'pgs': 2.0}, wall_s=4.0)]
    merged = InferSummary.merge(parts)
    assert merged.written == ['o/a.png', 'o/c.png'] and merged.failed_on == {'in/b.png': 1}
    assert (merged.nfe, merged.nfe_uniform, merged.seconds, merged.wall_s) == (15, 30, {'pgs': 3.0}, 4.0)
    lines = merged.lines()
    assert lines[0] == '2 image(s) written, 1 failed by 2 processes'
    assert lines[-1] == 'failed: in/b.png: cannot decode image (rank 1)'


def test_group_parallel_devices_are_refused_under_torchrun(monkeypatch, capsys, trained, tmp_path):
    """--devices spreads one image over devices; under torchrun each rank has one: an error line, no hang."""
    spec = importlib.util.spec_from_file_location('infer_tool', INFER)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for key, value in zip(TORCHRUN_ENV, ('1', '2', '1')):
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as e:
        tool.main(['-i', str(tmp_path), '-o', str(tmp_path / 'o'), '--opt', trained[0], '--devices', 'cpu,cpu'])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith('error: rank 1: under torchrun each rank runs its images on its own')

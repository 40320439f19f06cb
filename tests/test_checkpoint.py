"""Checkpoint files: atomic writes, and loads that refuse truncated files and arbitrary unpickling."""
import collections
import os
from collections import OrderedDict

import pytest
import torch

import patchscaler  # noqa: F401  (registration; conftest.py imports it before BasicSR)
from patchscaler.utils import checkpoint
from patchscaler.utils.checkpoint import atomic_save, explain_load_errors, safe_torch_load
from patchscaler.utils.errors import CheckpointError

Point = collections.namedtuple('Point', 'x y')


class CustomThing:
    """A class torch.load(weights_only=True) must refuse to unpickle."""

    def __init__(self, value):
        self.value = value


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {'params': OrderedDict(w=torch.randn(3, 4, generator=g), b=torch.randn(4, generator=g)),
            'iter': 12, 'names': ['a', 'b']}


def _leftovers(folder, keep):
    return sorted(f for f in os.listdir(folder) if f not in keep)


def test_atomic_save_round_trip(tmp_path):
    path = tmp_path / 'models' / 'net_g_10.pth'  # folder created on the way
    state = _state()
    atomic_save(state, str(path))
    loaded = safe_torch_load(str(path))
    assert loaded['iter'] == 12 and loaded['names'] == ['a', 'b']
    for k in ('w', 'b'):
        assert torch.equal(loaded['params'][k], state['params'][k])
    assert _leftovers(path.parent, {'net_g_10.pth'}) == []  # no temporary file left


def test_atomic_save_overwrites(tmp_path):
    path = str(tmp_path / 'x.state')
    atomic_save(_state(0), path)
    atomic_save(_state(1), path)
    assert torch.equal(safe_torch_load(path)['params']['w'], _state(1)['params']['w'])
    assert os.listdir(tmp_path) == ['x.state']


def test_atomic_save_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atomic_save({'a': torch.ones(1)}, 'rel.pth')
    assert torch.equal(safe_torch_load('rel.pth')['a'], torch.ones(1))


@pytest.mark.parametrize('exc', [RuntimeError('disk full'), KeyboardInterrupt()])
def test_failed_save_keeps_old_file(tmp_path, monkeypatch, exc):
    path = tmp_path / '100.state'
    atomic_save(_state(0), str(path))
    old_bytes = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, 'wb') as fh:
            fh.write(b'PK\x03\x04 partial checkpoint bytes')
        raise exc

    monkeypatch.setattr(checkpoint.torch, 'save', broken_save)
    with pytest.raises(type(exc)):
        atomic_save(_state(1), str(path))
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert torch.equal(safe_torch_load(str(path))['params']['w'], _state(0)['params']['w'])
    assert os.listdir(tmp_path) == ['100.state']  # the temporary file was removed


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(obj, f, *args, **kwargs):
        with open(f, 'wb') as fh:
            fh.write(b'partial')
        raise OSError('no space left on device')

    monkeypatch.setattr(checkpoint.torch, 'save', broken_save)
    with pytest.raises(OSError):
        atomic_save(_state(), str(tmp_path / 'net.pth'))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('keep', [0.5, 0.1, 0.0])
def test_truncated_checkpoint(tmp_path, keep):
    path = tmp_path / 'net.pth'
    atomic_save(_state(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(str(path))
    msg = str(info.value)
    assert str(path) in msg and 'truncated' in msg
    assert '\n' not in msg


@pytest.mark.parametrize('content', [
    b'version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 67040989\n',  # LFS pointer
    b'<!DOCTYPE html><html><body>404 Not Found</body></html>\n',  # a failed download
    b'\0' * 100])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / 'notes.pth'
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match='notes.pth'):
        safe_torch_load(str(path))


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / 'hello.pth'
    path.write_text('hello, this is text\n' * 20)
    with pytest.raises(CheckpointError, match='hello.pth'):
        safe_torch_load(str(path))


def test_custom_class_needs_unpickling(tmp_path):
    path = tmp_path / 'pickled.pth'
    torch.save({'params': {'w': torch.ones(2)}, 'extra': CustomThing(3)}, str(path))
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(str(path))
    msg = str(info.value)
    assert 'weights_only' in msg and str(path) in msg
    assert '\n' not in msg


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match='checkpoint not found'):
        safe_torch_load(str(tmp_path / 'nope.pth'))
    with pytest.raises(CheckpointError, match='checkpoint not found'):
        safe_torch_load(str(tmp_path))  # a folder is not a checkpoint file either


def test_explain_load_errors_passes_other_errors(tmp_path):
    path = tmp_path / 'ok.pth'
    atomic_save({'a': torch.ones(1)}, str(path))
    with pytest.raises(RuntimeError, match='size mismatch'), explain_load_errors(str(path)):
        raise RuntimeError('size mismatch for weight')
    with explain_load_errors(str(path)):
        value = safe_torch_load(str(path))
    assert torch.equal(value['a'], torch.ones(1))


def test_checkpoint_error_is_runtime_error():
    assert issubclass(CheckpointError, RuntimeError)


def test_base_model_save_and_load_network(tmp_path):
    """The compat-patched BaseModel writes networks atomically and loads them with one-line errors."""
    from basicsr.models.base_model import BaseModel

    class Tiny(BaseModel):
        def __init__(self):  # just enough of BaseModel for save/load_network
            self.opt = {'dist': False, 'num_gpu': 0, 'path': {'models': str(tmp_path)}}
            self.device = torch.device('cpu')

    model = Tiny()
    net = torch.nn.Linear(3, 2)
    model.save_network(net, 'net_g', 5)
    path = tmp_path / 'net_g_5.pth'
    assert _leftovers(tmp_path, {'net_g_5.pth'}) == []
    saved = safe_torch_load(str(path))
    assert set(saved['params']) == {'weight', 'bias'}
    other = torch.nn.Linear(3, 2)
    model.load_network(other, str(path))
    assert torch.equal(other.weight, net.weight)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match='truncated'):
        model.load_network(other, str(path))
    with pytest.raises(CheckpointError, match='not found'):
        model.load_network(other, str(tmp_path / 'missing.pth'))


def test_atomic_files_get_normal_permissions(tmp_path):
    """Not mkstemp's private 0600: a checkpoint or RTM on a shared disk is readable like any other file."""
    import stat
    mask = os.umask(0o022)
    try:
        atomic_save(_state(), str(tmp_path / 'net.pth'))
    finally:
        os.umask(mask)
    assert stat.S_IMODE(os.stat(tmp_path / 'net.pth').st_mode) == 0o644


def test_a_trusted_old_checkpoint_can_be_converted(tmp_path):
    """The refusal names the way out: ``python -m patchscaler.utils.checkpoint --trust OLD NEW`` keeps tensors and
    plain values (numpy ones converted, a scheduler's Counter kept), drops the rest by name, and the result loads
    with weights_only=True."""
    import collections
    import subprocess
    import sys

    import numpy as np
    old, new = tmp_path / 'old.pth', tmp_path / 'new.pth'
    torch.save({'params': {'w': torch.ones(2)}, 'iter': np.int64(7), 'lr': np.float64(0.5),
                'mean': np.zeros(3, np.float32), 'names': np.array(['a', 'b']), 'xy': Point(1, 2),
                (0, 'pair'): {1, 2}, 'dtype': torch.float16,
                'milestones': collections.Counter({10: 1}), 'extra': CustomThing(3)}, str(old))
    with pytest.raises(CheckpointError, match=f'--trust {old}'):
        safe_torch_load(str(old))
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, '-m', 'patchscaler.utils.checkpoint', '--trust', str(old), str(new)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint['extra'] (CustomThing)" in proc.stdout and "checkpoint['names'] (numpy <U1 array)" in proc.stdout
    state = safe_torch_load(str(new))
    assert torch.equal(state['params']['w'], torch.ones(2)) and state['iter'] == 7 and state['extra'] is None
    assert type(state['lr']) is float and state['xy'] == (1, 2) and state[(0, 'pair')] == {1, 2}
    assert state['dtype'] is torch.float16
    assert torch.equal(state['mean'], torch.zeros(3)) and isinstance(state['milestones'], collections.Counter)


@pytest.mark.slow
def test_kill_9_while_a_checkpoint_is_being_written(tmp_path):
    """A real SIGKILL in the middle of writing a large checkpoint over an older one: the final name still holds the
    older, complete checkpoint; the half-written temporary file has a name no loader picks."""
    import glob
    import signal
    import subprocess
    import sys
    import time
    path = tmp_path / 'net_g_latest.pth'
    torch.save({'params': {'w': torch.zeros(3)}}, str(path))
    code = ('import torch, patchscaler.utils.checkpoint as c; '
            f'c.atomic_save({{"params": {{"w": torch.ones(100_000_000)}}}}, {str(path)!r})')  # 400 MB
    proc = subprocess.Popen([sys.executable, '-c', code])
    deadline, killed_mid_write = time.time() + 120, False
    while proc.poll() is None and time.time() < deadline:
        tmp = glob.glob(str(tmp_path / '.net_g_latest.pth.*.tmp'))
        try:
            size = os.path.getsize(tmp[0]) if tmp else 0
        except FileNotFoundError:  # renamed in between: the write is complete
            size = 0
        if size > 1_000_000:
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_write = True
            break
        time.sleep(0.001)
    proc.wait()
    state = safe_torch_load(str(path))
    if killed_mid_write:
        assert proc.returncode == -signal.SIGKILL and torch.equal(state['params']['w'], torch.zeros(3))
        assert glob.glob(str(tmp_path / '.net_g_latest.pth.*.tmp'))  # the partial file, under its temporary name
    else:  # the write finished first (very fast disk): then the new file must be complete
        assert state['params']['w'].numel() == 100_000_000
    for f in glob.glob(str(tmp_path / '*')) + glob.glob(str(tmp_path / '.*.tmp')):
        os.remove(f)  # 400 MB: not kept in pytest's temporary folders


def test_a_full_disk_is_named_and_leaves_no_temporary(tmp_path, monkeypatch):
    """ENOSPC (and torch.save's 'enforce fail' when the disk has no room left) is 'no space left on <folder>'."""
    import errno
    import shutil

    from patchscaler.utils.checkpoint import atomic_write
    from patchscaler.utils.errors import DataError

    def full(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'part')
        raise OSError(errno.ENOSPC, 'No space left on device')
    with pytest.raises(DataError, match=f'no space left on {tmp_path} \\(writing a.png\\)'):
        atomic_write(str(tmp_path / 'a.png'), full)
    assert os.listdir(str(tmp_path)) == []

    def enforce_fail(tmp):
        raise RuntimeError('[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file')
    usage = shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: usage._replace(free=0))
    with pytest.raises(DataError, match='no space left on'):
        atomic_write(str(tmp_path / 'net.pth'), enforce_fail)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match='enforce fail'):  # a disk with room: the writer's own error
        atomic_write(str(tmp_path / 'net.pth'), enforce_fail)


def test_output_folders_are_checked_before_the_work(tmp_path, monkeypatch):
    import errno
    import tempfile

    from patchscaler.utils.checkpoint import writable_folder
    from patchscaler.utils.errors import DataError
    (tmp_path / 'file').write_text('x')
    with pytest.raises(DataError, match='-o .*file is a file, not a folder'):
        writable_folder(str(tmp_path / 'file'))
    with pytest.raises(DataError, match='file is a file, not a folder'):
        writable_folder(str(tmp_path / 'file' / 'sub'))
    (tmp_path / 'new').mkdir()
    writable_folder(str(tmp_path / 'new' / 'deep' / 'er'))
    assert os.listdir(str(tmp_path / 'new')) == []  # nothing made, the probe removed

    def read_only(*args, **kwargs):  # the tests run as root, which the mode bits do not stop
        raise OSError(errno.EROFS, 'Read-only file system')
    monkeypatch.setattr(tempfile, 'mkstemp', read_only)
    with pytest.raises(DataError, match='cannot write there \\(Read-only file system\\)'):
        writable_folder(str(tmp_path / 'new'))

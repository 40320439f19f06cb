"""Checkpoint files: atomic writes and loads that refuse arbitrary unpickling."""
import collections
import contextlib
import errno
import os
import pickle
import re
import shlex
import shutil
import tempfile
import zipfile

import torch

from .errors import CheckpointError, DataError


def _umask():
    """The process umask, read without changing it where the OS allows (os.umask() sets it, racing with
    threads that create files meanwhile)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def writable_folder(folder, what='-o'):
    """Check, before any work is done, that files can be written into ``folder`` (made later if it does not exist:
    the check probes its nearest existing parent and creates nothing): a path that is a file, or a read-only folder,
    is one :class:`DataError` naming it (found only after every image was computed before)."""
    probe_in = os.path.abspath(folder)
    while not os.path.exists(probe_in) and os.path.dirname(probe_in) != probe_in:
        probe_in = os.path.dirname(probe_in)
    if not os.path.isdir(probe_in):
        raise DataError(f'{what} {folder}: {probe_in} is a file, not a folder')
    try:
        fd, probe = tempfile.mkstemp(prefix='.write-check.', suffix='.tmp', dir=probe_in)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DataError(f'{what} {folder}: cannot write there ({e.strerror})') from None


def _disk_full(error, folder):
    """Whether a failed write failed because ``folder``'s file system is full (ENOSPC, or a writer such as
    torch.save that reports it as an 'enforce fail' RuntimeError while the disk has no room left)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return isinstance(error, (OSError, RuntimeError)) and shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def atomic_write(path, write):
    """``write(tmp)`` to a temporary file in the same folder as ``path``, fsync, then rename over ``path``.

    A kill at any moment leaves either the old complete file or the new complete file, never a truncated
    one; the temporary name (``.<name>.<random>.tmp``) never matches what a loader looks for. A full disk is
    one :class:`DataError` saying so (``no space left on <folder>``), the temporary removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    except OSError as e:
        if _disk_full(e, folder):
            raise DataError(f'no space left on {folder} (writing {os.path.basename(path)})') from None
        raise
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the permissions open() would (after write:
        # some writers, safetensors among them, replace the file)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if _disk_full(e, folder):
            raise DataError(f'no space left on {folder} (writing {os.path.basename(path)})') from None
        raise


_TEMPORARY = re.compile(r'^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$')  # mkstemp's 8 random characters


def is_temporary(name):
    """Whether a file name is one of :func:`atomic_write`'s temporaries (``.<name>.<random>.tmp``), or one an older
    version left with an image extension after it (``.<name>.<random>.tmp.png``): never an input."""
    return _TEMPORARY.match(os.path.basename(name)) is not None


def _fsync_dir(folder):
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """``torch.save`` through :func:`atomic_write`: resume never picks up a half-written checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


@contextlib.contextmanager
def explain_load_errors(path):
    """Turn the ways a checkpoint load fails into one :class:`CheckpointError` line."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        yield
    except pickle.UnpicklingError as e:
        if 'weights_only' not in str(e).lower() and 'weights only' not in str(e).lower():
            raise CheckpointError(f'{path} is not a torch checkpoint (or is truncated)') from None
        first = next((ln.strip() for ln in str(e).splitlines() if 'unsupported' in ln.lower()), 'see torch.load')
        raise CheckpointError(
            f'{path} needs arbitrary unpickling to load ({first}); PatchScaler loads checkpoints with '
            'weights_only=True only. If it is your own file and you trust it: python -m patchscaler.utils.checkpoint '
            f'--trust {shlex.quote(str(path))} <new.pth> re-saves its tensors and plain values') from None
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{path} is not a torch checkpoint or is truncated ({type(e).__name__})') from None
    except RuntimeError as e:
        if 'zip archive' in str(e) or 'PytorchStreamReader' in str(e):
            raise CheckpointError(f'{path} is truncated or not a torch checkpoint') from None
        raise


def safe_torch_load(path, map_location='cpu'):
    """``torch.load(path, weights_only=True)`` with one-line errors."""
    with explain_load_errors(path):
        return torch.load(path, map_location=map_location, weights_only=True)


def state_differences(own, state):
    """(missing, unexpected, shape differences) of a state dict ``state`` against a network's ``own``: sorted key
    lists, and ``'key (file shape) vs (model shape)'`` strings in ``own``'s order."""
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


def load_weights(net, path, param_key='params', strict=True, where='network'):
    """Load a BasicSR network file (``{param_key: state_dict}``) into ``net``, with one-line errors.

    ``param_key`` falls back to the other of 'params' / 'params_ema' when the file has only that one.
    A file written for another configuration (other shapes, other layers) is a :class:`CheckpointError`
    that names the first differences, not torch's page of size mismatches.
    """
    state = safe_torch_load(path)
    if isinstance(state, dict) and param_key not in state:
        other = {'params': 'params_ema', 'params_ema': 'params'}.get(param_key)
        param_key = other if other in state else param_key
    if isinstance(state, dict) and param_key in state:
        state = state[param_key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f'{path} holds no state_dict of tensors (under {param_key!r}) for {where}')
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    own = net.state_dict()
    missing, unexpected, shapes = state_differences(own, state)
    if shapes or (strict and (missing or unexpected)):
        parts = [f'{len(shapes)} shape(s) differ (file vs model), e.g. {shapes[0]}'] if shapes else []
        if strict and missing:
            parts.append(f'{len(missing)} missing, e.g. {missing[0]}')
        if strict and unexpected:
            parts.append(f'{len(unexpected)} unexpected, e.g. {unexpected[0]}')
        raise CheckpointError(f'{path} does not fit {where} ({"; ".join(parts)}): it was written for another '
                              f'configuration; use the option file it was trained with')
    if not strict and not set(state) & set(own):
        raise CheckpointError(f'{path} shares no parameter name with {where} (file: e.g. {next(iter(state), None)}; '
                              f'model: e.g. {next(iter(own), None)}): a non-strict load would load nothing. Convert '
                              f'the file first (for the published StableSR: tools/convert_stablesr.py)')
    if not strict and (missing or unexpected):
        from basicsr.utils import get_root_logger
        get_root_logger().warning(f'{where}: non-strict load of {path}: {len(set(state) & set(own))} of {len(own)} '
                                  f'tensors loaded; {len(missing)} missing (e.g. {missing[:1]}), {len(unexpected)} '
                                  f'unexpected (e.g. {unexpected[:1]})')
    net.load_state_dict(state, strict=strict)
    return net


_PLAIN = (bool, int, float, complex, str, bytes)


def _plain(obj, where, dropped):
    """``obj`` with only what ``weights_only=True`` loads: tensors, dtypes, devices, plain numbers and strings,
    and dicts/lists/tuples/sets of them. numpy values become Python numbers or tensors; subclasses of plain types
    (numpy's float64, a namedtuple) become the plain type; anything else is dropped (None) and named."""
    import numpy as np
    if torch.is_tensor(obj) or obj is None or isinstance(obj, (torch.dtype, torch.device)):
        return obj
    if isinstance(obj, np.generic):  # before the plain types: np.float64 is a float subclass
        return obj.item()
    for kind in _PLAIN:
        if isinstance(obj, kind):
            return obj if type(obj) is kind else kind(obj)
    if isinstance(obj, dict):  # OrderedDict and Counter (schedulers' milestones) keep their type: both load
        kind = type(obj) if type(obj) in (dict, collections.OrderedDict, collections.Counter) else dict
        out = kind()
        for k, v in obj.items():
            key = _plain(k, f'{where} key {k!r}', dropped)
            if key is None and k is not None:
                continue
            out[key] = _plain(v, f'{where}[{k!r}]', dropped)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [_plain(v, f'{where}[{i}]', dropped) for i, v in enumerate(obj)]
        kind = type(obj) if type(obj) in (list, tuple, set, frozenset) else (tuple if isinstance(obj, tuple)
                                                                             else list)
        return kind(items)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in 'biufc':
            return torch.from_numpy(np.ascontiguousarray(obj))
        dropped.append(f'{where} (numpy {obj.dtype} array)')
        return None
    dropped.append(f'{where} ({type(obj).__name__})')
    return None


def convert_untrusted(src, dst):
    """Load ``src`` with full unpickling (only for a file you trust), keep tensors and plain values, check in
    memory that the result loads with ``weights_only=True``, then write ``dst`` atomically. Returns what was
    dropped."""
    import io
    if not os.path.isfile(src):
        raise CheckpointError(f'checkpoint not found: {src}')
    try:
        obj = torch.load(src, map_location='cpu', weights_only=False)
    except (ImportError, AttributeError) as e:  # a class of the code that wrote it is not importable here
        raise CheckpointError(f'{src} cannot be unpickled here ({type(e).__name__}: {e}); run this where the '
                              f'code that wrote it is importable') from None
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile) as e:
        raise CheckpointError(f'{src} is not a torch checkpoint or is truncated ({type(e).__name__})') from None
    dropped = []
    plain = _plain(obj, 'checkpoint', dropped)
    buf = io.BytesIO()
    torch.save(plain, buf)
    buf.seek(0)
    try:
        torch.load(buf, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:  # a type this conversion does not know yet: nothing is written
        raise CheckpointError(f'{src}: the converted checkpoint still needs unpickling ({str(e).splitlines()[0]}); '
                              f'nothing written') from None
    atomic_save(plain, dst)
    return dropped


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description='Re-save a checkpoint that needs arbitrary unpickling as tensors and '
                                'plain values, so PatchScaler (weights_only=True) can load it. Unpickling runs code '
                                'from the file: only for files you trust.')
    p.add_argument('--trust', required=True, metavar='OLD', help='the checkpoint to convert (you trust it)')
    p.add_argument('new', help='where to write the converted checkpoint')
    args = p.parse_args(argv)
    try:
        dropped = convert_untrusted(args.trust, args.new)
    except CheckpointError as e:
        raise SystemExit(f'error: {e}') from None
    note = f'; dropped (not tensors or plain values): {", ".join(dropped)}' if dropped else ''
    print(f'wrote {args.new}{note}')


if __name__ == '__main__':
    main()

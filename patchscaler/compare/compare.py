"""Side-by-side comparison of SR models on one dataset: ``tools/compare.py -opt options/compare_x4.yml``.

The options name a paired dataset (BasicSR dataset options), the metrics (BasicSR metric options: the
same images and the same code for every model), and a list of models, each a test option file with its
weights (``path`` overrides its ``path`` section). Each model runs in its own process
(:mod:`patchscaler.compare.runner`), one after the other, so its runtime and peak memory are its own and a
model that fails (missing checkpoint, wrong option, out of memory, a crash) is reported as failed with its
reason while the others go on. ``results/<name>/`` then gets the table, the plot and the page
(:mod:`patchscaler.compare.report`).
"""
import json
import os
import shutil
import subprocess
import sys
from os import path as osp

from patchscaler.compare.report import slug, write_report
from patchscaler.utils.errors import ConfigError

TOP_KEYS = {'name', 'scale', 'device', 'dataset', 'metrics', 'models', 'max_images', 'warmup', 'crop', 'timeout',
            'plot_metric', 'results_root', 'qmap_model'}
MODEL_KEYS = {'name', 'opt', 'path'}


def check_compare_options(opt):
    """One-line errors for what the comparison options get wrong, before any model runs."""
    from patchscaler.utils.options_check import check_keys
    if not isinstance(opt, dict):
        raise ConfigError('the comparison options must be a mapping')
    check_keys('', opt, TOP_KEYS)
    for key in ('name', 'scale', 'dataset', 'models'):
        if key not in opt:
            raise ConfigError(f"the comparison options need '{key}'")
    for key, kind in (('warmup', int), ('max_images', int), ('timeout', (int, float)), ('crop', int)):
        if opt.get(key) is not None and (not isinstance(opt[key], kind) or isinstance(opt[key], bool) or opt[key] < 0):
            raise ConfigError(f'{key} must be a non-negative number, got {opt[key]!r}')
    metric_names = list(opt.get('metrics') or {})
    if opt.get('plot_metric') and opt['plot_metric'] not in metric_names:
        raise ConfigError(f"plot_metric {opt['plot_metric']!r} is not one of the metrics {metric_names}")
    if not isinstance(opt['models'], list) or not opt['models']:
        raise ConfigError('models must be a non-empty list of {name, opt, path}')
    names = []
    for i, m in enumerate(opt['models']):
        if not isinstance(m, dict) or 'name' not in m or 'opt' not in m:
            raise ConfigError(f'models[{i}] must be a mapping with name and opt (a test option file), got {m!r}')
        check_keys(f'models[{i}].', m, MODEL_KEYS)
        names.append(str(m['name']))
    folders = [slug(n) for n in ['Bicubic', 'HR', *names]]
    if len(set(folders)) != len(folders):
        raise ConfigError(f'model names must be unique as folder names ({folders[2:]}) and not Bicubic or HR (the '
                          f'references), got {names}')
    if opt.get('qmap_model') and opt['qmap_model'] not in names:
        raise ConfigError(f"qmap_model {opt['qmap_model']!r} is not one of the models {names}")
    ds = opt['dataset']
    if not isinstance(ds, dict) or 'type' not in ds:
        raise ConfigError('dataset must be BasicSR dataset options with a type (e.g. PairedSRDataset)')


def run_comparison(opt, root='.', device=None, progress=True):
    """Run every model of ``opt`` and write ``<results_root>/<name>/``; returns (rows, folder)."""
    from patchscaler.utils.device import resolve_device
    check_compare_options(opt)
    device = str(resolve_device(device or opt.get('device')))
    folder = osp.join(root, opt.get('results_root', 'results'), str(opt['name']))
    os.makedirs(folder, exist_ok=True)
    records, hr_dir = [], osp.join(folder, 'models', 'HR')
    shutil.rmtree(hr_dir, ignore_errors=True)
    reference = {'name': 'Bicubic', 'opt': 'bicubic'}  # first: it also writes the HR images the crops come from
    for m in [reference, *opt['models']]:
        out = osp.join(folder, 'models', slug(m['name']))
        shutil.rmtree(out, ignore_errors=True)  # no stale images or record of an earlier run
        os.makedirs(out)
        job = {'name': str(m['name']), 'opt': m['opt'], 'path': m.get('path') or {}, 'device': device,
               'dataset': opt['dataset'], 'scale': int(opt['scale']), 'metrics': opt.get('metrics') or {},
               'out': out, 'max_images': opt.get('max_images'), 'warmup': opt.get('warmup', 1),
               'hr_out': hr_dir if m is reference else None}
        job_file = osp.join(out, 'job.json')
        with open(job_file, 'w') as f:
            json.dump(job, f, indent=1)
        records.append(_run_job(job, job_file, opt.get('timeout'), progress))
    hr_files = {osp.splitext(f)[0]: osp.join(hr_dir, f) for f in sorted(os.listdir(hr_dir))} \
        if osp.isdir(hr_dir) else {}
    rows = write_report(opt, records, folder, hr_files)
    return rows, folder


def _run_job(job, job_file, timeout, progress):
    """The runner in a child process; its record, or a failed record saying how the process ended."""
    from patchscaler.compare.runner import write_record
    print(f"[compare] {job['name']}: {job['opt']}", file=sys.stderr, flush=True)
    cmd = [sys.executable, '-m', 'patchscaler.compare.runner', job_file]
    repo = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))  # importable from a checkout, too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get('PYTHONPATH')) if p))
    try:
        if progress:  # the child's progress bars and errors go to the terminal
            code = subprocess.run(cmd, env=env, timeout=timeout, stdout=subprocess.DEVNULL).returncode
        else:
            with open(osp.join(job['out'], 'stderr.log'), 'w') as log:
                code = subprocess.run(cmd, env=env, timeout=timeout, stderr=log, stdout=subprocess.DEVNULL).returncode
    except subprocess.TimeoutExpired:
        code = None
    record_file = osp.join(job['out'], 'record.json')
    if osp.isfile(record_file):
        with open(record_file) as f:
            record = json.load(f)
        if code == 0 or record.get('status') == 'failed':
            return record
    if code is None:
        reason = f'timed out after {timeout} s'
    elif code < 0:
        reason = f'the process was killed by signal {-code}' + (' (out of memory?)' if -code == 9 else '')
    else:
        reason = f'the process exited with status {code}'
    record = {'name': job['name'], 'status': 'failed', 'reason': reason, 'opt': job['opt'], 'images': []}
    write_record(job['out'], record)
    return record

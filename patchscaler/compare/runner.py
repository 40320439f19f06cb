"""Run one model of a comparison: a BasicSR test option file + its weights, on the comparison's images.

:func:`run_model` builds the model the way ``tools/test.py`` does (``build_model`` on the option file, with
the device and output folder of the comparison), feeds every image through ``feed_data`` / ``test`` and
writes ``<out>/record.json`` and one SR PNG per image (plus the Qmap/group overlay for a model that samples
with several PGS groups). Per image it records the metrics, the seconds of ``test()`` (CUDA-synchronised;
the first ``warmup`` images run once more untimed before, so lazy initialisation is not counted) and the
NFE (patch evaluations) with the uniform sampler's NFE when the model reports one.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the run; on CPU, the peak resident set size
of the process (``ru_maxrss``: Python, torch and the model included, so a floor of a few hundred MB).
Both are why :mod:`patchscaler.compare.compare` runs each model in its own process: the figures belong to
that model alone, and a crash or an out-of-memory kill fails that model only.

``python -m patchscaler.compare.runner job.json`` is that process's entry point.
"""
import json
import os
import resource
import sys
import time
import traceback
from os import path as osp

import torch

from patchscaler.data.image_io import write_image
from patchscaler.utils.errors import ConfigError, PatchScalerError


def model_options(opt_file, device, out_dir, path_overrides=None, dataset=None):
    """The parsed test options of ``opt_file`` for one device, as BasicSR's ``parse_options`` would make them,
    with the comparison's ``dataset`` as its test set and ``path_overrides`` applied, then checked."""
    from patchscaler.utils.cli import load_option_file
    from patchscaler.utils.options_check import check_options
    opt = dict(load_option_file(opt_file))
    opt['path'] = dict(opt.get('path') or {})
    opt['path'].update(path_overrides or {})
    if dataset is not None:
        opt['datasets'] = {'test_1': dict(dataset)}
    check_options(opt)
    opt.update(is_train=False, dist=False, rank=0, world_size=1, auto_resume=False,
               num_gpu=0 if torch.device(device).type == 'cpu' else 1)
    opt.setdefault('manual_seed', 0)
    opt['path'].update(results_root=out_dir, log=out_dir, visualization=osp.join(out_dir, 'visualization'))
    opt['val'] = dict(opt.get('val') or {}, save_img=False)
    return opt


class BicubicReference:
    """The reference every comparison starts with: the bicubic ×scale the diffusion models also start from
    (:func:`~patchscaler.models.pipeline.upsample_lr`), behind the BasicSR model interface the loop uses."""

    def __init__(self, scale, device):
        self.scale, self.device = int(scale), torch.device(device)

    def feed_data(self, data):
        self.lq = data['lq'].to(self.device)

    def test(self):
        from patchscaler.models.pipeline import upsample_lr
        self.output = upsample_lr(self.lq, self.scale)

    def get_current_visuals(self):
        return {'result': self.output.cpu()}


def _sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def _peak_memory_mb(device):
    if torch.device(device).type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_model(job):
    """``job``: name, opt (a test option file, or 'bicubic' for the reference), path (overrides), device,
    dataset (BasicSR options), scale, metrics, out, max_images, warmup, hr_out (where to write the HR images).
    Returns the record it writes to ``<out>/record.json``."""
    from basicsr.data import build_dataset
    from basicsr.metrics import calculate_metric
    from basicsr.models import build_model
    from basicsr.utils import set_random_seed, tensor2img

    from patchscaler.metrics import MetricUnavailable
    from patchscaler.utils.visualize import qmap_overlay

    out, device = job['out'], job['device']
    os.makedirs(out, exist_ok=True)
    if torch.device(device).type == 'cuda':
        index = torch.device(device).index
        device = f'cuda:{torch.cuda.current_device() if index is None else index}'  # set_device needs an index
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    if job['opt'] == 'bicubic':
        opt, model = {'model_type': 'bicubic'}, BicubicReference(job['scale'], device)
    else:
        opt = model_options(job['opt'], device, out, job.get('path'), job['dataset'])
        if int(opt['scale']) != int(job['scale']):
            raise ConfigError(f"{job['opt']} is a ×{opt['scale']} model; the comparison is ×{job['scale']}")
        set_random_seed(int(opt['manual_seed']))
        model = build_model(opt)
    dataset = build_dataset(dict(job['dataset'], phase='test', scale=int(job['scale'])))
    count = len(dataset) if not job.get('max_images') else min(len(dataset), int(job['max_images']))
    images, warm, unavailable = [], 0, {}
    from tqdm import tqdm
    for i in tqdm(range(count), desc=job['name'], unit='img', file=sys.stderr):
        item = dataset[i]
        name = osp.splitext(osp.basename(item['lq_path']))[0]
        if 'error' in item:
            images.append({'image': name, 'error': item['error']})
            continue
        data = {'lq': item['lq'][None], 'gt': item['gt'][None], 'lq_path': [item['lq_path']]}
        model.feed_data(data)
        if warm < int(job.get('warmup', 1)):
            model.test()
            warm += 1
        _sync(device)
        start = time.perf_counter()
        model.test()
        _sync(device)
        seconds = time.perf_counter() - start
        sr = tensor2img([model.get_current_visuals()['result']])
        gt = tensor2img([item['gt']])
        entry = {'image': name, 'seconds': seconds, 'file': f'{name}.png'}
        write_image(osp.join(out, entry['file']), sr)
        if job.get('hr_out'):
            write_image(osp.join(job['hr_out'], f'{name}.png'), gt)
        entry['metrics'], entry['metric_errors'] = {}, {}
        for m, mo in (job.get('metrics') or {}).items():
            if m in unavailable:
                continue
            try:  # one metric that cannot score this image (NIQE below 96 px) does not drop the others
                entry['metrics'][m] = float(calculate_metric({'img': sr, 'img2': gt}, dict(mo)))
            except MetricUnavailable as e:  # missing weight files: noted once for the model, not per image
                unavailable[m] = e.short
            except Exception as e:  # noqa: BLE001
                entry['metric_errors'][m] = f'{type(e).__name__}: {str(e).strip()[:200]}'
        report = getattr(model, 'report', None)
        if report is not None:
            entry.update(nfe=report.nfe_total, nfe_uniform=report.nfe_uniform,
                         groups=list(report.patches_per_group))
        sampler = getattr(model, 'sampler', None)
        if report is not None and sampler is not None and len(sampler.groups) > 1:
            entry['qmap_file'] = f'{name}_qmap.png'
            write_image(osp.join(out, entry['qmap_file']),
                        qmap_overlay(sr, report.qmap[0], report.groups[0], report.grid, sampler.group_names))
        images.append(entry)
    record = {'name': job['name'], 'status': 'ok', 'opt': job['opt'], 'device': str(device),
              'model_type': opt['model_type'], 'images': images, 'unavailable': unavailable,
              'peak_memory_mb': _peak_memory_mb(device),
              'peak_memory_kind': 'cuda_allocated' if torch.device(device).type == 'cuda' else 'process_rss'}
    if getattr(model, 'sampler', None) is not None and getattr(model, 'net_g', None) is not None \
            and hasattr(model.sampler, 'groups'):
        record['sampler'] = {'patch_size': model.sampler.patch_size, 'groups': model.sampler.groups}
    write_record(out, record)
    return record


def write_record(out, record):
    """``<out>/record.json``, written to a temporary name and renamed: a killed run leaves no half file."""
    os.makedirs(out, exist_ok=True)
    tmp = osp.join(out, 'record.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, osp.join(out, 'record.json'))


def main(job_file):
    with open(job_file) as f:
        job = json.load(f)
    try:
        run_model(job)
    except Exception as e:  # noqa: BLE001 - any failure of one model is a failed row; the comparison goes on
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
            reason = f'out of memory: {reason}'
        elif not isinstance(e, PatchScalerError):
            traceback.print_exc()
            reason = f'{type(e).__name__}: {reason}'
        write_record(job['out'], {'name': job['name'], 'status': 'failed', 'reason': reason, 'opt': job['opt'],
                                  'images': []})
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1]))

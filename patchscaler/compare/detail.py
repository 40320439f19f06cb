"""One evaluation of restored detail, what ``tools/evaluate_detail.py`` runs.

On the datasets of a PatchScaler test option file it runs, with the file's weights and one seed:

* ``bicubic`` and ``GRM`` (the decoded y_HR): the references a diffusion stage must improve on;
* ``PGS``: PatchScaler as configured (the file's sampler);
* ``uniform``: the same weights and seed with every patch sampled like the hard group (τ = T, N = 20 by
  default): the paper's "unified" sampling that PGS replaces;
* ``no prompt``: a second test file (``no_prompt``), a model trained without the texture prompt, when given.

Per set (:mod:`patchscaler.metrics.detail` for the measures): PSNR (RGB, mean over images, ``crop_border``
pixels off each side), PSNR over the pixels of simple-group patches (the PGS grading of that image, the same
pixels for every output), the high-frequency energy ratio to the HR and the spectrum distance of the high-pass
band (both pooled over the set), NIQE (BasicSR's; sets without class maps, i.e. photos) and NFE per image
(patch evaluations; the ratio to uniform sampling).

Per class, on sets with ``dataroot_labels`` (the known-answer task, ``datasets/make_texture_task.py``): PSNR,
energy ratio and spectrum distance over each class's pixels, eroded by ``margin`` pixels so that region borders
do not count, and the share of flat patches (patches whose HR pixels are all of the flat class) that the GRM's
confidence grades simple.

Writes ``detail.json``, ``detail.md`` and, per set, ``strip_<set>.png``: for the first images, bicubic / GRM /
PGS / uniform (/ no prompt) / HR / PGS groups, then the same HR window (the one with the most gradient energy)
of each at 2× so that grain and texture can be told apart by eye.
"""
import copy
import json
import math
import os
import sys
from os import path as osp

import cv2
import numpy as np

from patchscaler.data.image_io import write_image
from patchscaler.metrics.detail import DetailScores
from patchscaler.utils.errors import ConfigError, DataError

OUTPUTS = ('bicubic', 'GRM', 'PGS', 'uniform', 'no prompt')
CLASS_TABLES = (('psnr', 'PSNR per class', 2), ('hf_energy_ratio', 'HF energy ratio per class', 3),
                ('spectrum_distance_db', 'spectrum distance (dB) per class', 2))
DIGITS = {'hf_energy_ratio': 3, 'nfe_ratio': 3, 'nfe_per_image': 0}
MEASURES = ('psnr', 'psnr_simple', 'hf_energy_ratio', 'spectrum_distance_db', 'niqe', 'nfe_per_image', 'nfe_ratio')


def _sampler_dict(sampler):
    """The sampler section of a test file as a dict (it may be a path to ``options/samplers/*.yml``)."""
    from patchscaler.sampling.pgs import sampler_options
    sampler = sampler_options(sampler)
    if not isinstance(sampler, dict):
        raise ConfigError('the test file needs a sampler section (PGS options) to compare PGS with uniform sampling')
    return dict(sampler)


def uniform_pipeline(pipeline, sampler_opt, steps=None):
    """The pipeline with every patch sampled like the hardest group (τ and N of the last group, or ``steps``)."""
    from patchscaler.sampling import build_sampler
    tau, n = max(pipeline.sampler.groups)  # the hardest group: the largest τ (then the most steps)
    uniform = copy.copy(pipeline)
    opt = dict(sampler_opt, groups=[{'tau': tau, 'steps': int(steps or n)}], grouping=None)
    opt.pop('device_groups', None)
    uniform.sampler = build_sampler(opt)
    uniform.sampler.progress = pipeline.sampler.progress
    return uniform


def _window_row(images, labels, hr, crop=96, zoom=2):
    from patchscaler.compare.report import texture_window
    from patchscaler.utils.visualize import labelled_strip
    top, left, ch, cw = texture_window(hr, crop)
    tiles = [cv2.resize(im[top:top + ch, left:left + cw], (cw * zoom, ch * zoom), interpolation=cv2.INTER_NEAREST)
             for im in images]
    return labelled_strip(tiles, [f'{label} (x{zoom})' for label in labels])


def _stack(rows):
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 6), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])


def evaluate_detail(opt, no_prompt=None, device=None, ckpt=None, no_prompt_ckpt=None, seed=0, crop_border=4,
                    margin=8, max_images=None, strip_images=2, out_dir=None, uniform_steps=None, progress=True):
    """Run the evaluation of the module docstring on ``opt['datasets']``; returns the result dict (also written to
    ``out_dir`` when given). ``opt``/``no_prompt``: parsed test option dicts; ``ckpt``: a training run folder
    whose latest networks replace the file's weights (as ``tools/infer.py --ckpt``)."""
    from basicsr.utils import tensor2img
    from tqdm import tqdm

    from patchscaler.data.paired_image_dataset import PairedSRDataset
    from patchscaler.inference import load_pipeline
    from patchscaler.utils.visualize import group_legend, group_panel, labelled_strip

    pipes = {'PGS': load_pipeline(opt, device, ckpt)}
    if pipes['PGS'].denoiser is None:
        raise ConfigError('the test file has no diffusion stage (network_dit): nothing to evaluate beyond the GRM')
    pipes['uniform'] = uniform_pipeline(pipes['PGS'], _sampler_dict(opt.get('sampler')), uniform_steps)
    if no_prompt is not None:
        pipes['no prompt'] = load_pipeline(no_prompt, device, no_prompt_ckpt)
    factor, scale = pipes['PGS'].autoencoder.downscale_factor, int(opt['scale'])
    datasets = {k: v for k, v in (opt.get('datasets') or {}).items() if k.startswith(('test', 'val'))}
    if not datasets:
        raise ConfigError('the test file has no datasets (test_1, test_2, ...) to evaluate on')
    result = {'seed': seed, 'crop_border': crop_border, 'margin': margin, 'sets': {},
              'pgs': {'groups': [list(g) for g in pipes['PGS'].sampler.groups]},
              'uniform': {'groups': [list(g) for g in pipes['uniform'].sampler.groups]}}
    strips = {}
    for phase, ds_opt in datasets.items():
        ds_opt = dict(ds_opt, scale=scale, phase='test')
        name = ds_opt.get('name', phase)
        dataset = PairedSRDataset(ds_opt)
        scores, rows = DetailScores.for_dataset(scale, ds_opt, len(pipes['PGS'].sampler.groups)), []
        count = min(len(dataset), max_images) if max_images else len(dataset)
        skipped = []
        for index in tqdm(range(count), desc=f'detail {name}', unit='img', disable=not progress):
            item = dataset[index]
            if 'error' in item or 'gt' not in item:
                skipped.append(f"{item['lq_path']}: {item.get('error', 'no HR (dataroot_gt) to compare with')}")
                continue
            lq = item['lq'][None]
            hr = tensor2img([item['gt']])
            outs = {k: p(lq, seed=seed, return_grm=(k == 'PGS')) for k, p in pipes.items()}
            pgs = outs['PGS']
            images = {'bicubic': tensor2img([pgs.bicubic.cpu()]), 'GRM': tensor2img([pgs.grm.cpu()])}
            images.update({k: tensor2img([o.sr.cpu()]) for k, o in outs.items()})
            scores.add_image(images, hr, pgs.report.groups[0].numpy(), pgs.report.grid, factor, crop_border,
                             item['labels'].numpy() if 'labels' in item else None, margin,
                             {k: o.report.nfe_total for k, o in outs.items()})
            if len(rows) < 2 * strip_images:
                order = [k for k in OUTPUTS if k in images]
                tiles = [images[k] for k in order] + [hr, group_panel(images['GRM'], pgs.report.groups[0],
                                                                      pgs.report.grid)]
                legend = group_legend(pgs.report.groups[0], pgs.report.group_names)
                rows.append(labelled_strip(tiles, order + ['HR', f'groups: {legend}']))
                rows.append(_window_row([images[k] for k in order] + [hr], order + ['HR'], hr))
        if skipped:
            print(f'{name}: skipped {len(skipped)} image(s):\n  ' + '\n  '.join(skipped), file=sys.stderr)
        if not scores.images:
            raise DataError(f'{name}: no image could be scored ({len(skipped)} skipped, e.g. {skipped[0]})'
                            if skipped else f'{name}: the set is empty')
        result['sets'][name] = scores.result()
        result['sets'][name]['skipped'] = skipped
        if rows:
            strips[name] = _stack(rows)
    if out_dir:
        write_detail(result, strips, out_dir)
    return result


def _fmt(value, digits=2):
    if isinstance(value, dict):  # aggregated over runs: mean ± std
        return f"{_fmt(value['mean'], digits)} ± {_fmt(value['std'], digits)}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '–'
    return f'{value:.{digits}f}'


def _mean(value):
    return value['mean'] if isinstance(value, dict) else value


def aggregate_detail(results):
    """Several runs' results (e.g. one per training seed, same sets) as one: every number that differs between
    runs becomes ``{'mean', 'std', 'n'}`` (std with ddof 1, over the runs that have it); equal ones stay."""
    if not results:
        raise ConfigError('aggregate_detail: no results to aggregate')

    def merge(values):
        first = values[0]
        if isinstance(first, dict):
            return {k: merge([v.get(k) for v in values if isinstance(v, dict)]) for k in first}
        if isinstance(first, list) and all(isinstance(v, list) and len(v) == len(first) for v in values):
            return [merge([v[i] for v in values]) for i in range(len(first))]
        numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and
                   math.isfinite(v)]
        if not numbers or all(v == first for v in values):
            return first
        std = float(np.std(numbers, ddof=1)) if len(numbers) > 1 else float('nan')
        return {'mean': float(np.mean(numbers)), 'std': std, 'n': len(numbers)}
    out = merge(list(results))
    out['runs'] = len(results)
    return out


def detail_markdown(result):
    """The result as Markdown tables: one per set, one per class measure on labelled sets."""
    lines = [f"Mean ± std over {result['runs']} runs.", ''] if result.get('runs') else []
    heads = ('PSNR', 'PSNR simple', 'HF energy ratio', 'spectrum dist. (dB)', 'NIQE', 'NFE/image', 'NFE ratio')
    for name, s in result['sets'].items():
        shares = s.get('group_shares')
        share_text = f"; PGS groups {' / '.join(f'{100 * _mean(x):.0f}%' for x in shares)} (simple / … / hard)" \
            if shares else ''
        lines += [f'### {name} ({s["images"]} images{share_text})', '',
                  '| output | ' + ' | '.join(heads) + ' |', '|' + ' --- |' * (len(heads) + 1)]
        for out in OUTPUTS:
            row = s['outputs'].get(out)
            if row is None:
                continue
            cells = [_fmt(row.get(m), DIGITS.get(m, 2)) for m in MEASURES]
            lines.append(f'| {out} | ' + ' | '.join(cells) + ' |')
        lines.append('')
        if 'classes' in s:
            classes = list(s['classes'])
            simple = s['flat_patches_simple']
            simple = {k: 100 * v for k, v in simple.items() if k != 'n'} if isinstance(simple, dict) else \
                (None if simple is None else 100 * simple)
            lines.append(f'Flat patches graded simple: {_fmt(simple, 1)} % of '
                         f'{s["flat_patches"]}.')
            lines.append('')
            for measure, title, digits in CLASS_TABLES:
                lines += [f'{title}:', '', '| output | ' + ' | '.join(classes) + ' |',
                          '|' + ' --- |' * (len(classes) + 1)]
                for out in OUTPUTS:
                    if out not in s['classes'][classes[0]]:
                        continue
                    lines.append(f'| {out} | ' + ' | '.join(_fmt(s['classes'][c][out][measure], digits)
                                                            for c in classes) + ' |')
                lines.append('')
    return '\n'.join(lines)


def _finite(x):
    """NaN/inf -> None, so detail.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_detail(result, strips, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    with open(osp.join(out_dir, 'detail.json'), 'w') as f:
        json.dump(_finite(result), f, indent=1)
    with open(osp.join(out_dir, 'detail.md'), 'w') as f:
        f.write(detail_markdown(result) + '\n')
    for name, img in strips.items():
        write_image(osp.join(out_dir, f'strip_{name}.png'), img)


__all__ = ['evaluate_detail', 'aggregate_detail', 'detail_markdown', 'write_detail', 'uniform_pipeline']

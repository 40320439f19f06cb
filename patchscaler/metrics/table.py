"""One metric table per validation / test set: values per image and stage, means, and what could not be scored.

A validation block lists BasicSR metrics (``val.metrics``). :class:`MetricTable` scores each image with each of
them and keeps going when one cannot run:

- a metric whose weights or packages are missing (:class:`~patchscaler.metrics.iqa.MetricUnavailable`) is
  marked unavailable once, with the message that names the files, and not tried again;
- a metric that fails on one image (NIQE needs at least 96 px after the crop) is recorded for that image,
  the others still count;
- full-reference metrics (PSNR, SSIM, LPIPS) are skipped on images without HR, no-reference ones (NIQE, ManIQA,
  CLIPIQA, MUSIQ) are scored on every image, so an LR-only test set (RealSet110) gets a table too.

Stages: ``add`` takes the outputs to score under suffixes ('' = the model's SR; PatchScalerModel adds
'_grm' and '_bicubic'); means are keyed ``<metric><suffix>``, the form ``log_metrics`` reads.
"""
import csv
import json
import math
import os
import os.path as osp

from basicsr.metrics import calculate_metric
from basicsr.utils.registry import METRIC_REGISTRY

from patchscaler.metrics.iqa import MetricUnavailable, pyiqa_info

#: BasicSR metric types scored without a reference image (PatchScaler's own say so with ``fn.no_reference``)
NO_REFERENCE_TYPES = {'calculate_niqe'}
#: metric types where lower is better (used when the option gives no ``better``)
LOWER_IS_BETTER = {'calculate_niqe', 'calculate_lpips'}


def needs_reference(metric_opt):
    """Whether a ``val.metrics`` entry needs the HR image."""
    kind = metric_opt['type']
    if kind == 'calculate_pyiqa':
        no_reference = pyiqa_info(metric_opt.get('metric'))[0]
        return not no_reference
    return not (kind in NO_REFERENCE_TYPES or getattr(METRIC_REGISTRY.get(kind), 'no_reference', False))


def better(metric_opt):
    """'higher' or 'lower': the option's ``better``, else the metric's known direction."""
    if metric_opt.get('better'):
        return metric_opt['better']
    if metric_opt['type'] == 'calculate_pyiqa':
        return 'lower' if pyiqa_info(metric_opt.get('metric'))[1] else 'higher'
    return 'lower' if metric_opt['type'] in LOWER_IS_BETTER else 'higher'


class MetricTable:
    """Scores of one set. ``metrics``: {name: BasicSR metric options}."""

    def __init__(self, metrics):
        self.metrics = dict(metrics or {})
        self.rows = []            # [{'image': name, '<metric><suffix>': value, ...}]
        self.errors = []          # [(image, metric, message)]
        self.unavailable = {}     # metric -> message (names the files and where they come from)
        self.unavailable_short = {}  # metric -> one line

    def add(self, image, outputs, gt=None):
        """Score ``outputs`` ({suffix: BGR uint8 image}) of ``image`` against ``gt`` (or None)."""
        row = {'image': image}
        for name, opt in self.metrics.items():
            if name in self.unavailable or (gt is None and needs_reference(opt)):
                continue
            for suffix, img in outputs.items():
                try:
                    row[f'{name}{suffix}'] = float(calculate_metric({'img': img, 'img2': gt}, dict(opt)))
                except MetricUnavailable as e:
                    self.unavailable[name], self.unavailable_short[name] = str(e), e.short
                    break
                except Exception as e:  # noqa: BLE001  (one image a metric cannot score does not stop the set)
                    self.errors.append((image, f'{name}{suffix}', f'{type(e).__name__}: {str(e).strip()[:200]}'))
        self.rows.append(row)
        return row

    def means(self):
        """{'<metric><suffix>': mean over the images that have it (NaN left out; inf kept, as BasicSR does)}."""
        keys = [k for row in self.rows for k in row if k != 'image']
        out = {}
        for key in dict.fromkeys(keys):
            values = [row[key] for row in self.rows if key in row and not math.isnan(row[key])]
            if values:
                out[key] = sum(values) / len(values)
        return out

    def summary(self):
        """[(metric, mean or None, 'higher'/'lower', note)] for the final SR, one per configured metric."""
        means, out = self.means(), []
        for name, opt in self.metrics.items():
            counted = sum(name in row for row in self.rows)
            if name in self.unavailable:
                note = f'unavailable: {self.unavailable_short[name]}'
            elif name not in means and needs_reference(opt):
                note = 'no HR images'
            elif counted < len(self.rows):
                note = f'{counted} of {len(self.rows)} images'
            else:
                note = ''
            out.append((name, means.get(name), better(opt), note))
        return out

    def markdown(self, title):
        lines = [f'{title} ({len(self.rows)} images)', '', '| metric | mean | better | note |',
                 '| --- | ---: | --- | --- |']
        for name, mean, direction, note in self.summary():
            lines.append(f'| {name} | {"–" if mean is None else f"{mean:.4f}"} | {direction} | {note} |')
        if self.unavailable:
            lines += [''] + [f'    {line}' for msg in self.unavailable.values() for line in msg.split('\n')]
        return '\n'.join(lines)

    def save(self, folder, stem):
        """``<stem>.json`` (means, per-image values, errors, unavailable), ``<stem>.csv`` (per image),
        ``<stem>.md`` (the summary); returns the Markdown path."""
        os.makedirs(folder, exist_ok=True)
        record = {'means': self.means(), 'images': self.rows, 'unavailable': self.unavailable,
                  'errors': [{'image': i, 'metric': m, 'error': e} for i, m, e in self.errors],
                  'summary': [dict(zip(('metric', 'mean', 'better', 'note'), s)) for s in self.summary()]}
        with open(osp.join(folder, f'{stem}.json'), 'w') as f:
            json.dump(record, f, indent=1)
        columns = ['image'] + list(dict.fromkeys(k for row in self.rows for k in row if k != 'image'))
        with open(osp.join(folder, f'{stem}.csv'), 'w', newline='') as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(self.rows)
        path = osp.join(folder, f'{stem}.md')
        with open(path, 'w') as f:
            f.write(self.markdown(stem) + '\n')
        return path

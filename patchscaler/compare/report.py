"""What a comparison writes to ``results/<name>/``, from the runners' records.

* ``metrics.csv`` / ``metrics.json`` / ``metrics.md``: one row per model (bicubic first, as the reference):
  status (and the reason of a failure), images, the mean of every metric, seconds per image, peak memory,
  NFE per image and the uniform sampler's NFE when the model samples.
* ``runtime_quality.png``: seconds per image (log) against ``plot_metric`` (default: the first metric).
* ``report.html``: the table, the plot, and per image the same ``crop``×``crop`` HR window cut from bicubic,
  every model and HR side by side, with the Qmap/group overlay of ``qmap_model`` (default: the first model
  that has one). The window is where the HR image has the most gradient energy (the texture a reader wants
  to see), the same for every model. The page needs no network: images are files next to it, CSS inline.
"""
import csv
import html
import json
import sys
from os import path as osp
from urllib.parse import quote

import cv2
import numpy as np

from patchscaler.data.image_io import read_image_raw, write_image

HTML_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}.failed{color:#b00}
.row{display:flex;flex-wrap:nowrap;overflow-x:auto;gap:8px;margin:8px 0 4px}.cell{text-align:center;font-size:13px}
.cell img{width:150px;height:150px;image-rendering:pixelated;display:block;border:1px solid #999}
.qmap{max-width:100%;margin-bottom:24px}h2{margin-top:32px}
"""
# after load, the page records how many of its images decoded: what the headless-browser test reads
HTML_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', ok + '/' + imgs.length);
});
"""


def slug(name):
    """A model name as a folder name."""
    return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in str(name))


def summarise(record, metric_names):
    """One table row from a runner record."""
    ok = [im for im in record.get('images', []) if 'error' not in im]
    row = {'model': record['name'], 'status': record.get('status', 'failed'), 'reason': record.get('reason', ''),
           'images': len(ok)}
    if record.get('status') == 'ok':
        notes = []
        bad = [im['image'] for im in record.get('images', []) if 'error' in im]
        if bad:
            notes.append(f'{len(bad)} unreadable image(s) skipped: {", ".join(bad)}')
        for m, why in (record.get('unavailable') or {}).items():
            notes.append(f'{m} unavailable: {why}')
        for m in metric_names:
            missing = [im['image'] for im in ok if m in im.get('metric_errors', {})]
            if missing:
                notes.append(f'{m} not computable on {", ".join(missing)} '
                             f'({ok[[im["image"] for im in ok].index(missing[0])]["metric_errors"][m]})')
        row['reason'] = '; '.join(notes)
    for m in metric_names:
        vals = [im['metrics'][m] for im in ok if m in im.get('metrics', {})]
        row[m] = float(np.mean(vals)) if vals else None
    row['seconds_per_image'] = float(np.mean([im['seconds'] for im in ok])) if ok else None
    row['peak_memory_mb'] = record.get('peak_memory_mb')
    row['peak_memory_kind'] = record.get('peak_memory_kind')  # process_rss (CPU) or cuda_allocated
    nfe = [im['nfe'] for im in ok if 'nfe' in im]
    row['nfe_per_image'] = float(np.mean(nfe)) if nfe else None
    uni = [im['nfe_uniform'] for im in ok if 'nfe_uniform' in im]
    row['nfe_uniform_per_image'] = float(np.mean(uni)) if uni else None
    return row


DIGITS = {'seconds_per_image': 3, 'peak_memory_mb': 0, 'nfe_per_image': 0, 'nfe_uniform_per_image': 0}


def _fmt(v, key=None):
    """A table cell: metrics with 4 decimals, seconds with 3 significant digits, MB and NFE as integers."""
    if v is None:
        return '–'
    if not isinstance(v, float):
        return str(v)
    if key == 'seconds_per_image':
        return f'{v:.3g}'
    return f'{v:.{DIGITS.get(key, 4)}f}'


def write_tables(rows, folder):
    keys = list(rows[0])
    with open(osp.join(folder, 'metrics.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(osp.join(folder, 'metrics.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    shown = [k for k in keys if k not in ('reason', 'peak_memory_kind')]
    lines = ['| ' + ' | '.join(shown) + ' |', '|' + '---|' * len(shown)]
    for r in rows:
        cells = [_fmt(r[k], k) if r['status'] == 'ok' or k in ('model', 'status') else '–' for k in shown]
        if r['status'] != 'ok':
            cells[shown.index('status')] = f"failed: {r['reason']}"
        lines.append('| ' + ' | '.join(cells) + ' |')
    with open(osp.join(folder, 'metrics.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def write_plot(rows, metric, folder):
    """Seconds per image (log x) against ``metric``; failed models are named under the plot."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ok = [r for r in rows if r['status'] == 'ok' and r.get(metric) is not None and r['seconds_per_image']]
    for r in ok:
        ax.scatter(r['seconds_per_image'], r[metric], s=40)
        ax.annotate(r['model'], (r['seconds_per_image'], r[metric]), textcoords='offset points', xytext=(5, 4),
                    fontsize=9)
    ax.set_xscale('log')
    ax.set_xlabel('seconds per image (log scale)')
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    failed = [r['model'] for r in rows if r['status'] != 'ok']
    ax.set_title('runtime vs quality' + (f"  (failed: {', '.join(failed)})" if failed else ''), fontsize=10)
    fig.tight_layout()
    fig.savefig(osp.join(folder, 'runtime_quality.png'))
    plt.close(fig)


def texture_window(hr_bgr, crop):
    """(top, left) of the crop×crop window with the most gradient energy in the HR image."""
    gray = cv2.cvtColor(hr_bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
    energy = cv2.Sobel(gray, cv2.CV_32F, 1, 0) ** 2 + cv2.Sobel(gray, cv2.CV_32F, 0, 1) ** 2
    h, w = gray.shape
    ch, cw = min(crop, h), min(crop, w)
    integral = cv2.integral(energy)
    sums = integral[ch:, cw:] - integral[:-ch, cw:] - integral[ch:, :-cw] + integral[:-ch, :-cw]
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(top), int(left), ch, cw


def write_crops(image_names, sources, folder, crop):
    """Crops of every source (label -> folder with <image>.png) per image: {image: [(label, file)]}."""
    out = {}
    for name in image_names:
        hr = read_image_raw(sources['HR'][name], cv2.IMREAD_COLOR) if name in sources['HR'] else None
        if hr is None:
            continue
        top, left, ch, cw = texture_window(hr, crop)
        cells = []
        for label, files in sources.items():
            img = read_image_raw(files[name], cv2.IMREAD_COLOR) if name in files else None
            if img is None or img.shape[:2] != hr.shape[:2]:
                continue
            rel = osp.join('crops', name, f'{slug(label)}.png')
            write_image(osp.join(folder, rel), img[top:top + ch, left:left + cw])
            cells.append((label, rel))
        out[name] = cells
    return out


def _memory_note(rows):
    kinds = {r.get('peak_memory_kind') for r in rows if r['status'] == 'ok'} - {None}
    names = {'process_rss': 'peak resident memory of the model\'s process (CPU)',
             'cuda_allocated': 'peak CUDA memory allocated by torch'}
    return ', '.join(names.get(k, k) for k in sorted(kinds)) or 'not measured'


def write_html(opt, rows, crops, qmaps, folder):
    metric_names = list(opt.get('metrics') or {})
    head = ['model', 'status', 'images', *metric_names, 's / image', 'peak MB', 'NFE / image', 'uniform NFE']
    table = ['<table><tr>' + ''.join(f'<th>{html.escape(h)}</th>' for h in head) + '</tr>']
    for r in rows:
        if r['status'] != 'ok':
            table.append(f'<tr class="failed"><td>{html.escape(r["model"])}</td>'
                         f'<td colspan="{len(head) - 1}">failed: {html.escape(r["reason"])}</td></tr>')
            continue
        keys = ['model', 'status', 'images', *metric_names, 'seconds_per_image', 'peak_memory_mb', 'nfe_per_image',
                'nfe_uniform_per_image']
        table.append('<tr>' + ''.join(f'<td>{html.escape(_fmt(r[k], k))}</td>' for k in keys) + '</tr>')
    table.append('</table>')
    table += [f'<p class="note">{html.escape(r["model"])}: {html.escape(r["reason"])}</p>' for r in rows
              if r['status'] == 'ok' and r['reason']]
    body = [f'<h1>{html.escape(str(opt["name"]))}</h1>',
            f'<p>×{int(opt["scale"])} on <b>{html.escape(str(opt["dataset"].get("name", "")))}</b>; '
            f'crops of {int(opt.get("crop", 96))} px around the most textured HR window. Peak MB: '
            f'{_memory_note(rows)}; NFE: denoiser evaluations of one latent patch.</p>',
            *table, '<img src="runtime_quality.png" alt="runtime vs quality">']
    for name, cells in crops.items():
        body.append(f'<h2>{html.escape(name)}</h2><div class="row">')
        body += [f'<div class="cell"><img src="{html.escape(quote(rel))}" alt="{html.escape(label)}">'
                 f'{html.escape(label)}</div>' for label, rel in cells]
        body.append('</div>')
        if name in qmaps:
            label, rel = qmaps[name]
            body.append(f'<div class="cell">{html.escape(label)}: Qmap and PGS groups'
                        f'<br><img class="qmap" style="width:auto;height:auto" src="{html.escape(quote(rel))}" '
                        f'alt="Qmap"></div>')
    page = ('<!DOCTYPE html><html><head><meta charset="utf-8"><title>' + html.escape(str(opt['name'])) +
            f'</title><style>{HTML_STYLE}</style><script>{HTML_SCRIPT}</script></head><body>' +
            '\n'.join(body) + '</body></html>')
    with open(osp.join(folder, 'report.html'), 'w') as f:
        f.write(page)


def write_report(opt, records, folder, hr_files):
    """Every output of the comparison; returns the table rows. ``hr_files``: {image: HR png}, for the crops."""
    metric_names = list(opt.get('metrics') or {})
    rows = [summarise(r, metric_names) for r in records]
    write_tables(rows, folder)
    try:  # a plot that cannot be drawn must not cost the tables and the page
        write_plot(rows, opt.get('plot_metric') or (metric_names[0] if metric_names else 'psnr'), folder)
    except Exception as e:  # noqa: BLE001
        print(f'[compare] runtime_quality.png not written: {type(e).__name__}: {e}', file=sys.stderr)
    sources, qmaps = {}, {}
    for r in records:
        if r.get('status') != 'ok':
            continue
        base = osp.join(folder, 'models', slug(r['name']))
        sources[r['name']] = {im['image']: osp.join(base, im['file']) for im in r['images'] if 'file' in im}
        if (opt.get('qmap_model') in (None, r['name'])) and not qmaps:
            qmaps = {im['image']: (r['name'], osp.relpath(osp.join(base, im['qmap_file']), folder))
                     for im in r['images'] if 'qmap_file' in im}
    sources = {'HR': hr_files, **sources}
    names = sorted(hr_files)
    crops = write_crops(names, sources, folder, int(opt.get('crop', 96)))
    # HR goes last in each row, after the models
    crops = {n: [c for c in cells if c[0] != 'HR'] + [c for c in cells if c[0] == 'HR'] for n, cells in crops.items()}
    write_html(opt, rows, crops, qmaps, folder)
    return rows


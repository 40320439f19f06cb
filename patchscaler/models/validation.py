"""What PatchScalerModel's validation measures and writes: metrics per pipeline stage, the x0-prediction loss,
PGS statistics, pictures."""
from os import path as osp

import torch
import torch.nn.functional as F
from basicsr.utils import get_root_logger, tensor2img

from patchscaler.archs.autoencoder_arch import pad_to_multiple
from patchscaler.data.image_io import write_image
from patchscaler.metrics import better
from patchscaler.sampling.schedules import q_sample, to_x0_eps
from patchscaler.utils.visualize import confidence_to_bgr, labelled_strip, qmap_overlay, to_numpy

X0_FRACTIONS = (0.05, 0.25, 0.5, 0.8)  # where validation measures the x0-prediction loss, as fractions of T

# the pipeline's outputs a metric is computed for: final SR, the GRM's decoded y_HR, plain bicubic
STAGE_SUFFIXES = (('', 'PatchScaler'), ('_grm', 'GRM'), ('_bicubic', 'bicubic'))


def log_metrics(model, current_iter, dataset_name, tb_logger):
    """One line per metric: the final SR with its best so far, then the GRM and bicubic values and gains; a
    metric that could not run says why (missing weight files: which, and where to put them)."""
    table = getattr(model, 'metric_table', None)
    unavailable = table.unavailable if table is not None else {}
    if not model.metric_results and not unavailable:
        return
    for metric_opt in (model.opt['val'].get('metrics') or {}).values():
        metric_opt.setdefault('better', better(metric_opt))  # LPIPS and NIQE: lower (BasicSR assumes higher)
    model._initialize_best_metric_results(dataset_name)
    lines = [f'Validation {dataset_name}']
    for metric, best in model.best_metric_results[dataset_name].items():
        value = model.metric_results.get(metric)
        if metric in unavailable:
            lines.append(f'\t # {metric}: unavailable ({table.unavailable_short[metric]}; '
                         f'python -m patchscaler.metrics lists the files and their sources)')
        if value is None:
            continue
        model._update_best_metric_result(dataset_name, metric, value, current_iter)
        others = []
        for suffix, label in STAGE_SUFFIXES[1:]:
            ref = model.metric_results.get(f'{metric}{suffix}')
            if ref is not None:
                gain = value - ref if best['better'] == 'higher' else ref - value  # positive = better
                others.append(f'{label}: {ref:.4f}, gain {gain:+.4f}')
        lines.append(f'\t # {metric}: {value:.4f}\t({"; ".join(others)})'
                     f'\tBest: {best["val"]:.4f} @ {best["iter"]} iter')
    get_root_logger().info('\n'.join(lines))
    if tb_logger:
        for metric, value in model.metric_results.items():
            tb_logger.add_scalar(f'metrics/{dataset_name}/{metric}', value, current_iter)


def save_metric_table(model, table, dataset_name):
    """tools/test.py: the set's metric table as ``results/<name>/metrics_<set>.{md,json,csv}``, also printed."""
    folder = model.opt['path'].get('results_root') or model.opt['path']['visualization']
    path = table.save(folder, f'metrics_{dataset_name}')
    get_root_logger().info(f'{table.markdown(f"{model.method_name} on {dataset_name}")}\n(saved to {path} and '
                           f'.json/.csv beside it)')


def x0_timesteps(alphas_cumprod):
    """Where validation measures the x0-prediction loss: 5, 25, 50 and 80 % of the way to T."""
    t_max = len(alphas_cumprod)
    return tuple(max(0, round(f * t_max) - 1) for f in X0_FRACTIONS)


@torch.no_grad()
def x0_errors(model):
    """The x0-prediction loss on ``model``'s last validation image, at fixed timesteps and noise: MSE to the HR
    latent of the denoiser's x0 (its output converted by its prediction type) from x_t (Eq. 4) at each of
    :func:`x0_timesteps`, then of y0 itself (what it must beat). Deterministic, so successive validations show
    whether the diffusion stage is learning. Uses the latents of the model's last ``test()`` and the pipeline's
    (tiled) encoder."""
    net = model.net_g_ema if model.net_g_ema is not None else model.get_bare_model(model.net_g)
    pipe, v = model.pipeline(), net.patch_size
    x_hr = pipe.encode(pad_to_multiple(model.gt, model.autoencoder.downscale_factor)[0])
    sources = {'y0': model.y_hr, 'y_lr': model.y_lr}
    keys = sorted({'y0', *getattr(net, 'cond_keys', ('y0',))})
    h, w = min(x_hr.shape[-2], model.y_hr.shape[-2]), min(x_hr.shape[-1], model.y_hr.shape[-1])
    if h < v or w < v:
        return torch.full((len(X0_FRACTIONS) + 1,), float('nan'))
    crops = [(t, le) for t in range(0, h - v + 1, v) for le in range(0, w - v + 1, v)]

    def cut(z):
        return torch.cat([z[..., t:t + v, le:le + v] for t, le in crops])
    x0, given = cut(x_hr), {k: cut(sources[k]) for k in keys}
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(x0)
    sums = torch.zeros(len(X0_FRACTIONS))
    timesteps = x0_timesteps(model.alphas_cumprod)
    for i in range(0, len(x0), model.sampler.batch_size):
        sl = slice(i, i + model.sampler.batch_size)
        xb, nb = x0[sl], noise[sl]
        cond = {k: given[k][sl] for k in getattr(net, 'cond_keys', ('y0',))}
        if model.rtm is not None:
            cond.update(net.encode_prompt(*model.rtm.query(given['y0'][sl])))
        for j, t in enumerate(timesteps):
            tt = torch.full((len(xb),), t, device=xb.device, dtype=torch.long)
            a_bar = model.alphas_cumprod[t]
            x_t = q_sample(xb, nb, a_bar)
            with pipe._autocast():
                pred = net(x_t, tt, cond)
            pred = to_x0_eps(pred.float(), x_t, a_bar, getattr(net, 'prediction_type', 'sample'))[0]
            sums[j] += F.mse_loss(pred, xb, reduction='sum').cpu()
    return torch.cat([sums / x0.numel(), F.mse_loss(given['y0'], x0).cpu()[None]])


def log_x0_errors(errors, timesteps, dataset_name, current_iter, tb_logger):
    """x0-prediction MSE per timestep (and of y0 alone, the last entry), as one log line and TensorBoard scalars."""
    parts = ', '.join(f't={t}: {e:.3e}' for t, e in zip(timesteps, errors.tolist()))
    get_root_logger().info(f'x0-prediction MSE on {dataset_name} (fixed noise): {parts}; y0 itself: '
                           f'{float(errors[-1]):.3e}')
    if tb_logger:
        for t, e in zip(timesteps, errors.tolist()):
            tb_logger.add_scalar(f'x0_mse/{dataset_name}/t{t}', e, current_iter)
        tb_logger.add_scalar(f'x0_mse/{dataset_name}/y0', float(errors[-1]), current_iter)


def log_pgs(sampler, groups, dataset_name, current_iter, tb_logger, nfe_done=None, seconds=None, images=0):
    """Group shares and NFE against uniform sampling; with a diffusion run, NFE done and time per image."""
    nfe, uniform = sampler.nfe(groups)
    shares = [float((groups == g).float().mean()) for g in range(len(sampler.groups))]
    parts = ', '.join(f'{n} {100 * f:.1f}%' for n, f in zip(sampler.group_names, shares))
    line = (f'PGS grading of {dataset_name} ({groups.numel()} patches of {sampler.patch_size}² latent): {parts}; '
            f'NFE {nfe} vs {uniform} uniform = {nfe / max(uniform, 1):.2f}x')
    if nfe_done is not None and images:
        line += f'; sampled {nfe_done / images:.0f} patch evaluations and {seconds / images:.2f} s per image'
    get_root_logger().info(line)
    if tb_logger:
        tb_logger.add_scalar(f'pgs/{dataset_name}/nfe_ratio', nfe / max(uniform, 1), current_iter)
        for n, f in zip(sampler.group_names, shares):
            tb_logger.add_scalar(f'pgs/{dataset_name}/share_{n}', f, current_iter)
        if nfe_done is not None and images:
            tb_logger.add_scalar(f'pgs/{dataset_name}/seconds_per_image', seconds / images, current_iter)


def detail_scores(model, dataset_opt):
    """A :class:`~patchscaler.metrics.detail.DetailScores` for one validation set (per class when it has class
    maps), or None when the model has no diffusion stage to judge."""
    from patchscaler.metrics.detail import DetailScores
    if model.net_g is None or model.sampler is None:
        return None
    return DetailScores.for_dataset(model.scale, dataset_opt, len(model.sampler.groups))


def add_detail(model, scores, visuals, sr_img, labels=None):
    """Score the last validation image: the diffusion output, the GRM (where there is one) and bicubic against the
    HR, on the PGS grading."""
    if scores is None or 'gt' not in visuals or model.pgs_groups is None:
        return
    groups, _, _, grid = model.pgs_groups
    images = {'PGS': sr_img}  # the diffusion output (PatchScaler's, or StableSR's without a GRM)
    images.update({name: tensor2img([visuals[key]]) for name, key in (('GRM', 'grm'), ('bicubic', 'bicubic'))
                   if key in visuals})
    nfe = {'PGS': model.report.nfe_total} if model.report is not None else None
    scores.add_image(images, tensor2img([visuals['gt']]), to_numpy(groups[0]), grid, model.autoencoder.downscale_factor,
                     labels=None if labels is None else to_numpy(labels[0]), nfe=nfe)


def log_detail(scores, dataset_name, current_iter, tb_logger):
    """One line per output of the detail measures (:mod:`patchscaler.metrics.detail`), per class on labelled sets."""
    if scores is None or not scores.images:
        return
    r = scores.result()

    def fmt(row):
        parts = [f'PSNR {row["psnr"]:.2f}', f'simple {row["psnr_simple"]:.2f}', f'HF {row["hf_energy_ratio"]:.3f}',
                 f'spectrum {row["spectrum_distance_db"]:.2f} dB']
        if row.get('niqe') is not None:
            parts.append(f'NIQE {row["niqe"]:.2f}')
        return ', '.join(parts)
    lines = [f'Detail on {dataset_name} (RGB, crop 4; simple = pixels of simple-group patches):']
    lines += [f'\t # {name}: {fmt(row)}' for name, row in r['outputs'].items()]
    for cls, rows in r.get('classes', {}).items():
        lines.append(f'\t # class {cls}: ' + '; '.join(
            f'{name} PSNR {v["psnr"]:.2f} HF {v["hf_energy_ratio"]:.3f} spectrum {v["spectrum_distance_db"]:.2f} dB'
            for name, v in rows.items()))
    if 'flat_patches' in r:
        lines.append(f'\t # flat patches graded simple: {100 * r["flat_patches_simple"]:.1f} % of {r["flat_patches"]}')
    get_root_logger().info('\n'.join(lines))
    if tb_logger:
        for name, row in r['outputs'].items():
            for key in ('psnr', 'psnr_simple', 'hf_energy_ratio', 'spectrum_distance_db', 'niqe'):
                if row.get(key) is not None and row[key] == row[key]:
                    tb_logger.add_scalar(f'detail/{dataset_name}/{name}/{key}', row[key], current_iter)


def save_visuals(model, visuals, sr_img, name, dataset_name, current_iter):
    """SR image, confidence map, a strip (bicubic / GRM / PatchScaler / HR / confidence), the Qmap overlay; the
    pieces a model does not have (no GRM: no confidence) are left out."""
    opt = model.opt
    if opt['is_train']:
        folder, stem = osp.join(opt['path']['visualization'], name), f'{name}_{current_iter}'
    else:
        folder = osp.join(opt['path']['visualization'], dataset_name)
        stem = f'{name}_{opt["val"].get("suffix") or opt["name"]}'
    write_image(osp.join(folder, f'{stem}.png'), sr_img)
    h, w = sr_img.shape[:2]
    extra, extra_labels = [], []
    if 'confidence' in visuals:
        conf_img = confidence_to_bgr(visuals['confidence'][0].numpy(), size=(w, h))
        write_image(osp.join(folder, f'{stem}_confidence.png'), conf_img)
        extra, extra_labels = [conf_img], ['confidence C']
    tiles, labels = [tensor2img([visuals['bicubic']])], ['bicubic']
    if 'grm' in visuals:
        tiles.append(tensor2img([visuals['grm']]))
        labels.append('GRM y_HR')
    tiles.append(sr_img)
    labels.append(model.method_name if model.net_g is not None else 'GRM y_HR')
    if 'gt' in visuals:
        tiles.append(tensor2img([visuals['gt']]))
        labels.append('HR')
    write_image(osp.join(folder, f'{stem}_compare.png'), labelled_strip(tiles + extra, labels + extra_labels))
    if model.pgs_groups is not None:
        groups, qmap, _, grid = model.pgs_groups
        write_image(osp.join(folder, f'{stem}_pgs.png'),
                    qmap_overlay(sr_img, qmap[0], groups[0], grid, model.sampler.group_names))

"""Image files in, SR image files out: what ``tools/infer.py`` runs.

:func:`load_pipeline` builds the networks of a test option file (the same keys as training), loads their
weights (``path.pretrain_network_*`` or a ``--ckpt`` folder of ``net_grm``/``net_dit``/``net_texture``
files, EMA weights first) and returns a :class:`PatchScalerPipeline`. A StableSR test file (``StableSRModel``)
gets its ``StableSRUNet`` (``net_g``) as the denoiser, with its sampler (default: StableSR's), and the GRM only
where it has one (StableSR+PGS). :func:`infer_paths` runs it on
files or folders:

* any size (the autoencoder tiles above ``tile`` px; PGS is patch-wise), down to the model's minimum
  (a 2×2 latent): smaller images fail with one line;
* grayscale in -> grayscale out (the channel mean of the SR); RGBA -> the RGB is super-resolved and the
  alpha channel is upscaled separately (bicubic); 16-bit in -> 16-bit PNG out; EXIF rotation applied;
* a file that cannot be read or processed is listed at the end, and the rest are still processed;
* ``shard=(rank, world)``: only every world-th image from the rank-th on (of the whole sorted list, so the output
  names are the single run's); ``torchrun`` runs one shard per process (:mod:`patchscaler.utils.distributed`).

Group-parallel PGS (``devices``): the sampler section's ``device_groups`` lists the groups per device,
``device_split`` names a placement (:data:`patchscaler.sampling.pgs.DEVICE_SPLITS`); see
:func:`build_inference_sampler`.
"""
import glob
import os
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from patchscaler.data.image_io import IMG_EXTENSIONS, is_image_name, read_image, write_image
from patchscaler.utils.checkpoint import is_temporary
from patchscaler.utils.device import resolve_device
from patchscaler.utils.errors import CheckpointError, ConfigError, DataError, PatchScalerError

NETWORKS = ('grm', 'dit', 'texture', 'g')  # net_g: a StableSRModel run's StableSRUNet



def checkpoint_files(ckpt):
    """``{network: file}`` from a folder of BasicSR checkpoints (``models/`` or the experiment folder): the
    ``_latest`` files when present, else the highest iteration."""
    folder = os.path.join(ckpt, 'models') if os.path.isdir(os.path.join(ckpt, 'models')) else ckpt
    if not os.path.isdir(folder):
        raise CheckpointError(f'--ckpt {ckpt} is not a folder of net_grm_*.pth / net_dit_*.pth files')
    found = {}
    for name in NETWORKS:
        latest = os.path.join(folder, f'net_{name}_latest.pth')
        numbered = [(int(f.rsplit('_', 1)[1][:-4]), f) for f in glob.glob(os.path.join(folder, f'net_{name}_*.pth'))
                    if f.rsplit('_', 1)[1][:-4].isdigit()]
        if os.path.isfile(latest):
            found[name] = latest
        elif numbered:
            found[name] = max(numbered)[1]
    return found


def build_inference_sampler(opt, denoiser, devices=None, device_split=None):
    """The sampler of ``opt`` (its ``sampler`` section or file, else the paper's PGS at the denoiser's V) for
    ``devices`` (``--devices`` / ``pgs_devices``, else the section's own): the section's ``device_groups`` or
    ``device_split`` place the groups on them (:meth:`PatchGroupSampler.place`, once the pipeline has the
    devices); ``device_split`` given here (``--device-split``) replaces both. A placement without devices is an
    error here: it would place nothing."""
    from patchscaler.models.pipeline_options import build_sampler_for
    from patchscaler.sampling.pgs import sampler_options
    section = opt.get('sampler')
    if isinstance(section, str) and not os.path.isfile(section):
        raise ConfigError(f'sampler file not found: {section}')
    sopt = sampler_options(section) if section else {'type': 'PatchGroupSampler', 'patch_size': denoiser.patch_size}
    if not isinstance(sopt, dict):
        return build_sampler_for(opt, denoiser)  # its one-line error
    sopt = dict(sopt)
    if device_split is not None:  # checked by the sampler, like the file's own
        sopt.pop('device_groups', None)
        sopt['device_split'] = device_split
    split = sopt.get('device_split')
    placed = sopt.get('device_groups') is not None or split not in (None, 'lpt')
    if placed and not (devices or sopt.get('devices')):
        raise ConfigError(f'{"sampler.device_groups" if split is None else "device_split"} places groups on devices '
                          f'and none are given: pass --devices cuda:0,cuda:1 (or pgs_devices in the option file)')
    return build_sampler_for(dict(opt, sampler=sopt), denoiser)


def load_pipeline(opt, device=None, ckpt=None, color_fix=None, tile=None, progress=False, devices=None,
                  device_split=None):
    """The pipeline of a parsed option dict, with weights loaded; see the module docstring. ``devices``,
    ``device_split``: group-parallel PGS, see :func:`build_inference_sampler`."""
    from basicsr.archs import build_network

    from patchscaler.archs.autoencoder_arch import build_autoencoder
    from patchscaler.models.pipeline import PatchScalerPipeline
    from patchscaler.models.pipeline_options import speed_options
    from patchscaler.models.prompted_dit import build_denoiser, build_rtm_for
    from patchscaler.utils.checkpoint import load_weights
    from patchscaler.utils.options_check import check_networks
    stablesr = is_stablesr(opt)
    required = ('scale', 'autoencoder', 'network_g') if stablesr else ('scale', 'autoencoder', 'network_grm')
    for key in required:
        if key not in opt:
            example = 'options/stablesr/test_stablesr_x4.yml' if stablesr else 'options/test_patchscaler.yml'
            raise ConfigError(f"the option file has no '{key}' (use a test file such as {example})")
    check_networks(opt)  # a misspelt network argument is one line, not a TypeError from a constructor
    device = resolve_device(device)
    autoencoder = build_autoencoder(opt['autoencoder']).to(device)
    grm = build_network(dict(opt['network_grm'])) if opt.get('network_grm') else None
    nets = {'grm': grm} if grm is not None else {}
    if stablesr:  # StableSR (+PGS with a GRM): the UNet samples, the GRM (if any) gives y0 and the groups
        from patchscaler.models.stablesr_model import stablesr_sampler_options
        denoiser = nets['g'] = build_network(dict(opt['network_g']))
        if not opt.get('sampler'):
            opt = dict(opt, sampler=stablesr_sampler_options(denoiser.patch_size, denoiser.prediction_type))
    else:
        denoiser = build_denoiser(opt)
        if denoiser is not None:
            nets['dit'] = denoiser.dit
            if denoiser.texture_encoder is not None:
                nets['texture'] = denoiser.texture_encoder
    files = checkpoint_files(os.path.expanduser(ckpt)) if ckpt else {}
    path = opt.get('path') or {}
    if ckpt and set(nets) - set(files) - ({'grm'} if stablesr else set()):  # StableSR+PGS: the GRM is another run's
        raise CheckpointError(f'--ckpt {ckpt} has no net_{sorted(set(nets) - set(files))[0]}_*.pth; networks of '
                              f'different runs are not mixed')
    for name, net in nets.items():
        file = files.get(name) or path.get(f'pretrain_network_{name}')
        file = os.path.expanduser(file) if isinstance(file, str) else file  # ~ as test.py (BasicSR) expands it
        if not file:
            raise CheckpointError(f'no weights for network_{name}: set path.pretrain_network_{name} in the option '
                                  f'file or pass --ckpt <experiments/NAME> (with net_{name}_latest.pth)')
        if not os.path.isfile(file):
            raise CheckpointError(f'weights for network_{name} not found: {file}')
        key = 'params_ema' if name in files else path.get(f'param_key_{name}', 'params_ema')
        load_weights(net, file, key, path.get(f'strict_load_{name}', True), where=f'network_{name}')
        net.to(device).eval().requires_grad_(False)
    devices = devices or opt.get('pgs_devices') or None
    sampler = build_inference_sampler(opt, denoiser, devices, device_split) if denoiser is not None else None
    if sampler is not None:
        sampler.progress = progress
    rtm = None if stablesr else build_rtm_for(opt, autoencoder, denoiser, device)
    return PatchScalerPipeline(
        autoencoder, grm, opt['scale'], denoiser, sampler, rtm,
        color_fix=opt.get('color_fix', True) if color_fix is None else color_fix,
        tile=opt.get('tile') if tile is None else tile, tile_overlap=opt.get('tile_overlap'),
        **dict(speed_options(opt), **({'devices': devices} if devices else {})))


def is_stablesr(opt):
    """Whether an option file is a StableSR / StableSR+PGS one (``StableSRModel`` or a ``StableSRUNet``)."""
    return opt.get('model_type') == 'StableSRModel' or (opt.get('network_g') or {}).get('type') == 'StableSRUNet'


def walk_inputs(inputs):
    """([(root, relative path)] of every image under the given files/folders, [(path, why)] of every other file
    there): files without an image extension, temporaries of an interrupted write, and anything that is not a
    regular file (a FIFO or a device with an image name would block the read for ever)."""
    out, skipped = [], []

    def why_not(path, name):
        if not is_image_name(name):
            return 'a temporary file of an interrupted write' if is_temporary(name) else 'not an image file name'
        if not os.path.isfile(path):
            return 'not a regular file (a FIFO, socket or device)' if os.path.exists(path) else 'a broken link'
        return None

    for item in inputs:
        if os.path.isdir(item):
            for d, _, names in sorted(os.walk(item)):
                for n in sorted(names):
                    path = os.path.join(d, n)
                    why = why_not(path, n)
                    if why:
                        skipped.append((path, why))
                    else:
                        out.append((item, os.path.relpath(path, item)))
        elif os.path.exists(item) and not os.path.isfile(item):
            raise DataError(f'input is not a regular file or folder (a FIFO, socket or device): {item}')
        elif os.path.isfile(item):
            out.append((os.path.dirname(item) or '.', os.path.basename(item)))
        else:
            raise DataError(f'input not found: {item}')
    return out, skipped


def list_images(inputs):
    """(root, relative path) of every image under the given files/folders (:func:`walk_inputs`)."""
    return walk_inputs(inputs)[0]


def output_names(images, out_dir, suffix='', extras=()):
    """``<out_dir>/<relative stem><suffix>`` per image; two inputs that would share a name (a.jpg and a.png, or
    the same name in two input folders) keep their extension in it. Every file written, ``<stem>.png`` and
    ``<stem><extra>.png`` for each of ``extras`` (``_qmap``, ``_confidence`` with --save-qmap), must be new (no
    output replaces an input or another output, e.g. ``a``'s Qmap and the SR image of ``a_qmap.png``) and inside
    ``out_dir`` whatever the suffix or the input names hold."""
    stems = [os.path.join(out_dir, os.path.splitext(rel)[0] + suffix) for _, rel in images]
    taken = {}
    for stem in stems:
        taken[stem] = taken.get(stem, 0) + 1
    out = []
    for (_root, rel), stem in zip(images, stems):
        if taken[stem] > 1:
            stem = os.path.join(out_dir, rel.replace('.', '_') + suffix)
        out.append(stem)
    root = os.path.realpath(out_dir)
    files = [(f, os.path.realpath(f)) for f in (stem + extra + '.png' for stem in out for extra in ('', *extras))]
    outside = [f for f, real in files if os.path.commonpath([root, real]) != root]
    if outside:
        raise DataError(f'output {outside[0]} would land outside -o {out_dir} (the suffix or an input name leaves '
                        f'it); use a plain --suffix')
    inputs = {os.path.realpath(os.path.join(r, rel)) for r, rel in images}
    seen = set()
    for f, real in files:
        if real in inputs or real in seen:
            what = 'an input' if real in inputs else 'another output'
            raise DataError(f'output {f} would overwrite {what}; choose another -o folder (or --suffix)')
        seen.add(real)
    return out


def _to_file_array(img, bits):
    """float [0, 1] -> uint8/uint16, computed in ``img`` itself (a float copy of a 16000×12000 output is 2.3 GB;
    callers pass an array they own)."""
    scale = 65535.0 if bits == 16 else 255.0
    np.clip(img, 0, 1, out=img)
    img *= scale
    return np.rint(img, out=img).astype(np.uint16 if bits == 16 else np.uint8)


@dataclass
class InferSummary:
    written: list = field(default_factory=list)
    failures: list = field(default_factory=list)  # (path, reason)
    skipped: list = field(default_factory=list)  # (path, why): files in the input folders that are not images
    interrupted: int = 0  # images not processed because of Ctrl-C
    nfe: int = 0
    nfe_uniform: int = 0
    seconds: dict = field(default_factory=dict)  # per pipeline stage, summed over images
    wall_s: float = 0.0  # loading + all images (the slowest rank's, merged)
    ranks: int = 1  # processes merged into this summary
    failed_on: dict = field(default_factory=dict)  # path -> rank, merged

    @classmethod
    def merge(cls, parts):
        """One summary of the ranks' summaries (``parts[r]`` from rank r)."""
        out = cls(ranks=len(parts), wall_s=max(p.wall_s for p in parts))
        for rank, part in enumerate(parts):
            out.written += part.written
            out.failures += part.failures
            out.interrupted += part.interrupted
            out.skipped = out.skipped or part.skipped  # every rank walks the same folders
            out.failed_on.update({path: rank for path, _ in part.failures})
            out.nfe, out.nfe_uniform = out.nfe + part.nfe, out.nfe_uniform + part.nfe_uniform
            for k, v in part.seconds.items():
                out.seconds[k] = out.seconds.get(k, 0.0) + v
        return out

    def lines(self):
        ranks = f' by {self.ranks} processes' if self.ranks > 1 else ''
        skipped = f', {len(self.skipped)} file(s) skipped' if self.skipped else ''
        out = [f'{len(self.written)} image(s) written, {len(self.failures)} failed{skipped}{ranks}']
        if self.nfe_uniform:
            out.append(f'PGS: {self.nfe} patch evaluations vs {self.nfe_uniform} for uniform sampling '
                       f'({100 * (1 - self.nfe / self.nfe_uniform):.0f}% saved)')
        if self.seconds:
            total = sum(self.seconds.values())
            stages = ', '.join(f'{k} {v:.2f} s' for k, v in self.seconds.items())
            wall = 'the slowest process\'s wall' if self.ranks > 1 else 'wall'
            out.append(f'time: {stages} (stages {total:.2f} s, {wall} {self.wall_s:.2f} s with loading)')
        for p, r in self.failures:
            where = f' (rank {self.failed_on[p]})' if p in self.failed_on else ''
            out.append(f'failed: {r}{where}' if r.startswith(p) else f'failed: {p}: {r}{where}')
        out += [f'skipped: {p}: {why}' for p, why in self.skipped]
        if self.interrupted:
            out.append(f'interrupted (Ctrl-C): {self.interrupted} image(s) not processed; those written are whole')
        return out


def upscale_array(pipeline, img, alpha=None, seed=0):
    """float32 BGR (H, W, 3) in [0, 1] (+ alpha (H, W)) -> (SR BGR, SR alpha or None, PipelineOutput)."""
    lq = torch.from_numpy(np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))).float()[None]
    out = pipeline(lq, seed=seed, return_grm=False, keep_latents=False)  # only the SR image is kept
    sr = out.sr[0].float().cpu().numpy().transpose(1, 2, 0)[..., ::-1]
    sr_alpha = None
    if alpha is not None:
        sr_alpha = np.clip(cv2.resize(alpha, (sr.shape[1], sr.shape[0]), interpolation=cv2.INTER_CUBIC), 0, 1)
    return np.ascontiguousarray(sr), sr_alpha, out


def _upscale_file(pipeline, path, stem, seed, write):
    """Read, super-resolve and write one image in its own format; returns the PipelineOutput."""
    img, alpha, stored = read_image(path, with_alpha=True, with_stored=True)  # the file is read once
    gray = stored['channels'] == 1  # the file's channel count, not equal channels: an RGB file stays RGB
    bits = 8 if stored['bits'] == 8 else 16  # 16-bit and float [0, 1] inputs give 16-bit PNGs
    sr, sr_alpha, out = upscale_array(pipeline, img, alpha, seed)
    arr = sr.mean(2, keepdims=True) if gray else sr
    if sr_alpha is not None:  # OpenCV writes no gray+alpha PNG: gray with alpha becomes BGRA
        arr = np.concatenate([np.repeat(arr, 3, 2) if gray else arr, sr_alpha[..., None]], 2)
    write(stem + '.png', _to_file_array(arr, bits))
    return out


def _infer_one(pipeline, root, rel, stem, seed, save_qmap, summary, progress):
    """One image of :func:`infer_paths`: written (and counted) or listed as failed, never raising but Ctrl-C."""
    from basicsr.utils import tensor2img
    from tqdm import tqdm

    from patchscaler.utils.visualize import confidence_to_bgr, qmap_overlay
    path, sr_written = os.path.join(root, rel), False
    try:
        out = _upscale_file(pipeline, path, stem, seed, write_image)
        sr_written = True
        if save_qmap and out.report is not None:
            view, r = tensor2img([out.sr[0].cpu()]), out.report
            write_image(stem + '_qmap.png', qmap_overlay(view, r.qmap[0], r.groups[0], r.grid, r.group_names))
            write_image(stem + '_confidence.png', confidence_to_bgr(out.confidence[0].cpu().numpy(),
                                                                     size=(view.shape[1], view.shape[0])))
    except KeyboardInterrupt:
        if sr_written:  # a Ctrl-C in the Qmap keeps the SR image, which is on disk and whole
            summary.written.append(stem + '.png')
        raise
    except Exception as e:  # noqa: BLE001 - one image's failure must not lose the others' results
        if isinstance(e, (PatchScalerError, OSError)):
            reason = str(e).splitlines()[-1]
        elif 'out of memory' in str(e).lower():
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            reason = 'out of memory (set tile smaller, or use a smaller image)'
        else:
            reason = f'{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ""}'
        summary.failures.append((path, f'{reason} (the SR image {stem}.png was written)' if sr_written else reason))
        return
    summary.written.append(stem + '.png')
    for k, v in out.seconds.items():
        summary.seconds[k] = summary.seconds.get(k, 0.0) + v
    if out.report is not None:
        summary.nfe += out.report.nfe_total
        summary.nfe_uniform += out.report.nfe_uniform
    if progress and out.report is not None:
        tqdm.write(f'{rel}: {out.report.summary()}')


def infer_paths(pipeline, inputs, out_dir, save_qmap=False, suffix='', seed=0, progress=True, shard=None):
    """Super-resolve every image of ``inputs`` into ``out_dir`` (subfolders kept); returns an InferSummary.
    ``shard=(rank, world)``: only the images ``rank::world`` of the sorted list, named as in the whole run."""
    from tqdm import tqdm

    images, skipped = walk_inputs(inputs)
    if not images:
        raise DataError(f'no images ({", ".join(IMG_EXTENSIONS)}) in {", ".join(inputs)}')
    summary = InferSummary(skipped=skipped)
    jobs = list(zip(images, output_names(images, out_dir, suffix, ('_qmap', '_confidence') if save_qmap else ())))
    rank, world = shard or (0, 1)
    desc = f'SR (rank {rank} of {world})' if shard else 'SR'
    todo = jobs[rank::world]
    done = 0
    try:  # Ctrl-C anywhere in the loop: what was written is kept and listed (the file being written is not)
        for (root, rel), stem in tqdm(todo, desc=desc, unit='img', disable=not progress):
            _infer_one(pipeline, root, rel, stem, seed, save_qmap, summary, progress)
            done += 1
    except KeyboardInterrupt:
        summary.interrupted = len(todo) - done
    return summary


def run(args_opt, inputs, out_dir, device=None, ckpt=None, save_qmap=False, color_fix=None, tile=None, suffix='',
        seed=0, progress=True, devices=None, device_split=None, shard=None):
    """Load the pipeline and run it; returns the InferSummary (the CLI prints it). ``devices``: PGS's groups on
    several devices (group-parallel), e.g. ['cuda:0', 'cuda:1'], placed by ``device_split``
    (:data:`~patchscaler.sampling.pgs.DEVICE_SPLITS`) or the sampler's ``device_groups``. ``shard``: see
    :func:`infer_paths`."""
    from patchscaler.utils.checkpoint import writable_folder
    from patchscaler.utils.cli import load_option_file
    opt = load_option_file(args_opt) if isinstance(args_opt, str) else args_opt
    writable_folder(out_dir)  # a file or a read-only folder is found now, not after every image was computed
    start = time.perf_counter()
    pipeline = load_pipeline(opt, device, ckpt, color_fix, tile, progress, devices, device_split)
    summary = infer_paths(pipeline, inputs, out_dir, save_qmap, suffix, seed, progress, shard)
    summary.wall_s = time.perf_counter() - start
    return summary

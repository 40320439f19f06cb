"""The PatchScaler inference pipeline, one image batch at a time (section 3, Fig. 2)::

    LR -> bicubic ×s -> AE.encode -> y_LR -> GRM -> (y_HR, C) -> PGS with Patch-DiT + texture prompt
       -> x̂_HR -> AE.decode -> wavelet color fix against the bicubic LR -> SR

Used by :class:`PatchScalerModel` for validation/testing and by ``tools/infer.py``. Each stage is timed
(``PipelineOutput.seconds``: encode, grm, pgs, decode, color_fix), CUDA-synchronised.

* Any denoiser with the sampler interface works (``StableSRUNet`` for StableSR and StableSR+PGS): it names
  the conditioning it reads in ``cond_keys`` (``y0``: the coarse latent PGS starts from; ``y_lr``: the
  encoded bicubic LR) and its ``prediction_type``. Without a GRM, y0 is y_LR itself and there is no
  confidence map: the sampler must then have one group (uniform sampling, StableSR as published).
* :class:`~patchscaler.models.prompted_dit.PromptedPatchDiT` joins Patch-DiT and the texture encoder into the one
  denoiser that is trained, EMA-averaged and handed to PGS: ``forward(x_t, t, cond)`` with
  ``cond = {y0, prompt, prompt_bias}``.
* The texture prompt is made in PGS's ``prepare_cond``: once per batch of patches, RTM retrieval on the
  y0 patches (Algorithm 1) then the texture encoder, reused for all of their denoising steps.
* Large images: the autoencoder's encode and decode run in overlapping tiles when a side exceeds
  ``tile`` pixels (``tile_overlap`` blended), so memory stays bounded; PGS is patch-wise already.
* Speed options (the GPU fast path; every one also runs on a CPU; from an option file:
  :func:`~patchscaler.models.pipeline_options.speed_options`):

  - ``autocast`` ('bf16' / 'fp16' / None) covers the GRM and Patch-DiT (attention is SDPA: flash or
    memory-efficient kernels on GPUs); the autoencoder stays in fp32 unless ``autoencoder_autocast``;
  - ``autoencoder_autocast``: encode/decode in the autocast dtype too; a result with NaN/inf (fp16 SD VAE
    decoders overflow) is redone in fp32, counted in ``fp32_fallbacks`` and warned about once;
  - ``channels_last``: the autoencoder's and GRM's convolutions in NHWC (faster cuDNN kernels on GPUs);
  - ``compile``: ``torch.compile`` the GRM and the denoiser in place (true, or torch.compile's keyword
    arguments, e.g. ``{mode: max-autotune}``); the first call of each new input shape compiles;
  - ``devices``: PGS's group-parallel sampling on several GPUs (:meth:`PatchScalerPipeline.set_devices`);
  - ``grm_tile`` / ``grm_tile_overlap`` (latent px): the GRM on overlapping latent tiles (large images);
  - patches of a group go to the denoiser ``sampler.batch_size`` at a time (64 by default: few large calls).
* The wavelet color fix (section 4.1) applies to the diffusion output only: it corrects the colour drift
  of sampling; the GRM's regression output (``refine=False``, or no Patch-DiT) is returned as decoded.
"""
import contextlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from patchscaler.archs.autoencoder_arch import pad_to_multiple
from patchscaler.models.prompted_dit import make_prompt_fn
from patchscaler.utils.color_fix import COLOR_FIXES, color_fix_kind
from patchscaler.utils.errors import ConfigError, InputError, NonFiniteError
from patchscaler.utils.tiling import tiled_apply
from patchscaler.utils.timing import _sync

AUTOCAST = {'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp16': torch.float16, 'float16': torch.float16}


def autocast_dtype(name, device=None):
    """The autocast dtype of an option value: bf16 / fp16 (or the dtype), none; ``auto``: bf16 on a CUDA
    ``device`` that supports it (Ampere and newer), else none (CPU bf16 matmuls are slow on most CPUs)."""
    if name == 'auto':  # compute capability 8+ (Ampere): native bf16; is_bf16_supported() also admits emulation
        device = torch.device(device or 'cpu')
        native = device.type == 'cuda' and torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if native else None
    if name in (None, False, 'none', 'fp32'):
        return None
    if name in AUTOCAST.values():  # already a dtype
        return name
    if name not in AUTOCAST:
        raise ConfigError(f"autocast must be one of {sorted(AUTOCAST)}, auto or none, got {name!r}")
    return AUTOCAST[name]


def autocast(device, dtype):
    """``torch.autocast`` on ``device``'s type with ``dtype`` (from :func:`autocast_dtype`), off when it is None."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def upsample_lr(lq, scale):
    """The bicubic ×scale of the LR image the GRM starts from, clamped to [0, 1]: one definition for training,
    validation and inference, which must see the same input."""
    return F.interpolate(lq, scale_factor=scale, mode='bicubic', align_corners=False).clamp(0, 1)


@dataclass
class PipelineOutput:
    sr: torch.Tensor  # (B, 3, H·s, W·s) in [0, 1]
    grm: torch.Tensor  # decoded y_HR, the GRM's coarse answer (None without a GRM)
    bicubic: torch.Tensor
    confidence: torch.Tensor  # (B, 1, h, w) over the latent of the output (None without a GRM)
    y_hr: torch.Tensor = None  # the GRM's coarse latent (padded to the autoencoder's multiple); y_lr without a GRM
    y_lr: torch.Tensor = None  # the encoded bicubic LR
    report: object = None  # PGSReport, None without a denoiser
    seconds: OrderedDict = field(default_factory=OrderedDict)


def _check_finite(x, stage, weights):
    """A NaN/inf from finite input is the stage's fault (its weights or its precision): one clear error naming it,
    so that nothing black or white is written in its place."""
    if not torch.isfinite(x).all():
        raise NonFiniteError(f'{stage} produced NaN/inf from a finite input: its weights ({weights}) hold NaN/inf '
                             f'or overflow at this precision; nothing was written for this image')


class PatchScalerPipeline:
    """Args: autoencoder, grm (None: y0 = y_LR, uniform sampling), scale; denoiser (PromptedPatchDiT, another
    sampler-interface denoiser, or None: GRM only), sampler (PGS), rtm, top_k; color_fix (bool); tile,
    tile_overlap (pixels of the HR image; tile None = never tile; tile_overlap None = 64 px, or a quarter of a
    tile below 256 px); the speed options of the module docstring:
    autocast, autoencoder_autocast, channels_last, compile, devices."""

    def __init__(self, autoencoder, grm, scale, denoiser=None, sampler=None, rtm=None, top_k=None, color_fix=True,
                 tile=None, tile_overlap=None, autocast=None, autoencoder_autocast=False, channels_last=False,
                 compile=None, devices=None, grm_tile=None, grm_tile_overlap=16):
        if denoiser is not None and sampler is None:
            raise ConfigError('a Patch-DiT needs a sampler (PGS options) to run')
        if denoiser is not None and sampler.patch_size != denoiser.patch_size:
            raise ConfigError(f'sampler.patch_size ({sampler.patch_size}) must equal the V the denoiser works on '
                              f'({type(denoiser).__name__}: {denoiser.patch_size}; network_dit.input_size for '
                              f'Patch-DiT, network_g.patch_size for StableSRUNet)')
        predicts = getattr(denoiser, 'prediction_type', 'sample')
        if denoiser is not None and sampler.prediction_type != predicts:
            raise ConfigError(f"{type(denoiser).__name__} predicts {predicts!r}: the sampler's prediction_type must "
                              f"be the same, got {sampler.prediction_type!r}")
        if grm is None and (denoiser is None or len(sampler.groups) > 1):
            raise ConfigError('without a GRM there is no coarse latent nor confidence map: PGS with several groups '
                              'needs network_grm (+ its weights); without one, configure a single group (uniform '
                              'sampling)')
        if denoiser is not None and getattr(denoiser, 'texture_encoder', None) is not None and rtm is None:
            raise ConfigError('network_texture needs an RTM (the rtm option) to retrieve texture priors from')
        self.autoencoder, self.grm, self.scale = autoencoder, grm, int(scale)
        self.denoiser, self.sampler, self.rtm, self.top_k = denoiser, sampler, rtm, top_k
        self.color_fix = color_fix_kind(color_fix)
        self.autocast = autocast_dtype(autocast, self.device)
        d = autoencoder.downscale_factor
        if tile is not None and (int(tile) < 2 * d or int(tile) % d):
            raise ConfigError(f'tile must be a multiple of the autoencoder factor {d} and at least {2 * d}, got {tile}')
        if tile_overlap is None:  # 64 px, or a quarter of a smaller tile (a multiple of d): any valid tile works
            tile_overlap = min(64, int(tile) // 4 // d * d) if tile is not None else 64
        if tile is not None and not 0 <= int(tile_overlap) <= int(tile) - d:
            raise ConfigError(f'tile_overlap must be in [0, tile - {d}] = [0, {int(tile) - d}], got {tile_overlap}')
        self.tile, self.tile_overlap = (int(tile) if tile else None), int(tile_overlap)
        if grm_tile is not None and not (int(grm_tile) >= 8 and 0 <= int(grm_tile_overlap) < int(grm_tile)):
            if int(grm_tile_overlap) < 0:
                raise ConfigError(f'grm_tile_overlap must be >= 0 latent px, got {grm_tile_overlap}')
            least = max(8, int(grm_tile_overlap) + 1)
            raise ConfigError(f'grm_tile must be at least {least} latent px (>= 8 and > grm_tile_overlap '
                              f'{grm_tile_overlap}), got {grm_tile}')
        self.grm_tile, self.grm_tile_overlap = (int(grm_tile) if grm_tile else None), int(grm_tile_overlap)
        if autoencoder_autocast and self.autocast is None:
            raise ConfigError('autoencoder_autocast needs autocast (bf16 or fp16): it runs the autoencoder in it')
        self.autoencoder_autocast, self.fp32_fallbacks = bool(autoencoder_autocast), 0
        if channels_last:
            for net in (autoencoder, grm):
                if isinstance(net, torch.nn.Module):
                    net.to(memory_format=torch.channels_last)
        self.denoisers, self._retrieval_lock = None, threading.Lock()
        devices = devices or (sampler.devices if sampler is not None else None)
        if devices:
            self.set_devices(devices)
        if compile and self.denoisers:  # the devices' first calls would compile at once, in threads
            raise ConfigError('compile and group-parallel devices together are not supported: torch.compile is not '
                              'thread-safe; use one of them')
        if compile:
            kwargs = {} if compile is True else dict(compile)
            for net in [grm, *(self.denoisers or [denoiser])]:
                if isinstance(net, torch.nn.Module) and getattr(net, '_compiled_call_impl', None) is None:
                    net.compile(**kwargs)  # in place: attributes (patch_size, cond_keys ...) stay reachable

    def set_devices(self, devices):
        """Group-parallel PGS on ``devices`` (e.g. ['cuda:0', 'cuda:1']): the denoiser is copied to each other
        device once; encode, GRM, retrieval and decode stay on the pipeline's device."""
        if self.denoiser is None:
            raise ConfigError('devices: there is no diffusion stage (network_dit / network_g) to spread over devices')
        try:
            devices = [torch.device(d) for d in devices]
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f'devices: {e}') from e
        for d in devices:
            if d.type == 'cuda' and (d.index or 0) >= torch.cuda.device_count():
                raise ConfigError(f'devices: {d} is not there (this torch sees {torch.cuda.device_count()} GPUs)')
        self.sampler.place(devices)
        self.denoisers = self.sampler.replicate(self.denoiser)

    @property
    def device(self):
        for net in (self.grm, self.denoiser):
            if net is not None:
                return next(net.parameters()).device
        return torch.device('cpu')

    def min_input_size(self):
        """The smallest LR side that gives at least a 2×2 latent. A choice: below that (e.g. 2×2 px with the SD
        VAE, a 1×1 latent) there is no spatial structure left for the GRM and PGS to work on, and a one-line
        refusal is clearer than a meaningless image."""
        return max(1, -(-2 * self.autoencoder.downscale_factor // self.scale))

    def _autocast(self):
        """Autocast on the pipeline's device and, with group-parallel devices, on theirs (PGS's threads take the
        caller's autocast state per device type)."""
        types = {self.device.type} | {d.type for d in (self.sampler.devices or [])} if self.denoisers else \
            {self.device.type}
        stack = contextlib.ExitStack()
        for t in sorted(types):
            stack.enter_context(autocast(t, self.autocast))
        return stack

    def run_grm(self, y_lr):
        """(y_HR, C) of the GRM; with ``grm_tile``, on overlapping latent tiles blended like the autoencoder's
        (bounded memory on large images; near the tile seams the result differs slightly from one pass)."""
        if not self.grm_tile or max(y_lr.shape[-2:]) <= self.grm_tile:
            return self.grm(y_lr)

        def both(t):
            y, c = self.grm(t)
            return torch.cat([y.float(), c.float()], 1)
        out = tiled_apply(both, y_lr, self.grm_tile, self.grm_tile_overlap, 1)
        return out[:, :-1], out[:, -1:].clamp_(0, 1)  # blending C = 1 everywhere rounds to 1 + 2e-7 in places

    def encode(self, images):
        def run(x):
            fn = self.autoencoder.encode
            if self.tile and max(x.shape[-2:]) > self.tile:
                d = self.autoencoder.downscale_factor
                return tiled_apply(fn, x, self.tile, self.tile_overlap, 1 / d, multiple=d)
            return fn(x)
        return self._autoencoder_call(run, images, 'encode')

    def decode(self, latent, guide=None):
        """The autoencoder's decode of ``latent``, tiled above ``tile`` px. ``guide``: the (padded) upsampled LR
        image, for a decoder that reads it (``needs_guide``: StableSR's CFW); tiled with the latent, as its
        pixel-unshuffled channels, so each latent tile decodes with its own image region."""
        d = self.autoencoder.downscale_factor
        fn = self.autoencoder.decode
        if guide is not None:
            c = latent.shape[1]
            guide = F.pixel_unshuffle(guide.to(latent.dtype), d)

            def fn(t):
                return self.autoencoder.decode(t[:, :c], F.pixel_shuffle(t[:, c:], d))

        def run(z):
            if self.tile and max(z.shape[-2:]) * d > self.tile:
                return tiled_apply(fn, z, self.tile // d, max(1, self.tile_overlap // d), d)
            return fn(z)
        return self._autoencoder_call(run, latent if guide is None else torch.cat([latent, guide], 1), 'decode')

    def _autoencoder_call(self, run, x, what):
        """fp32, or with ``autoencoder_autocast`` in the pipeline's autocast dtype; a low-precision result with
        NaN/inf (the SD VAE decoder in fp16 is known to overflow) is redone in fp32 and counted."""
        if not self.autoencoder_autocast or self.autocast is None:
            return run(x)
        with self._autocast():
            out = run(x)
        if torch.isfinite(out).all():
            return out.float()
        self.fp32_fallbacks += 1
        if self.fp32_fallbacks == 1:
            from basicsr.utils import get_root_logger
            get_root_logger().warning(f'autoencoder {what} in {self.autocast} gave NaN/inf; redone in float32 (this '
                                      f'and every later such call; autoencoder_autocast: false skips the try)')
        return run(x.float())

    @torch.no_grad()
    def __call__(self, lq, refine=True, seed=None, return_grm=True, keep_latents=True):
        """SR of an LR batch (B, 3, h, w) in [0, 1]; ``refine=False`` stops after the GRM; ``return_grm`` also
        decodes y_HR (``PipelineOutput.grm``), outside the timed stages. ``keep_latents=False`` (tools/infer.py)
        lets go of every intermediate as soon as it is used (the bicubic after encoding, made again for the colour
        fix; y_LR after the GRM; y_HR after PGS), so that ``y_hr``, ``y_lr`` and ``bicubic`` of the output are
        None: on a large image each is as big as the output (the pixel-unshuffle latent) or a fraction of it (the
        SD VAE's)."""
        if not torch.is_tensor(lq) or lq.dim() != 4 or lq.shape[1] != 3:
            got = tuple(lq.shape) if torch.is_tensor(lq) else type(lq).__name__
            raise InputError(f'expected an LR batch (B, 3, h, w), got {got}')
        if min(lq.shape[-2:]) < self.min_input_size():
            raise InputError(f'the image is {lq.shape[-1]}×{lq.shape[-2]} px; this model needs at least '
                             f'{self.min_input_size()} px per side (×{self.scale} must give a 2×2 latent)')
        if not torch.isfinite(lq).all():
            raise InputError(f'the input image holds {int((~torch.isfinite(lq)).sum())} NaN/inf pixel value(s)')
        seconds, dev = OrderedDict(), self.device
        lq = lq.to(dev)

        def timed(name, fn):
            _sync(dev)
            start = time.perf_counter()
            out = fn()
            _sync(dev)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
            return out

        up = upsample_lr(lq, self.scale)
        h, w = up.shape[-2:]
        d = self.autoencoder.downscale_factor
        y_lr = timed('encode', lambda: self.encode(pad_to_multiple(up, d)[0]))
        if not keep_latents:
            up = None  # made again from lq for the colour fix: one image-sized tensor less through GRM and PGS
        _check_finite(y_lr, 'the encoder', 'autoencoder')
        y_hr, confidence = y_lr, None
        if self.grm is not None:
            with self._autocast():
                y_hr, confidence = timed('grm', lambda: self.run_grm(y_lr))
            y_hr, confidence = y_hr.float(), confidence.float()
            _check_finite(y_hr, 'the GRM', 'network_grm')
        report, x_hr = None, y_hr
        if refine and self.denoiser is not None:
            given = {'y0': y_hr, 'y_lr': y_lr}
            cond = {k: given[k] for k in getattr(self.denoiser, 'cond_keys', ('y0',))}
            del given
            if not keep_latents and 'y_lr' not in cond:
                y_lr = None

            def run_pgs():
                with self._autocast():
                    return self.sampler.sample(self.denoisers or self.denoiser, y_hr, confidence, cond=cond,
                                               prepare_cond=make_prompt_fn(self.denoiser, self.rtm, self.top_k, dev,
                                                                           self._retrieval_lock),
                                               seed=seed)
            x_hr, report = timed('pgs', run_pgs)
            x_hr, cond = x_hr.float(), None
            _check_finite(x_hr, 'the denoiser (PGS output)', 'network_dit / network_g')
        if not keep_latents:
            y_lr = None
            if not (return_grm and report is not None):
                y_hr = None
        cfw = getattr(self.autoencoder, 'needs_guide', False)  # StableSR's CFW decoder reads the upsampled LR too
        fixing = report is not None and self.color_fix  # the fix is for the diffusion stage's colour drift
        ref = upsample_lr(lq, self.scale) if up is None and (cfw or fixing) else up  # made again once, here
        guide = pad_to_multiple(ref, d)[0] if cfw else None
        sr = timed('decode', lambda: self.decode(x_hr, guide)[..., :h, :w])
        x_hr = None
        _check_finite(sr, 'the decoder', 'autoencoder')
        if fixing:
            fix = COLOR_FIXES[self.color_fix]
            sr = timed('color_fix', lambda: fix(sr, ref))
        grm_img = conf = None
        if return_grm and self.grm is not None:  # not timed: only validation and the comparison strips need it
            grm_img = (sr if report is None else self.decode(y_hr, guide)[..., :h, :w]).clamp(0, 1)
        if confidence is not None:
            conf = confidence[..., :-(-h // d), :-(-w // d)]
        return PipelineOutput(sr=sr.clamp_(0, 1), grm=grm_img, bicubic=up, confidence=conf, report=report,
                              seconds=seconds, y_hr=y_hr if keep_latents else None, y_lr=y_lr)

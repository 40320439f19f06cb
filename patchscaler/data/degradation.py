"""Real-ESRGAN's second-order degradation, on any device: the one implementation every model here shares.

BasicSR's ``RealESRGANModel.feed_data`` does this on tensors but hard-codes ``.cuda()``; this class is the
same process built from BasicSR's own pieces (``filter2D``, the noise functions, ``DiffJPEG``,
``paired_random_crop``; USM sharpening as a separable equivalent of ``USMSharp``) on whatever device the
model runs. Kernels come from the dataset (:class:`RealESRGANHRDataset`), as in Real-ESRGAN.

The option names are Real-ESRGAN's (``resize_prob``, ``noise_range2``, ``jpeg_range`` ...), so a
Real-ESRGAN config's degradation block can be pasted under ``degradation:``. Each of the two stages is
blur -> random resize -> Gaussian or Poisson noise; stage one ends with JPEG, and the end of stage two is
[resize to LR size + sinc filter] and JPEG in random order. The training-pair pool of Real-ESRGAN is not
used (batches here are small and mixing across iterations is left to the sampler).
"""
import random

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from basicsr.data.degradations import random_add_gaussian_noise_pt, random_add_poisson_noise_pt
from basicsr.data.transforms import paired_random_crop
from basicsr.utils import DiffJPEG
from basicsr.utils.img_process_util import filter2D

from patchscaler.utils.errors import ConfigError

#: Real-ESRGAN x4plus defaults (options/train_realesrgan_x4plus.yml of Real-ESRGAN).
DEFAULTS = dict(
    resize_prob=[0.2, 0.7, 0.1], resize_range=[0.15, 1.5], gaussian_noise_prob=0.5, noise_range=[1, 30],
    poisson_scale_range=[0.05, 3], gray_noise_prob=0.4, jpeg_range=[30, 95],
    second_blur_prob=0.8, resize_prob2=[0.3, 0.4, 0.3], resize_range2=[0.3, 1.2], gaussian_noise_prob2=0.5,
    noise_range2=[1, 25], poisson_scale_range2=[0.05, 2.5], gray_noise_prob2=0.4, jpeg_range2=[30, 95],
    gt_usm=False)
# gt_usm: USM-sharpen the GT and use it for both sides of the pair, as Real-ESRGAN does (it degrades the
# sharpened GT and, with l1_gt_usm, trains towards it). Off by default: the paper does not sharpen, and
# degrading a sharpened GT while training towards the plain one teaches the network to blur.


def _blur(x, kernel):
    """BasicSR's filter2D, made safe for what random resizing produces: its ``view`` needs a contiguous input
    (JPEG/resize outputs are not, on CPU), and its reflect padding needs sides longer than half the kernel
    (a small crop shrunk by 0.15 is not): such inputs are replicate-padded first and cropped back."""
    pad = kernel.shape[-1] // 2
    h, w = x.shape[-2:]
    if min(h, w) > pad:
        return filter2D(x.contiguous(), kernel)
    x = F.pad(x, (pad, pad, pad, pad), mode='replicate')
    return filter2D(x.contiguous(), kernel)[..., pad:pad + h, pad:pad + w]


class SeparableUSMSharp(torch.nn.Module):
    """BasicSR's ``USMSharp`` (unsharp masking with a soft threshold mask), same output, separable blur.

    BasicSR blurs with a 51x51 2-D kernel built as the outer product of a 1-D Gaussian; two 1-D passes give
    the same result (up to float rounding) about 25x faster on CPU, where it was most of a demo iteration.
    """

    def __init__(self, radius=50, sigma=0):
        super().__init__()
        radius += 1 - radius % 2  # odd, as BasicSR
        self.pad = radius // 2
        self.register_buffer('kernel', torch.FloatTensor(cv2.getGaussianKernel(radius, sigma)).view(1, 1, -1))

    def _blur(self, x):
        b, c, h, w = x.shape
        k = self.kernel.to(x.dtype)
        x = F.pad(x.reshape(b * c, 1, h, w), (self.pad, self.pad, self.pad, self.pad), mode='reflect')
        x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
        return x.view(b, c, h, w)

    def forward(self, img, weight=0.5, threshold=10):
        residual = img - self._blur(img)
        mask = (residual.abs() * 255 > threshold).to(img.dtype)
        soft_mask = self._blur(mask)
        sharp = torch.clip(img + weight * residual, 0, 1)
        return soft_mask * sharp + (1 - soft_mask) * img


class RealESRGANDegradation:
    """``degrade(batch, scale, gt_size) -> (lq, gt)`` for a batch with 'gt', 'kernel1', 'kernel2', 'sinc_kernel'.

    Args:
        opt (dict | None): overrides of :data:`DEFAULTS`; unknown keys are an error.
        device: where to run (the model's device).
    """

    def __init__(self, opt=None, device='cpu'):
        opt = dict(opt or {})
        unknown = set(opt) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f'degradation: unknown option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}')
        self.opt = {**DEFAULTS, **opt}
        for key in ('jpeg_range', 'jpeg_range2'):
            lo, hi = self.opt[key]
            if not 1 <= lo <= hi <= 99:  # DiffJPEG's quality factor is 0 at 100: it returns NaN
                raise ConfigError(f'degradation.{key} must lie within [1, 99], got {self.opt[key]}')
        self.device = torch.device(device)
        self.jpeger = DiffJPEG(differentiable=False).to(self.device)
        self.usm_sharpener = SeparableUSMSharp().to(self.device)

    def _resize(self, x, prob, value_range, size=None):
        updown = random.choices(['up', 'down', 'keep'], prob)[0]
        factor = {'up': lambda: np.random.uniform(1, value_range[1]),
                  'down': lambda: np.random.uniform(value_range[0], 1), 'keep': lambda: 1}[updown]()
        mode = random.choice(['area', 'bilinear', 'bicubic'])
        if size is None:
            return F.interpolate(x, scale_factor=factor, mode=mode)
        return F.interpolate(x, size=(max(1, int(size[0] * factor)), max(1, int(size[1] * factor))), mode=mode)

    def _noise(self, x, suffix):
        o = self.opt
        if np.random.uniform() < o['gaussian_noise_prob' + suffix]:
            return random_add_gaussian_noise_pt(x, sigma_range=o['noise_range' + suffix], clip=True, rounds=False,
                                                gray_prob=o['gray_noise_prob' + suffix])
        return random_add_poisson_noise_pt(x, scale_range=o['poisson_scale_range' + suffix], clip=True, rounds=False,
                                           gray_prob=o['gray_noise_prob' + suffix])

    def _jpeg(self, x, quality_range):
        quality = x.new_zeros(x.size(0)).uniform_(*quality_range)
        return self.jpeger(torch.clamp(x, 0, 1), quality=quality)

    @torch.no_grad()
    def __call__(self, batch, scale, gt_size):
        o = self.opt
        gt = batch['gt'].to(self.device, non_blocking=True)  # pinned batches (pin_memory): an async copy
        if o['gt_usm']:  # Real-ESRGAN: sharpen, then both the LR and the target come from the sharpened GT
            gt = self.usm_sharpener(gt)
        h, w = gt.shape[-2:]
        h, w = h - h % scale, w - w % scale  # LR and HR must tile exactly (crop_pad_size need not divide)
        gt = gt[..., :h, :w]
        lr_size = (h // scale, w // scale)
        if gt_size is not None and min(lr_size) * scale < gt_size:
            raise ConfigError(f'gt_size {gt_size} is larger than the training crop {h}x{w}; '
                              'lower gt_size or raise the dataset crop_pad_size')

        # stage one: blur, resize, noise, JPEG
        out = _blur(gt, batch['kernel1'].to(self.device))
        out = self._resize(out, o['resize_prob'], o['resize_range'])
        out = self._jpeg(self._noise(out, ''), o['jpeg_range'])
        # stage two: blur (sometimes), resize relative to the LR size, noise
        if np.random.uniform() < o['second_blur_prob']:
            out = _blur(out, batch['kernel2'].to(self.device))
        out = self._resize(out, o['resize_prob2'], o['resize_range2'], size=lr_size)
        out = self._noise(out, '2')
        # [resize to LR + sinc] and JPEG, in random order (other orders give twisted lines, Real-ESRGAN)
        sinc = batch['sinc_kernel'].to(self.device)
        mode = random.choice(['area', 'bilinear', 'bicubic'])
        if np.random.uniform() < 0.5:
            out = _blur(F.interpolate(out, size=lr_size, mode=mode), sinc)
            out = self._jpeg(out, o['jpeg_range2'])
        else:
            out = self._jpeg(out, o['jpeg_range2'])
            out = _blur(F.interpolate(out, size=lr_size, mode=mode), sinc)
        lq = torch.clamp((out * 255.0).round(), 0, 255) / 255.0

        if gt_size is not None:
            gt, lq = paired_random_crop(gt, lq, gt_size, scale)
        return lq.contiguous(), gt.contiguous()

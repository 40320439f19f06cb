"""HR images + Real-ESRGAN blur kernels for training; the degradation itself runs in the model.

Like BasicSR's ``RealESRGANDataset`` (same option names, same kernels from BasicSR's
``random_mixed_kernels`` / ``circular_lowpass_kernel``), with what that class lacks for real data:

* the crop/pad size is an option (``crop_pad_size``, BasicSR hard-codes 400), so the demo trains on CPU;
* a folder needs no meta_info (images are found recursively), an LMDB's keys may contain dots;
* an unreadable image or a key missing from the LMDB is skipped with one warning, and another image is
  used; only if ``max_skips`` images in a row fail does it stop with a :class:`DataError`.
"""
import math
import random

import cv2
import numpy as np
import torch
from basicsr.data.degradations import circular_lowpass_kernel, random_mixed_kernels
from basicsr.data.transforms import augment
from basicsr.utils import get_root_logger, img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from patchscaler.data.image_io import ImageSource
from patchscaler.utils.errors import ConfigError, DataError

KERNEL_SIZE = 21  # every kernel is padded to 21x21, as in Real-ESRGAN
KERNEL_RANGE = [2 * v + 1 for v in range(3, 11)]  # 7 ... 21


def _kernel_sizes(bounds, name):
    """[lo, hi] -> the odd sizes lo, lo + 2, ..., hi (Real-ESRGAN's 7 ... 21 when not given)."""
    if bounds is None:
        return KERNEL_RANGE
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2 or not all(isinstance(b, int) for b in bounds) \
            or any(b % 2 == 0 for b in bounds) or not 3 <= bounds[0] <= bounds[1] <= KERNEL_SIZE:
        raise ConfigError(f'{name} must be [smallest, largest] odd kernel sizes within [3, {KERNEL_SIZE}], '
                          f'got {bounds!r}')
    return list(range(int(bounds[0]), int(bounds[1]) + 1, 2))


class RealESRGANKernels:
    """Real-ESRGAN's random blur kernels for one image: ``sample() -> {kernel1, kernel2, sinc_kernel}``.

    Options (Real-ESRGAN's names): kernel_list, kernel_prob, blur_sigma, betag_range, betap_range, sinc_prob,
    the same with suffix 2, and final_sinc_prob. ``kernel_range``, ``kernel_range2``, ``final_sinc_range``:
    [smallest, largest] odd kernel size of each stage, default [7, 21] (Real-ESRGAN's, hard-coded there);
    ResShift's test degradation uses [3, 11] and [3, 5]. Kernels are zero-padded to 21×21 either way, which
    does not change the filtering. Uses Python's and numpy's global random state, like BasicSR, so seeding those
    makes a draw reproducible.
    """

    def __init__(self, opt):
        self.opt = opt
        self.sizes = {key: _kernel_sizes(opt.get(key), key) for key in ('kernel_range', 'kernel_range2',
                                                                         'final_sinc_range')}
        self.pulse_tensor = torch.zeros(KERNEL_SIZE, KERNEL_SIZE)
        self.pulse_tensor[KERNEL_SIZE // 2, KERNEL_SIZE // 2] = 1  # identity kernel

    def _kernel(self, suffix):
        """A blur kernel of stage ``suffix`` ('' or '2'): sinc with prob sinc_prob, else a mixed Gaussian."""
        o = self.opt
        size = random.choice(self.sizes['kernel_range' + suffix])
        if np.random.uniform() < o['sinc_prob' + suffix]:
            omega_c = np.random.uniform(np.pi / 3, np.pi) if size < 13 else np.random.uniform(np.pi / 5, np.pi)
            kernel = circular_lowpass_kernel(omega_c, size, pad_to=False)
        else:
            sigma = o['blur_sigma' + suffix]
            kernel = random_mixed_kernels(o['kernel_list' + suffix], o['kernel_prob' + suffix], size, sigma, sigma,
                                          [-math.pi, math.pi], o['betag_range' + suffix], o['betap_range' + suffix],
                                          noise_range=None)
        pad = (KERNEL_SIZE - size) // 2
        return torch.FloatTensor(np.pad(kernel, ((pad, pad), (pad, pad))))

    def _final_sinc(self):
        if np.random.uniform() < self.opt['final_sinc_prob']:
            size = random.choice(self.sizes['final_sinc_range'])
            omega_c = np.random.uniform(np.pi / 3, np.pi)
            return torch.FloatTensor(circular_lowpass_kernel(omega_c, size, pad_to=KERNEL_SIZE))
        return self.pulse_tensor

    def sample(self):
        return {'kernel1': self._kernel(''), 'kernel2': self._kernel('2'), 'sinc_kernel': self._final_sinc()}


@DATASET_REGISTRY.register()
class RealESRGANHRDataset(data.Dataset):
    """Options (beyond BasicSR's ``name``, ``type``, ``phase``, loader keys):

    dataroot_gt (str | list[str]): folder(s) or ``.lmdb``(s), used together (paper: LSDIR + HQ-50K).
    meta_info (str, optional; with a single root only). crop_pad_size (int, default 400).
    use_hflip, use_rot (bool). blur_kernel_size, kernel_list, kernel_prob, blur_sigma, betag_range,
    betap_range, sinc_prob and the same with suffix 2, final_sinc_prob: Real-ESRGAN's kernel options.
    max_skips (int, default 20): consecutive unreadable images tolerated.
    """

    OPTION_KEYS = {
        'name', 'type', 'phase', 'scale', 'dataroot_gt', 'meta_info', 'io_backend', 'crop_pad_size', 'use_hflip',
        'use_rot', 'blur_kernel_size', 'kernel_list', 'kernel_prob', 'blur_sigma', 'betag_range', 'betap_range',
        'sinc_prob', 'blur_kernel_size2', 'kernel_list2', 'kernel_prob2', 'blur_sigma2', 'betag_range2',
        'betap_range2', 'sinc_prob2', 'final_sinc_prob', 'kernel_range', 'kernel_range2', 'final_sinc_range',
        'max_skips', 'gt_size', 'use_shuffle',
        'num_worker_per_gpu', 'batch_size_per_gpu', 'dataset_enlarge_ratio', 'prefetch_mode', 'pin_memory',
        'persistent_workers', 'num_prefetch_queue'}

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        roots = opt['dataroot_gt'] if isinstance(opt['dataroot_gt'], (list, tuple)) else [opt['dataroot_gt']]
        self.sources = [ImageSource(root, opt.get('meta_info') if len(roots) == 1 else None) for root in roots]
        self.index = [(s, i) for s in self.sources for i in range(len(s))]
        self.crop_pad_size = int(opt.get('crop_pad_size', 400))
        self.max_skips = int(opt.get('max_skips', 20))
        self._bad = set()
        self.kernels = RealESRGANKernels(opt)

    def __len__(self):
        return len(self.index)

    def _read_good_image(self, index):
        for _ in range(self.max_skips):
            source, i = self.index[index]
            try:
                return source.read(i), source.name(i)
            except DataError as e:
                if index not in self._bad:
                    self._bad.add(index)
                    get_root_logger().warning(f'skipping unreadable training image: {e}')
                index = random.randrange(len(self))
        raise DataError(f'{self.max_skips} unreadable images in a row in {self.opt["dataroot_gt"]}; check the dataset')

    def _crop_or_pad(self, img):
        size = self.crop_pad_size
        h, w = img.shape[:2]
        if h < size or w < size:
            border = cv2.BORDER_REFLECT_101 if h > 1 and w > 1 else cv2.BORDER_REPLICATE
            img = cv2.copyMakeBorder(img, 0, max(0, size - h), 0, max(0, size - w), border)
            h, w = img.shape[:2]
        top, left = random.randint(0, h - size), random.randint(0, w - size)
        return img[top:top + size, left:left + size]

    def __getitem__(self, index):
        img, name = self._read_good_image(index)
        img = augment(img, self.opt.get('use_hflip', True), self.opt.get('use_rot', False))
        img = self._crop_or_pad(img)
        gt = img2tensor([img], bgr2rgb=True, float32=True)[0]
        return {'gt': gt, **self.kernels.sample(), 'gt_path': name}

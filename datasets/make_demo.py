"""Build the embedded demo set from the photos and textures that scikit-image ships (no download).

    python datasets/make_demo.py [--out datasets/demo] [--overwrite]

Writes
    datasets/demo/train_HR.lmdb            HR training images (BasicSR LMDB + meta_info.txt)
    datasets/demo/val/{HR,LR_x4}/*.png     disjoint regions of the training photos, LR from the training
                                           degradation (seeded): did the GRM learn what it was taught?
    datasets/demo/val_unseen/{HR,LR_x4}    held-out photos, LR from the fixed degradation below: how far
                                           a few CPU minutes generalise to new content and degradation

Split. Training photos: astronaut, chelsea, hubble_deep_field, immunohistochemistry, retina, colorwheel,
brick, grass, camera, moon, coins, clock, page, cell. The right quarter of each (at most 128 px wide,
at most 256 px tall, centred) is cut off for ``val``; training uses the left three quarters only, so no
validation pixel is trained on. ``val_unseen`` holds centre crops (at most 256x256) of coffee, rocket,
gravel and text. Why both: 14 small photos and a few CPU minutes teach the GRM the degradation, which
``val`` measures; generalising to unseen content takes the paper's data and schedule, and ``val_unseen``
shows honestly how far a demo run gets there. Gray images are repeated to 3 channels.

``val`` LR images: Real-ESRGAN's second-order degradation with the kernel and degradation options of
``options/demo/train_grm_demo.yml`` (the training distribution), one draw per image with Python, numpy and
torch seeded by the image index, so every machine gets the same LR images.

``val_unseen`` LR images, the fixed degradation (seeded likewise), applied to the HR crop:
    1. Gaussian blur, sigma 1.2, 9x9 kernel (cv2.GaussianBlur, reflect-101 borders)
    2. x4 bicubic downsampling (BasicSR's MATLAB-compatible ``imresize``, antialiased)
    3. additive Gaussian noise, sigma 5/255, numpy seed 0 per image index
    4. JPEG, quality 75 (OpenCV), then decoded again
"""
import argparse
import functools
import os
import os.path as osp
import shutil
import sys

import cv2
import numpy as np

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), osp.pardir)))

import patchscaler  # noqa: E402,F401  (before any basicsr import: applies the compat fixes)
from patchscaler.data.lmdb_builder import build_lmdb  # noqa: E402

TRAIN = ['astronaut', 'chelsea', 'hubble_deep_field', 'immunohistochemistry', 'retina', 'colorwheel', 'brick',
         'grass', 'camera', 'moon', 'coins', 'clock', 'page', 'cell']
UNSEEN = ['coffee', 'rocket', 'gravel', 'text']
SCALE = 4
VAL_HR_SIZE = 256
DEMO_OPTIONS = osp.join(osp.dirname(osp.abspath(__file__)), osp.pardir, 'options', 'demo', 'train_grm_demo.yml')


def load(name):
    """A scikit-image bundled image as uint8 BGR (H, W, 3)."""
    from skimage import data
    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3][..., ::-1])


def center_crop(img, size_h, size_w=None):
    h, w = img.shape[:2]
    size_h, size_w = min(size_h, h - h % SCALE), min(size_w or size_h, w - w % SCALE)
    top, left = (h - size_h) // 2, (w - size_w) // 2
    return img[top:top + size_h, left:left + size_w]


def split_train_val(img):
    """(left three quarters for training, a centred crop of the right quarter for validation)."""
    w = img.shape[1]
    cut = w - min(128, w // 4 - (w // 4) % SCALE)
    return img[:, :cut], center_crop(img[:, cut:], VAL_HR_SIZE, w - cut)


def degrade_fixed(hr, seed):
    """The documented fixed degradation: blur -> x4 bicubic down -> noise -> JPEG. uint8 in, uint8 out."""
    from basicsr.utils.matlab_functions import imresize
    x = cv2.GaussianBlur(hr.astype(np.float32) / 255.0, (9, 9), 1.2)
    x = imresize(x, 1 / SCALE)
    x = x + np.random.default_rng(seed).normal(0, 5 / 255.0, x.shape).astype(np.float32)
    x = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode('.jpg', x, [cv2.IMWRITE_JPEG_QUALITY, 75])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


@functools.lru_cache(maxsize=None)
def _training_degradation(options=DEMO_OPTIONS):
    """(kernel sampler, degradation) of the demo's training options, built once for all val images."""
    import yaml

    from patchscaler.data.degradation import RealESRGANDegradation
    from patchscaler.data.realesrgan_hr_dataset import RealESRGANKernels

    with open(options) as f:
        opt = yaml.safe_load(f)
    return RealESRGANKernels(opt['datasets']['train']), RealESRGANDegradation(opt['degradation'])


def degrade_like_training(hr, seed):
    """One seeded draw of the demo's training degradation (Real-ESRGAN second order). uint8 BGR in and out."""
    import random

    import torch

    kernel_sampler, degradation = _training_degradation()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gt = torch.from_numpy(np.ascontiguousarray(hr[..., ::-1])).permute(2, 0, 1)[None].float() / 255.0
    kernels = {k: v[None] for k, v in kernel_sampler.sample().items()}
    lq, _ = degradation({'gt': gt, **kernels}, SCALE, None)
    return np.ascontiguousarray((lq[0].permute(1, 2, 0).numpy()[..., ::-1] * 255.0).round().astype(np.uint8))


def make_demo(out='datasets/demo', overwrite=False):
    if osp.exists(out):
        if not overwrite:
            print(f'{out} exists; nothing to do (use --overwrite to rebuild)')
            return out
        shutil.rmtree(out)
    os.makedirs(out)
    train, val = zip(*(split_train_val(load(name)) for name in TRAIN))
    build_lmdb(None, osp.join(out, 'train_HR.lmdb'), images=list(zip(TRAIN, train)))
    pairs = [('val', name, hr, degrade_like_training) for name, hr in zip(TRAIN, val)]
    pairs += [('val_unseen', name, center_crop(load(name), VAL_HR_SIZE), degrade_fixed) for name in UNSEEN]
    for i, (folder, name, hr, degrade) in enumerate(pairs):
        for side in ('HR', 'LR_x4'):
            os.makedirs(osp.join(out, folder, side), exist_ok=True)
        cv2.imwrite(osp.join(out, folder, 'HR', f'{name}.png'), hr)
        cv2.imwrite(osp.join(out, folder, 'LR_x4', f'{name}.png'), degrade(hr, seed=i))
    print(f'demo set ready in {out}: {len(TRAIN)} training images (LMDB), {len(val)} validation pairs, '
          f'{len(UNSEEN)} unseen pairs')
    return out


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='datasets/demo')
    parser.add_argument('--overwrite', action='store_true')
    args = parser.parse_args()
    make_demo(args.out, args.overwrite)

"""Build the embedded demo set from the photos and textures that scikit-image ships (no download).

    python datasets/make_demo.py [--out datasets/demo] [--overwrite]

Writes
    datasets/demo/train_HR.lmdb     HR training images (BasicSR LMDB + meta_info.txt)
    datasets/demo/val/HR/*.png      HR validation crops (256x256)
    datasets/demo/val/LR_x4/*.png   their LR images (64x64) from the fixed degradation below

Split: every bundled image with enough structure is used once. Held out for validation: coffee, rocket
(colour photos), gravel (texture) and text (document); the rest (astronaut, chelsea, hubble_deep_field,
immunohistochemistry, retina, colorwheel, brick, grass, camera, moon, coins, clock, page, cell) train.
Gray images are repeated to 3 channels.

Fixed validation degradation (seeded, so every machine gets the same LR images), applied to the HR crop:
    1. Gaussian blur, sigma 1.2, 9x9 kernel (cv2.GaussianBlur, reflect-101 borders)
    2. x4 bicubic downsampling (BasicSR's MATLAB-compatible ``imresize``, antialiased)
    3. additive Gaussian noise, sigma 5/255, numpy seed 0 per image index
    4. JPEG, quality 75 (OpenCV), then decoded again
"""
import argparse
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
VAL = ['coffee', 'rocket', 'gravel', 'text']
SCALE = 4
VAL_HR_SIZE = 256


def load(name):
    """A scikit-image bundled image as uint8 BGR (H, W, 3)."""
    from skimage import data
    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3][..., ::-1])


def center_crop(img, size):
    h, w = img.shape[:2]
    size_h, size_w = min(size, h - h % SCALE), min(size, w - w % SCALE)
    top, left = (h - size_h) // 2, (w - size_w) // 2
    return img[top:top + size_h, left:left + size_w]


def degrade_fixed(hr, seed):
    """The documented fixed degradation: blur -> x4 bicubic down -> noise -> JPEG. uint8 in, uint8 out."""
    from basicsr.utils.matlab_functions import imresize
    x = cv2.GaussianBlur(hr.astype(np.float32) / 255.0, (9, 9), 1.2)
    x = imresize(x, 1 / SCALE)
    x = x + np.random.default_rng(seed).normal(0, 5 / 255.0, x.shape).astype(np.float32)
    x = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode('.jpg', x, [cv2.IMWRITE_JPEG_QUALITY, 75])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def make_demo(out='datasets/demo', overwrite=False):
    if osp.exists(out):
        if not overwrite:
            print(f'{out} exists; nothing to do (use --overwrite to rebuild)')
            return out
        shutil.rmtree(out)
    os.makedirs(osp.join(out, 'val', 'HR'))
    os.makedirs(osp.join(out, 'val', 'LR_x4'))
    build_lmdb(None, osp.join(out, 'train_HR.lmdb'), images=[(name, load(name)) for name in TRAIN])
    for i, name in enumerate(VAL):
        hr = center_crop(load(name), VAL_HR_SIZE)
        cv2.imwrite(osp.join(out, 'val', 'HR', f'{name}.png'), hr)
        cv2.imwrite(osp.join(out, 'val', 'LR_x4', f'{name}.png'), degrade_fixed(hr, seed=i))
    print(f'demo set ready in {out}: {len(TRAIN)} training images (LMDB), {len(VAL)} validation pairs')
    return out


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='datasets/demo')
    parser.add_argument('--overwrite', action='store_true')
    args = parser.parse_args()
    make_demo(args.out, args.overwrite)

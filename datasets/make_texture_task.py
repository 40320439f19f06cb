"""Build the known-answer texture task: procedural images whose fine detail the ×4 LR cannot determine but whose
distribution is known (no download).

    python datasets/make_texture_task.py [--out datasets/texture_task] [--train 256] [--val 24] [--overwrite]

Why. A regression model can only return the mean of what the LR leaves open; a correct conditional diffusion
model samples detail with the right distribution. On photos the two are hard to tell apart from grain; here the
right answer is known, so the generative path (GRM -> PGS -> Patch-DiT + texture prompt) can be checked on a CPU.

Images. 256×256 HR, cut into rectangles by a random recursive split on a 32-px grid (every side at least 96 px, so
that whole V = 16 latent patches of the demo's d = 4 autoencoder, 64 px, lie inside regions), each rectangle one
class. The class is recognisable
from the LR by a low-frequency cue, its mean colour; its detail lies above the LR's Nyquist frequency
(1/8 cycle per HR pixel at ×4), where the LR keeps nothing of it:

============  ==========================  ===============================================================
class         cue (mean colour)           detail (added to all three channels)
============  ==========================  ===============================================================
flat          neutral gray, level U(0.25, 0.75)  none: one exact answer, which the GRM can reach
grating_v     reddish                     cos(2π·0.30·x + φ), amplitude 0.12, φ ~ U(0, 2π): random phase
grating_d     greenish                    cos(2π·0.28·(x + y)/√2 + φ), amplitude 0.12, random phase
field         bluish                      Gaussian random field, power in the annulus |f| = 0.30 ± 0.04
                                          cycles/px (Gaussian profile), RMS 0.075
============  ==========================  ===============================================================

The textured classes' colours get a jitter of ±0.04 per channel, flat regions none (they stay neutral), so the
cue separates the classes. Every value stays inside [0, 1], so no clipping changes the statistics: a field that
would leave it (a > 5σ value, rare) is drawn again.

LR. The demo's fixed degradation (``datasets/make_demo.py``: Gaussian blur σ 1.2, ×4 antialiased bicubic,
noise σ 5/255, JPEG 75), the same for training and validation, seeded per image. After it, the textures leave
nothing above the noise in the LR: the high-pass (minus a 5×5 box mean) standard deviation of the LR luminance
inside textured regions is 2.0-2.2 gray levels, against 4.1 inside flat ones (noise and JPEG only).

Writes
    <out>/train_HR.lmdb, <out>/train_LR_x4.lmdb   training pairs (BasicSR LMDB, the same keys)
    <out>/val/{HR,LR_x4,labels}/*.png              validation pairs and their class maps (uint8: class index,
                                                   255 on the two pixels either side of a region boundary)
    <out>/classes.json                             the classes: index, name, cue colour, detail
"""
import argparse
import json
import os
import os.path as osp
import shutil
import sys

import cv2
import numpy as np

HERE = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, osp.abspath(osp.join(HERE, osp.pardir)))
sys.path.insert(0, HERE)

from make_demo import degrade_fixed  # noqa: E402  (also imports patchscaler: the BasicSR fixes)

from patchscaler.data.lmdb_builder import build_lmdb  # noqa: E402

SIZE, GRID, MIN_SIDE = 256, 32, 96
BORDER = 255  # class-map value of the pixels next to a region boundary
AMPLITUDE, FIELD_RMS, JITTER = 0.12, 0.075, 0.04
CLASSES = [
    {'name': 'flat', 'cue': 'neutral gray', 'detail': 'none'},
    {'name': 'grating_v', 'cue': [0.60, 0.44, 0.42], 'detail': 'cos(2π·0.30·x + φ), amplitude 0.12, random φ',
     'frequency': 0.30, 'angle': 0.0},
    {'name': 'grating_d', 'cue': [0.44, 0.60, 0.44],
     'detail': 'cos(2π·0.28·(x + y)/√2 + φ), amplitude 0.12, random φ', 'frequency': 0.28, 'angle': 45.0},
    {'name': 'field', 'cue': [0.42, 0.46, 0.62], 'detail': 'Gaussian random field, |f| = 0.30 ± 0.04, RMS 0.075',
     'frequency': 0.30, 'bandwidth': 0.04},
]
CLASS_PROBS = [0.4, 0.2, 0.2, 0.2]


def split_rectangles(rng, top, left, h, w):
    """A random recursive split of (top, left, h, w) on the GRID with sides >= MIN_SIDE: [(top, left, h, w)]."""
    can_h, can_w = h >= 2 * MIN_SIDE, w >= 2 * MIN_SIDE
    if not (can_h or can_w) or rng.random() < 0.25 * (h * w <= 128 * 128):
        return [(top, left, h, w)]
    horizontal = can_h and (not can_w or rng.random() < h / (h + w))
    side = h if horizontal else w
    cut = GRID * int(rng.integers(MIN_SIDE // GRID, (side - MIN_SIDE) // GRID + 1))
    if horizontal:
        return split_rectangles(rng, top, left, cut, w) + split_rectangles(rng, top + cut, left, h - cut, w)
    return split_rectangles(rng, top, left, h, cut) + split_rectangles(rng, top, left + cut, h, w - cut)


def grating(rng, h, w, frequency, angle):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.deg2rad(angle)
    return AMPLITUDE * np.cos(2 * np.pi * frequency * (x * np.cos(a) + y * np.sin(a)) + rng.uniform(0, 2 * np.pi))


def random_field(rng, h, w, frequency, bandwidth):
    """Stationary Gaussian field with power exp(-(|f| - f0)² / 2b²), scaled to FIELD_RMS."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    amplitude = np.exp(-(np.hypot(fy, fx) - frequency) ** 2 / (4 * bandwidth ** 2))  # sqrt of the power
    field = np.fft.ifft2(np.fft.fft2(rng.standard_normal((h, w))) * amplitude).real
    return field * FIELD_RMS / field.std()


def make_image(rng):
    """(HR float (SIZE, SIZE, 3) RGB in [0, 1], class map uint8 (SIZE, SIZE)). In the class map the two pixels on
    either side of a region boundary are BORDER: two neighbouring regions of one class (two flat grays, two
    gratings of different phase) are not one stationary region."""
    img, labels = np.zeros((SIZE, SIZE, 3)), np.zeros((SIZE, SIZE), np.uint8)
    regions = np.zeros((SIZE, SIZE), np.int32)
    for r, (top, left, h, w) in enumerate(split_rectangles(rng, 0, 0, SIZE, SIZE)):
        regions[top:top + h, left:left + w] = r
        k = int(rng.choice(len(CLASSES), p=CLASS_PROBS))
        spec = CLASSES[k]
        if spec['name'] == 'flat':
            colour, detail = np.full(3, rng.uniform(0.25, 0.75)), 0.0
        else:
            colour = np.asarray(spec['cue']) + rng.uniform(-JITTER, JITTER, 3)
            if 'bandwidth' in spec:
                detail = random_field(rng, h, w, spec['frequency'], spec['bandwidth'])
                while (colour.min() + detail.min() < 0) or (colour.max() + detail.max() > 1):
                    detail = random_field(rng, h, w, spec['frequency'], spec['bandwidth'])
            else:
                detail = grating(rng, h, w, spec['frequency'], spec['angle'])
        img[top:top + h, left:left + w] = colour + np.asarray(detail)[..., None]
        labels[top:top + h, left:left + w] = k
    edge = np.zeros_like(labels, bool)
    edge[:, 1:] |= regions[:, 1:] != regions[:, :-1]
    edge[:, :-1] |= regions[:, 1:] != regions[:, :-1]
    edge[1:] |= regions[1:] != regions[:-1]
    edge[:-1] |= regions[1:] != regions[:-1]
    labels[edge] = BORDER
    if img.min() < 0 or img.max() > 1:
        raise AssertionError('a texture left [0, 1]: the class statistics would be clipped')
    return img, labels


def to_bgr_uint8(img):
    return np.ascontiguousarray(np.round(img[..., ::-1] * 255).astype(np.uint8))


def make_texture_task(out='datasets/texture_task', train=256, val=24, overwrite=False, seed=0):
    """Write the task to ``out`` (built in ``<out>.partial`` and renamed at the end: an interrupted run leaves
    no half-built set that a later run would take as done)."""
    if osp.exists(out):
        if not overwrite:
            print(f'{out} exists; nothing to do (use --overwrite to rebuild)')
            return out
        shutil.rmtree(out)
    tmp = out.rstrip('/') + '.partial'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    pairs = {'train': [], 'val': []}
    for split, count, offset in (('train', train, 0), ('val', val, 1_000_000)):
        for i in range(count):
            rng = np.random.default_rng([seed, offset + i])
            hr, labels = make_image(rng)
            hr = to_bgr_uint8(hr)
            lr = degrade_fixed(hr, seed=seed * 10_000_000 + offset + i)
            pairs[split].append((f'{split}_{i:04d}', hr, lr, labels))
    build_lmdb(None, osp.join(tmp, 'train_HR.lmdb'), images=[(k, hr) for k, hr, _, _ in pairs['train']])
    build_lmdb(None, osp.join(tmp, 'train_LR_x4.lmdb'), images=[(k, lr) for k, _, lr, _ in pairs['train']])
    for side in ('HR', 'LR_x4', 'labels'):
        os.makedirs(osp.join(tmp, 'val', side))
    for key, hr, lr, labels in pairs['val']:
        cv2.imwrite(osp.join(tmp, 'val', 'HR', f'{key}.png'), hr)
        cv2.imwrite(osp.join(tmp, 'val', 'LR_x4', f'{key}.png'), lr)
        cv2.imwrite(osp.join(tmp, 'val', 'labels', f'{key}.png'), labels)
    with open(osp.join(tmp, 'classes.json'), 'w') as f:
        json.dump({'classes': [dict(c, index=i) for i, c in enumerate(CLASSES)], 'flat_class': 0, 'border': BORDER,
                   'scale': 4,
                   'lr_nyquist_cycles_per_px': 0.125}, f, indent=1)
    os.replace(tmp, out)
    print(f'texture task ready in {out}: {train} training pairs (LMDB), {val} validation pairs with class maps')
    return out


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='datasets/texture_task')
    parser.add_argument('--train', type=int, default=256, help='training pairs')
    parser.add_argument('--val', type=int, default=24, help='validation pairs')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--overwrite', action='store_true')
    args = parser.parse_args()
    make_texture_task(args.out, args.train, args.val, args.overwrite, args.seed)

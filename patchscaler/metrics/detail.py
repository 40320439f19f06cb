"""Measures of restored detail: is what a generative stage adds texture, grain, or nothing?

PSNR alone cannot tell a blurry answer from a grainy one. Next to it, on uint8 (H, W, 3) images (BasicSR's
``tensor2img`` output, BGR), optionally over a mask of pixels:

* **high-frequency energy**: the mean squared response of the 3×3 Laplacian (per channel, at pixels whose whole
  3×3 neighbourhood is inside the mask). Its ratio to the HR's is ≪ 1 for a regression answer (the mean of
  what the LR leaves open: no detail), ≈ 1 for detail of the right strength, > 1 with a PSNR loss for grain.
* **spectrum distance** of the high-pass band: the luminance's power spectrum above the LR's Nyquist frequency
  (|f| > ``0.5 / scale`` cycles per pixel, a disk so that every orientation is cut alike; the corners of the
  LR's square passband, up to 0.18 at ×4, fall inside the band) up to 0.5, Welch-averaged over Hann-windowed
  ``tile``² tiles that lie inside the mask, in ``radial_bins`` × ``angular_bins`` bins (|f| and orientation in
  [0°, 180°)); the distance
  is the RMS over bins of ``10·log10((P + floor) / (P_HR + floor))`` in dB, each bin weighted by the mean of its
  shares of the two spectra's power (bins neither has power in do not count), the floor 30 dB below the HR's mean
  bin power (a band with no power at all counts as 30 dB and more missing, not as infinity). Right strength but
  wrong shape (white grain where the HR has an oriented grating) shows here, not in the energy ratio; 0 dB is
  the HR's own spectrum.
* PSNR over the mask (RGB, the pooled MSE of its pixels) and NIQE (BasicSR's, no reference) on whole images.

:class:`DetailAccumulator` pools these over a set of images (sums of squared errors, energies and spectra, so a
set's or a class's figure is one measure over all its pixels or tiles): what ``tools/evaluate_detail.py``
(:mod:`patchscaler.compare.detail`) reports, and what PatchScalerModel's validation logs.
"""
import json
import math
from os import path as osp

import cv2
import numpy as np

from patchscaler.utils.errors import ConfigError

LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)
SPECTRUM_FLOOR_DB = 30.0


def _float(img):
    return np.asarray(img, dtype=np.float64)


def _crop(img, crop_border):
    return img[crop_border:-crop_border, crop_border:-crop_border] if crop_border else img


def _full_mask(img, mask):
    if mask is None:
        return np.ones(img.shape[:2], bool)
    mask = np.asarray(mask, bool)
    if mask.shape != img.shape[:2]:
        raise ValueError(f'mask {mask.shape} must match the image {img.shape[:2]}')
    return mask


def squared_error(img, img2, mask=None):
    """(sum of squared errors over the mask's pixels and all channels, number of values)."""
    m = _full_mask(img, mask)
    d = _float(img)[m] - _float(img2)[m]
    return float((d ** 2).sum()), int(d.size)


def psnr_from(sse, count, peak=255.0):
    if count == 0:
        return float('nan')
    mse = sse / count
    return float('inf') if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def laplacian_energy(img, mask=None):
    """(sum of squared 3×3 Laplacian responses, number of values) over pixels whose 3×3 window is in the mask."""
    m = _full_mask(img, mask).astype(np.uint8)
    inner = cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
    x = _float(img)
    resp = cv2.filter2D(x, cv2.CV_64F, LAPLACIAN, borderType=cv2.BORDER_REFLECT)
    if resp.ndim == 2:
        resp = resp[..., None]
    vals = resp[inner]
    return float((vals ** 2).sum()), int(vals.size)


def luminance(img_bgr):
    """ITU-R BT.601 luma of a BGR image (any range), float64 (H, W)."""
    x = _float(img_bgr)
    if x.ndim == 2:
        return x
    return 0.114 * x[..., 0] + 0.587 * x[..., 1] + 0.299 * x[..., 2]


def spectrum_bins(tile, scale, radial_bins, angular_bins):
    """Bin index (tile, tile) int of each 2-D frequency in the high-pass band, -1 outside it."""
    f = np.fft.fftfreq(tile)
    fy, fx = np.meshgrid(f, f, indexing='ij')
    radius = np.hypot(fy, fx)
    angle = np.mod(np.degrees(np.arctan2(fy, fx)), 180.0)
    low = 0.5 / scale
    r = np.floor((radius - low) / (0.5 - low) * radial_bins).astype(int)
    a = np.minimum((angle / 180.0 * angular_bins).astype(int), angular_bins - 1)
    inside = (radius > low) & (radius <= 0.5)
    return np.where(inside, np.minimum(r, radial_bins - 1) * angular_bins + a, -1)


def band_power(img, mask=None, scale=4, tile=32, stride=None, radial_bins=6, angular_bins=8):
    """(summed power per bin (radial_bins·angular_bins,), number of tiles): the luminance's high-pass spectrum,
    Welch-style over Hann-windowed, mean-removed tiles lying wholly inside the mask."""
    y = luminance(img)
    m = _full_mask(y, mask)
    stride = stride or tile // 2
    bins = spectrum_bins(tile, scale, radial_bins, angular_bins)
    window = np.outer(np.hanning(tile), np.hanning(tile))
    nb = radial_bins * angular_bins
    total, tiles = np.zeros(nb), 0
    h, w = y.shape
    integral = np.pad(m.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    for top in range(0, h - tile + 1, stride):
        for left in range(0, w - tile + 1, stride):
            inside = (integral[top + tile, left + tile] - integral[top, left + tile] - integral[top + tile, left]
                      + integral[top, left])
            if inside < tile * tile:
                continue
            patch = y[top:top + tile, left:left + tile]
            power = np.abs(np.fft.fft2((patch - patch.mean()) * window)) ** 2
            sel = bins >= 0
            total += np.bincount(bins[sel], weights=power[sel], minlength=nb)
            tiles += 1
    return total, tiles


def spectrum_distance_from(power, power_ref):
    """Power-weighted RMS of the per-bin log ratio ``10·log10((P + floor) / (P_ref + floor))`` in dB: each bin is
    weighted by the mean of its shares of the two spectra's power, so a band that neither image has power in does
    not count, and a band that one has and the other lacks counts fully. See the module docstring."""
    power, power_ref = np.asarray(power, np.float64), np.asarray(power_ref, np.float64)
    if not power_ref.sum() > 0:
        return float('nan')
    floor = power_ref.mean() * 10 ** (-SPECTRUM_FLOOR_DB / 10)
    share_ref = power_ref / power_ref.sum()
    weight = 0.5 * (share_ref + power / power.sum()) if power.sum() > 0 else share_ref
    d = 10 * np.log10((power + floor) / (power_ref + floor))
    return float(np.sqrt((weight * d ** 2).sum()))


class DetailAccumulator:
    """Pools the detail measures of one output (e.g. the GRM's) against the HR over a set of images and masks."""

    def __init__(self, scale=4, tile=32, radial_bins=6, angular_bins=8):
        self.scale, self.tile, self.radial_bins, self.angular_bins = scale, tile, radial_bins, angular_bins
        nb = radial_bins * angular_bins
        self.sse = self.values = 0
        self.energy = self.energy_ref = 0.0
        self.power, self.power_ref, self.tiles = np.zeros(nb), np.zeros(nb), 0
        self.images = 0

    def add(self, img, img_ref, mask=None):
        if mask is not None and not np.asarray(mask).any():
            return
        s, n = squared_error(img, img_ref, mask)
        self.sse, self.values = self.sse + s, self.values + n
        self.energy += laplacian_energy(img, mask)[0]
        self.energy_ref += laplacian_energy(img_ref, mask)[0]
        kw = dict(scale=self.scale, tile=self.tile, radial_bins=self.radial_bins, angular_bins=self.angular_bins)
        p, t = band_power(img, mask, **kw)
        p_ref, _ = band_power(img_ref, mask, **kw)
        self.power, self.power_ref, self.tiles = self.power + p, self.power_ref + p_ref, self.tiles + t
        self.images += 1

    def result(self):
        """{'psnr', 'hf_energy_ratio', 'spectrum_distance_db', 'pixels', 'tiles'} of everything added."""
        return {'psnr': psnr_from(self.sse, self.values),
                'hf_energy_ratio': self.energy / self.energy_ref if self.energy_ref > 0 else float('nan'),
                'spectrum_distance_db': spectrum_distance_from(self.power, self.power_ref) if self.tiles else
                float('nan'),
                'pixels': self.values // 3, 'tiles': self.tiles}


def simple_mask(groups, grid, factor, size):
    """(H, W) bool: the HR pixels whose nearest-centre patch is in group 0 (simple); ``groups`` (M,) over ``grid``."""
    owner = grid.owner_map().numpy()
    simple = (np.asarray(groups).reshape(-1) == 0)[owner]
    big = np.repeat(np.repeat(simple, factor, 0), factor, 1)
    return big[:size[0], :size[1]]


def flat_patches(groups, grid, labels, factor, flat_class=0):
    """(number of patches whose HR pixels are all of ``flat_class``, how many of them are graded simple)."""
    groups = np.asarray(groups).reshape(-1)
    count = simple = 0
    for m, (top, left, bottom, right) in enumerate(grid.boxes()):
        box = labels[top * factor:bottom * factor, left * factor:right * factor]
        if box.size and (box == flat_class).all():
            count += 1
            simple += int(groups[m] == 0)
    return count, simple


def border_mask(size, crop_border):
    m = np.zeros(size, bool)
    c = crop_border
    m[c:size[0] - c, c:size[1] - c] = True
    return m


def class_masks(labels, classes, margin, base):
    out = {}
    for k, spec in enumerate(classes):
        m = (labels == spec.get('index', k)).astype(np.uint8)
        if margin:
            m = cv2.erode(m, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8), borderType=cv2.BORDER_CONSTANT,
                          borderValue=0)
        out[spec['name']] = (m > 0) & base
    return out


def _niqe(img, crop_border):
    from basicsr.metrics.niqe import calculate_niqe
    try:
        return float(calculate_niqe(img, crop_border, input_order='HWC', convert_to='y'))
    except Exception:  # noqa: BLE001 - too small an image for NIQE's 96-px blocks: no score, not a failed run
        return float('nan')


class DetailScores:
    """The detail measures of one image set, per output ('GRM', 'PGS', ...): whole images, simple-group pixels and,
    with class maps, each class; per-image PSNR and NIQE; NFE; the share of flat patches graded simple."""

    def __init__(self, scale, classes=None, num_groups=3, flat_class=0):
        self.scale, self.classes, self.num_groups, self.flat_class = scale, classes, num_groups, flat_class
        self.whole, self.simple, self.per_class = {}, {}, {}
        self.psnr, self.niqe, self.nfe = {}, {}, {}
        self.flat_count = self.flat_simple = 0
        self.group_counts = None
        self.images = 0

    @classmethod
    def for_dataset(cls, scale, ds_opt, num_groups=3):
        """Scores for one dataset option dict: per class (``classes.json``) when it has ``dataroot_labels``."""
        classes, flat_class = load_classes(ds_opt) if ds_opt.get('dataroot_labels') else (None, 0)
        return cls(scale, classes, num_groups, flat_class)

    def _acc(self, table, key):
        if key not in table:
            table[key] = DetailAccumulator(self.scale)
        return table[key]

    def add(self, name, img, hr, base, simple, class_masks=None, niqe=False, crop_border=0):
        self._acc(self.whole, name).add(img, hr, base)
        self._acc(self.simple, name).add(img, hr, simple & base)
        self.psnr.setdefault(name, []).append(psnr_from(*squared_error(img, hr, base)))
        if niqe:
            self.niqe.setdefault(name, []).append(_niqe(img, crop_border))
        for cls, m in (class_masks or {}).items():
            self._acc(self.per_class.setdefault(cls, {}), name).add(img, hr, m)

    def add_image(self, images, hr, groups, grid, factor, crop_border=4, labels=None, margin=8, nfe=None):
        """Score one image: ``images`` {output: uint8 BGR}, ``hr``, the PGS grading ``groups`` (M,) on ``grid``;
        ``labels`` (H, W) class map of the scores' classes (the known-answer task); ``nfe`` {output: patch
        evaluations}."""
        size = hr.shape[:2]
        base = border_mask(size, crop_border)
        simple = simple_mask(groups, grid, factor, size)
        masks = class_masks(labels, self.classes, margin, base) if labels is not None else None
        for k, img in images.items():
            self.add(k, img, hr, base, simple, masks, niqe=labels is None, crop_border=crop_border)
        for k, n in (nfe or {}).items():
            self.nfe.setdefault(k, []).append(n)
        counts = np.bincount(np.asarray(groups).reshape(-1), minlength=self.num_groups)
        self.group_counts = counts if self.group_counts is None else self.group_counts + counts
        if labels is not None:
            n, s = flat_patches(groups, grid, labels, factor, self.flat_class)
            self.flat_count, self.flat_simple = self.flat_count + n, self.flat_simple + s
        self.images += 1

    def result(self):
        out = {'images': self.images, 'outputs': {}}
        uniform_nfe = np.mean(self.nfe['uniform']) if self.nfe.get('uniform') else None
        for name, acc in self.whole.items():
            r = acc.result()
            row = {'psnr': float(np.mean(self.psnr[name])), 'psnr_simple': self.simple[name].result()['psnr'],
                   'hf_energy_ratio': r['hf_energy_ratio'], 'spectrum_distance_db': r['spectrum_distance_db']}
            if self.niqe.get(name):
                row['niqe'] = float(np.nanmean(self.niqe[name])) if not all(map(math.isnan, self.niqe[name])) \
                    else float('nan')
            if self.nfe.get(name):
                row['nfe_per_image'] = float(np.mean(self.nfe[name]))
                row['nfe_ratio'] = row['nfe_per_image'] / uniform_nfe if uniform_nfe else float('nan')
            out['outputs'][name] = row
        if self.per_class:
            out['classes'] = {cls: {name: acc.result() for name, acc in accs.items()}
                              for cls, accs in self.per_class.items()}
            out['flat_patches'] = self.flat_count
            out['flat_patches_simple'] = self.flat_simple / self.flat_count if self.flat_count else float('nan')
        if self.group_counts is not None:
            total = max(int(self.group_counts.sum()), 1)
            out['group_shares'] = [float(c) / total for c in self.group_counts]
        return out


def load_classes(ds_opt):
    """The class list of a labelled set: ``classes.json`` beside or above the labels folder."""
    folder = ds_opt['dataroot_labels']
    for candidate in (osp.join(folder, 'classes.json'), osp.join(folder, osp.pardir, 'classes.json'),
                      osp.join(folder, osp.pardir, osp.pardir, 'classes.json')):
        if osp.isfile(candidate):
            with open(candidate) as f:
                meta = json.load(f)
            return meta['classes'], meta.get('flat_class', 0)
    raise ConfigError(f'{folder}: no classes.json beside or above the class maps (datasets/make_texture_task.py '
                      f'writes one)')

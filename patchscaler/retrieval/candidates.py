"""RTM candidates: V×V latent texture patches cut from high-quality images.

The paper extracts 20,000 latent patches from DIV2K, OutdoorSceneTraining and Manga109. Here: any list of
image folders or BasicSR LMDBs. Per image, patch positions (in pixels, P = V·d a side, aligned to the
autoencoder factor d) are drawn at random or taken on a non-overlapping grid; flat patches (grey-level
standard deviation below ``min_std``: sky, walls, borders) are skipped; each kept patch is encoded inside a
window with ``context`` latent pixels of image around it (clipped to the image), so that its latent sees
the same neighbourhood it has when a whole image is encoded, and cut out of the window's latent.
Unreadable images and images smaller than one patch are skipped with a warning and listed in the report.
"""
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from basicsr.utils import img2tensor

from patchscaler.data.image_io import ImageSource
from patchscaler.utils.device import placement
from patchscaler.utils.errors import ConfigError, DataError

MODES = ('random', 'grid')


@dataclass
class CandidateReport:
    images: int = 0
    used: int = 0
    flat_rejected: int = 0
    candidates: int = 0
    skipped: list = field(default_factory=list)  # (image, reason)

    def summary(self):
        text = (f'{self.candidates} candidate patches from {self.used} of {self.images} images '
                f'({self.flat_rejected} flat patches rejected')
        return text + (f', {len(self.skipped)} images skipped)' if self.skipped else ')')


def open_sources(sources):
    """[ImageSource] from a list of folders / LMDB paths / ``{root, meta_info}`` dicts (one-line errors)."""
    if isinstance(sources, (str, dict)):
        sources = [sources]
    if not sources:
        raise ConfigError('sources: give at least one image folder or LMDB')
    out = []
    for src in sources:
        if isinstance(src, dict):
            unknown = set(src) - {'root', 'meta_info'}
            if 'root' not in src or unknown:
                raise ConfigError(f"a source must be a path or {{root, meta_info}}, got {src!r}")
            out.append(ImageSource(src['root'], src.get('meta_info')))
        else:
            out.append(ImageSource(str(src)))
    return out


def _positions(h, w, p, d, mode, count, rng):
    """Top-left pixel corners of P×P patches inside (h, w), aligned to d."""
    if mode == 'grid':
        ys, xs = np.arange(0, h - p + 1, p), np.arange(0, w - p + 1, p)
        return [(int(y), int(x)) for y in ys for x in xs]
    ny, nx = (h - p) // d + 1, (w - p) // d + 1
    picks = rng.choice(ny * nx, size=min(count, ny * nx), replace=False)
    return [(int(i // nx) * d, int(i % nx) * d) for i in picks]


def _window(y, size, extent, margin):
    """Start of a window of ``size`` (clipped to ``extent``) holding [y, y + P) with ``margin`` around it."""
    size = min(size, extent)
    return min(max(y - margin, 0), extent - size), size


def collect_candidates(sources, autoencoder, patch_size, num=20000, mode='random', min_std=0.04, context=4,
                       seed=0, batch_size=16, device='cpu', progress=True):
    """Latent candidate patches for an RTM.

    Args:
        sources: image folders / LMDBs (see :func:`open_sources`).
        autoencoder: the frozen autoencoder (``encode``, ``downscale_factor``, ``latent_channels``).
        patch_size (int): V, latent patch side.
        num (int): how many candidates to return at most (paper: 20,000). ``random`` mode draws about
            ``2 · num / images`` positions per image (the extra covers flat rejections) and keeps a
            seeded random ``num`` of the result; ``grid`` takes every grid patch and does the same.
        mode (str): ``random`` or ``grid``.
        min_std (float): skip patches whose grey-level standard deviation (pixels in [0, 1]) is lower.
        context (int): latent pixels of surrounding image encoded with each patch.
        seed (int): positions and the final subset.
        batch_size (int): windows per autoencoder call.

    Returns:
        (values (N, c, V, V) float32 on CPU, origins [(image name, y, x) in pixels], CandidateReport)
    """
    if mode not in MODES:
        raise ConfigError(f'candidates.mode must be one of {MODES}, got {mode!r}')
    if int(num) < 1 or int(patch_size) < 1:
        raise ConfigError(f'candidates.num and patch_size must be >= 1, got {num}, {patch_size}')
    d = int(autoencoder.downscale_factor)
    p, margin = int(patch_size) * d, int(context) * d
    images = [(src, i) for src in open_sources(sources) for i in range(len(src))]
    report = CandidateReport(images=len(images))
    rng = np.random.default_rng(seed)
    per_image = max(1, math.ceil(2 * int(num) / len(images)))
    values, origins = [], []
    bar = images
    if progress:
        from tqdm import tqdm
        bar = tqdm(images, desc='RTM candidates', unit='img')
    for src, i in bar:
        name = src.name(i)
        try:
            img = src.read(i)
        except DataError as e:
            report.skipped.append((name, str(e)))
            warnings.warn(f'RTM candidates: skipping {name}: {e}', stacklevel=2)
            continue
        h, w = (s - s % d for s in img.shape[:2])
        if min(h, w) < p:
            reason = f'{img.shape[1]}×{img.shape[0]} px is smaller than one patch ({p}×{p} px: V={patch_size}, d={d})'
            report.skipped.append((name, reason))
            warnings.warn(f'RTM candidates: skipping {name}: {reason}', stacklevel=2)
            continue
        gray = img[:h, :w] @ np.array([0.114, 0.587, 0.299], np.float32)  # BGR -> luma
        kept = []
        for y, x in _positions(h, w, p, d, mode, per_image, rng):
            if gray[y:y + p, x:x + p].std() < min_std:
                report.flat_rejected += 1
            else:
                kept.append((y, x))
        if not kept:
            continue
        report.used += 1
        rgb = img2tensor(img[:h, :w], bgr2rgb=True, float32=True)
        windows = [(_window(y, p + 2 * margin, h, margin), _window(x, p + 2 * margin, w, margin)) for y, x in kept]
        values += _encode_windows(autoencoder, rgb, kept, windows, d, int(patch_size), batch_size, device)
        origins += [(name, y, x) for y, x in kept]
    if not values:
        skipped = f'{len(report.skipped)} skipped as unreadable or too small, e.g. {report.skipped[0][0]}: ' \
            f'{report.skipped[0][1]}' if report.skipped else 'none unreadable or too small'
        raise DataError(f'no usable patches in {report.images} images: every patch was flat (grey std below '
                        f'min_std {min_std}) or its image was skipped ({skipped})')
    values = torch.stack(values)
    if len(values) > int(num):
        keep = np.sort(rng.choice(len(values), size=int(num), replace=False))
        values, origins = values[torch.from_numpy(keep)], [origins[k] for k in keep]
    report.candidates = len(values)
    return values, origins, report


def _encode_windows(autoencoder, rgb, kept, windows, d, v, batch_size, device):
    """Encode the windows (same-sized ones batched) and cut each patch's V×V latent out of its window."""
    device, dtype = placement(autoencoder, device)
    out = [None] * len(kept)
    by_shape = {}
    for j, ((_, sh), (_, sw)) in enumerate(windows):
        by_shape.setdefault((sh, sw), []).append(j)
    for members in by_shape.values():
        for b in range(0, len(members), max(1, batch_size)):
            batch = members[b:b + batch_size]
            crops = torch.stack([rgb[:, windows[j][0][0]:windows[j][0][0] + windows[j][0][1],
                                     windows[j][1][0]:windows[j][1][0] + windows[j][1][1]] for j in batch])
            with torch.no_grad():
                latents = autoencoder.encode(crops.to(device, dtype)).float().cpu()
            for latent, j in zip(latents, batch):
                ly, lx = (kept[j][0] - windows[j][0][0]) // d, (kept[j][1] - windows[j][1][0]) // d
                out[j] = latent[:, ly:ly + v, lx:lx + v].clone()
    return out

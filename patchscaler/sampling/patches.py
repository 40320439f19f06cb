"""Overlapping V×V latent patches and their blending back into one latent (PGS's patch set).

The paper decomposes the coarse HR latent into *overlapping* patches "to eliminate potential boundary
effects" (section 4.1, citing StableSR's tiled sampling). Choices the paper leaves open, made here:

- Patch starts are ``0, stride, 2·stride, …`` plus one last patch flush with the far border, so every
  pixel is covered for any h, w (not only multiples of the stride). Default stride: V // 2 (half overlap).
- A latent smaller than V along a side is padded up to V (reflect where the side allows it, replicate
  otherwise); :meth:`PatchGrid.blend` crops the padding away again. A patch denoiser trained on V×V
  patches (Patch-DiT has a fixed token grid) therefore never sees another size.
- Blending is the per-pixel weighted mean of all patches covering the pixel. Weights: ``gaussian``
  (default; σ = 0.1·V as in StableSR's tile weights, so the centre of a patch, far from its boundary,
  dominates), ``linear`` (a pyramid, MultiDiffusion-like ramps) or ``uniform`` (plain averaging). All are
  strictly positive, so every covered pixel has a defined mean.
- Accumulation is in float64, so blending a patchified float32/16 tensor returns it bit for bit.
"""
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..utils.errors import ConfigError, InputError
from ..utils.padding import pad_bottom_right

BLEND_WINDOWS = ('gaussian', 'linear', 'uniform')


def _starts(length, patch, stride):
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


@lru_cache(maxsize=32)
def _window_1d(kind, size, sigma):
    i = torch.arange(size, dtype=torch.float64)
    centre = (size - 1) / 2
    if kind == 'gaussian':
        return torch.exp(-((i - centre) ** 2) / (2 * (sigma * size) ** 2))
    if kind == 'linear':
        return 1.0 - (i - centre).abs() / (centre + 1)
    return torch.ones(size, dtype=torch.float64)


def blend_window(kind, size, sigma=0.1):
    """(V, V) float64 blending weights, all > 0: the outer product of a 1-D window."""
    if kind not in BLEND_WINDOWS:
        raise ConfigError(f"blend window '{kind}' is not one of {BLEND_WINDOWS}")
    if kind == 'gaussian' and not sigma > 0:
        raise ConfigError(f'blend sigma must be > 0 (a fraction of the patch size), got {sigma}')
    w = _window_1d(kind, int(size), float(sigma))
    return torch.outer(w, w).clamp_min(1e-300)


@dataclass(frozen=True)
class PatchGrid:
    """Where the V×V patches of an (h, w) latent lie. Patch m = row-major index over (rows, cols)."""

    height: int
    width: int
    patch_size: int
    stride: int

    @classmethod
    def for_shape(cls, height, width, patch_size, stride=None):
        patch_size = int(patch_size)
        stride = patch_size // 2 if stride is None else int(stride)
        if patch_size < 1 or not 1 <= stride <= patch_size:
            raise ConfigError(f'patch_size must be >= 1 and 1 <= stride <= patch_size, got V={patch_size}, '
                              f'stride={stride} (a stride above V would leave pixels uncovered)')
        if height < 1 or width < 1:
            raise InputError(f'cannot split an empty latent of size {height}x{width} into patches')
        return cls(int(height), int(width), patch_size, stride)

    @property
    def padded_size(self):
        return max(self.height, self.patch_size), max(self.width, self.patch_size)

    @property
    def rows(self):
        return _starts(self.padded_size[0], self.patch_size, self.stride)

    @property
    def cols(self):
        return _starts(self.padded_size[1], self.patch_size, self.stride)

    @property
    def num_patches(self):
        return len(self.rows) * len(self.cols)

    def boxes(self):
        """(top, left, bottom, right) per patch in the unpadded latent, clipped to it; row-major."""
        v = self.patch_size
        return [(y, x, min(y + v, self.height), min(x + v, self.width)) for y in self.rows for x in self.cols]

    def _flat_index(self, device):
        v = self.patch_size
        ar = torch.arange(v, device=device)
        rows = torch.tensor(self.rows, device=device)[:, None] + ar  # (ny, V)
        cols = torch.tensor(self.cols, device=device)[:, None] + ar  # (nx, V)
        return rows, cols

    def _pad(self, x):
        return pad_bottom_right(x, self.padded_size[0] - self.height, self.padded_size[1] - self.width)

    def check(self, x, name='latent'):
        if x.dim() != 4 or tuple(x.shape[-2:]) != (self.height, self.width):
            raise InputError(f'{name} must be (B, C, {self.height}, {self.width}) for this patch grid, '
                             f'got {tuple(x.shape)}')

    def patchify(self, x):
        """(B, C, h, w) -> (B, M, C, V, V) overlapping patches (a gather; no copy of the loop in Python)."""
        self.check(x)
        rows, cols = self._flat_index(x.device)
        p = self._pad(x)[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # (B, C, ny, nx, V, V)
        b, c, ny, nx, v, _ = p.shape
        return p.permute(0, 2, 3, 1, 4, 5).reshape(b, ny * nx, c, v, v)

    def blend(self, patches, window='gaussian', sigma=0.1):
        """(B, M, C, V, V) -> (B, C, h, w): the per-pixel weighted mean of the patches covering each pixel."""
        if patches.dim() != 5 or patches.shape[1] != self.num_patches or \
                tuple(patches.shape[-2:]) != (self.patch_size, self.patch_size):
            raise InputError(f'expected (B, {self.num_patches}, C, {self.patch_size}, {self.patch_size}) '
                             f'patches for a {self.height}x{self.width} latent, got {tuple(patches.shape)}')
        b, m, c, v, _ = patches.shape
        hp, wp = self.padded_size
        # float64 sums make patchify -> blend exact for float32 and below; MPS has no float64.
        acc_dtype = torch.float32 if patches.device.type == 'mps' else torch.float64
        weight = blend_window(window, v, sigma).to(patches.device, acc_dtype)
        rows, cols = self._flat_index(patches.device)
        index = (rows[:, None, :, None] * wp + cols[None, :, None, :]).reshape(-1)  # (M·V·V,)
        values = (patches.to(acc_dtype) * weight).permute(0, 2, 1, 3, 4).reshape(b, c, m * v * v)
        num = torch.zeros(b, c, hp * wp, dtype=acc_dtype, device=patches.device).index_add_(2, index, values)
        den = torch.zeros(hp * wp, dtype=acc_dtype, device=patches.device).index_add_(
            0, index, weight.expand(m, v, v).reshape(-1))
        out = (num / den).view(b, c, hp, wp)[:, :, :self.height, :self.width]
        return out.to(patches.dtype)

    def owner_map(self):
        """(h, w) long: for each latent pixel, the patch whose centre is nearest (the one the Gaussian blend
        weights most) — used to draw Qmap and the groups as a map."""
        def owners(starts, length):
            pos = torch.arange(length, dtype=torch.float64)[:, None]
            st = torch.tensor(starts, dtype=torch.float64)[None]
            dist = (pos - (st + (self.patch_size - 1) / 2)).abs()
            dist[(pos < st) | (pos >= st + self.patch_size)] = float('inf')
            return dist.argmin(1)
        rows, cols = owners(self.rows, self.height), owners(self.cols, self.width)
        return rows[:, None] * len(self.cols) + cols[None, :]

    def patch_mean(self, x):
        """(B, C, h, w) -> (B, M): the mean of x over each patch's pixels inside the latent (not the padding).

        This is Avg(C<y_0,i>) of Eq. 2 when x is the confidence map.
        """
        self.check(x)
        integral = F.pad(x.double().sum(1).cumsum(1).cumsum(2), (1, 0, 1, 0))  # (B, h+1, w+1)
        box = torch.tensor(self.boxes(), device=x.device)
        top, left, bottom, right = box.unbind(1)
        s = integral[:, bottom, right] - integral[:, top, right] - integral[:, bottom, left] + integral[:, top, left]
        area = ((bottom - top) * (right - left) * x.shape[1]).double()
        return (s / area).to(x.dtype if x.is_floating_point() else torch.float32)


def num_patches(height, width, patch_size, stride=None):
    return PatchGrid.for_shape(height, width, patch_size, stride).num_patches


__all__ = ['PatchGrid', 'blend_window', 'num_patches', 'BLEND_WINDOWS']

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
- Accumulation is in float64, so blending a patchified float32/16 tensor returns it exactly on the CPU. On CUDA
  ``index_add_`` (the blend) and ``cumsum`` (the patch means of Eq. 2) accumulate in no fixed order: results can
  differ from run to run and from the CPU in the last bits (rarely one float32 ulp of a blend; a Qmap exactly on a
  γ threshold could change group). ``torch.use_deterministic_algorithms(True)`` makes both deterministic on CUDA,
  at some speed; the tests compare CUDA results with a tolerance.
- Streaming: :meth:`PatchGrid.gather` reads any patches straight from the latent and :class:`PatchBlender`
  blends patches in as they come, so PGS never holds all patches at once (they are 4x the latent at stride V/2):
  its memory is the latent, its noise and the float64 sum, whatever the image size.
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


@lru_cache(maxsize=64)
def _window_on(kind, size, sigma, device, dtype):
    return blend_window(kind, size, sigma).to(device, dtype)


@lru_cache(maxsize=64)
def _index_on(grid, device):
    """(patch rows, patch cols, boxes) of ``grid`` as long tensors on ``device``, made once per grid and device:
    a host-to-device copy on every gather or blend would be a host sync per batch on CUDA."""
    return (torch.tensor(grid.rows, device=device), torch.tensor(grid.cols, device=device),
            torch.tensor(grid.boxes(), device=device))


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

    def pad(self, x):
        """(B, C, h, w) -> (B, C, *padded_size): a side below V padded (reflect, else replicate); x itself when
        nothing is padded."""
        self.check(x)
        return pad_bottom_right(x, self.padded_size[0] - self.height, self.padded_size[1] - self.width)

    def check(self, x, name='latent'):
        if x.dim() != 4 or tuple(x.shape[-2:]) != (self.height, self.width):
            raise InputError(f'{name} must be (B, C, {self.height}, {self.width}) for this patch grid, '
                             f'got {tuple(x.shape)}')

    def patchify(self, x):
        """(B, C, h, w) -> (B, M, C, V, V): every overlapping patch (:meth:`gather` of all of them)."""
        self.check(x)
        b, c, v = x.shape[0], x.shape[1], self.patch_size
        return self.gather(x, torch.arange(b * self.num_patches, device=x.device)).view(b, self.num_patches, c, v, v)

    def gather(self, x, idx):
        """Patches ``idx`` (flat indices over (B, M), i.e. b·M + m) of ``x`` (B, C, h, w) as (n, C, V, V), read
        straight from ``x``: the same values as ``patchify(x).flatten(0, 1)[idx]`` without making every patch."""
        self.check(x)
        idx = torch.as_tensor(idx, device=x.device).long()
        m, v = self.num_patches, self.patch_size
        ar = torch.arange(v, device=x.device)
        starts_y, starts_x, _ = _index_on(self, x.device)
        rows = starts_y[(idx % m) // len(self.cols)][:, None] + ar  # (n, V)
        cols = starts_x[(idx % m) % len(self.cols)][:, None] + ar  # (n, V)
        p = self.pad(x)[(idx // m)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (n, V, V, C)
        return p.permute(0, 3, 1, 2).contiguous()

    def blender(self, batch, channels, window='gaussian', sigma=0.1, device='cpu'):
        """A :class:`PatchBlender` that takes the patches of a (batch, channels, h, w) latent in any batches."""
        return PatchBlender(self, batch, channels, window, sigma, device)

    def blend(self, patches, window='gaussian', sigma=0.1):
        """(B, M, C, V, V) -> (B, C, h, w): the per-pixel weighted mean of the patches covering each pixel."""
        if patches.dim() != 5 or patches.shape[1] != self.num_patches or \
                tuple(patches.shape[-2:]) != (self.patch_size, self.patch_size):
            raise InputError(f'expected (B, {self.num_patches}, C, {self.patch_size}, {self.patch_size}) '
                             f'patches for a {self.height}x{self.width} latent, got {tuple(patches.shape)}')
        b, m = patches.shape[:2]
        blender = self.blender(b, patches.shape[2], window, sigma, patches.device)
        flat, step = patches.flatten(0, 1), 4096
        for i in range(0, b * m, step):
            blender.add(torch.arange(i, min(i + step, b * m), device=patches.device), flat[i:i + step])
        return blender.result(patches.dtype)

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
        top, left, bottom, right = _index_on(self, x.device)[2].unbind(1)
        s = integral[:, bottom, right] - integral[:, top, right] - integral[:, bottom, left] + integral[:, top, left]
        area = ((bottom - top) * (right - left) * x.shape[1]).double()
        return (s / area).to(x.dtype if x.is_floating_point() else torch.float32)


class PatchBlender:
    """Blends denoised patches into the latent as they come, so no full set of patches is ever held.

    ``add(idx, patches)`` adds each patch times the window into a float64 sum over the (padded) latent, and the
    window into a per-pixel weight sum; ``result()`` divides. Memory: a latent-sized float64 sum (float32 on MPS)
    and a weight plane per image, whatever the number of patches. Each pixel's sum runs in the order its patches
    were added, so on the CPU the result does not depend on how one sequence of patches is cut into batches.
    Added in another order (several devices finishing batches in turn, or CUDA's atomic ``index_add_``, whose order
    is not fixed) the float64 sums can differ in their last bits, which reach a float32 result rarely and by one
    ulp. ``result()`` checks that every pixel was covered.
    """

    def __init__(self, grid, batch, channels, window='gaussian', sigma=0.1, device='cpu'):
        self.grid, self.batch, self.channels = grid, int(batch), int(channels)
        device = torch.device(device)
        # float64 sums make patchify -> blend exact for float32 and below; MPS has no float64.
        self.dtype = torch.float32 if device.type == 'mps' else torch.float64
        v = grid.patch_size
        self.weight = _window_on(window, v, float(sigma), device, self.dtype)
        hp, wp = grid.padded_size
        self.num = torch.zeros(self.batch * self.channels * hp * wp, dtype=self.dtype, device=device)
        self.den = torch.zeros(self.batch * hp * wp, dtype=self.dtype, device=device)
        ar = torch.arange(v, device=device)
        self._pixel = ar[:, None] * wp + ar[None, :]  # (V, V): offsets of a patch's pixels in one plane
        self._plane = torch.arange(self.channels, device=device) * (hp * wp)  # (C,)
        self._rows, self._cols, _ = _index_on(grid, device)

    def add(self, idx, patches):
        """Add patches (n, C, V, V) whose flat indices over (B, M) are ``idx`` (n,)."""
        v, hp, wp = self.grid.patch_size, *self.grid.padded_size
        if patches.dim() != 4 or tuple(patches.shape[1:]) != (self.channels, v, v) or len(idx) != len(patches):
            raise InputError(f'expected {len(idx)} patches of ({self.channels}, {v}, {v}), got {tuple(patches.shape)}')
        idx = torch.as_tensor(idx, device=self.num.device).long()
        m, nx = self.grid.num_patches, len(self._cols)
        corner = self._rows[(idx % m) // nx] * wp + self._cols[(idx % m) % nx]  # (n,) in one plane
        at = corner[:, None, None] + self._pixel  # (n, V, V)
        values = patches.to(self.num.device, self.dtype) * self.weight
        index = (idx // m * self.channels * hp * wp)[:, None, None, None] + self._plane[None, :, None, None] \
            + at[:, None]  # (n, C, V, V), in patches' own order
        self.num.index_add_(0, index.reshape(-1), values.reshape(-1))
        self.den.index_add_(0, ((idx // m * hp * wp)[:, None, None] + at).reshape(-1),
                            self.weight.expand(len(idx), v, v).reshape(-1))

    def result(self, dtype=torch.float32, partial=False):
        """(B, C, h, w) in ``dtype``: the weighted means. The sums are divided in place (the blender is spent).

        ``partial``: some pixels may have got no patch (overlap fusion blends only the patches active at a step):
        returns (means over the padded latent (B, C, hp, wp), zero where uncovered; covered (B, 1, hp, wp) bool)."""
        hp, wp = self.grid.padded_size
        if self.num is None:
            raise RuntimeError('PatchBlender.result was already called: the sums were divided in place')
        den = self.den.view(self.batch, 1, hp, wp)
        covered = den > 0
        if not partial and not bool(covered.all()):
            raise InputError('PatchBlender.result: some latent pixels got no patch; add every patch of the grid')
        num = self.num.view(self.batch, self.channels, hp, wp).div_(den.clamp_min(torch.finfo(den.dtype).tiny))
        self.num = self.den = None
        if partial:
            return num.to(dtype), covered
        return num[:, :, :self.grid.height, :self.grid.width].to(dtype)


def num_patches(height, width, patch_size, stride=None):
    return PatchGrid.for_shape(height, width, patch_size, stride).num_patches


__all__ = ['PatchGrid', 'PatchBlender', 'blend_window', 'num_patches', 'BLEND_WINDOWS']

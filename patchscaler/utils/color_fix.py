"""Wavelet colour fix: keep the SR image's fine detail, take its colours from the low-resolution input.

Diffusion SR outputs drift in colour (a tint, a shifted brightness, washed-out or oversaturated areas) because
the denoiser has no hard constraint tying the output's low frequencies to the input. The LR image's low
frequencies are trustworthy (they survive the degradation), while the SR image's high frequencies carry the
new detail. So the output is recombined as ``high(sr) + low(reference)``, where ``reference`` is the LR image
upsampled (bicubic) to the SR size. This is the "wavelet color fix" idea of StableSR (Wang et al., "Exploiting
Diffusion Prior for Real-World Image Super-Resolution"), written here from the description.

The low band is an a trous ("with holes") wavelet low-pass: ``levels`` blurs with the 3x3 binomial kernel
[[1,2,1],[2,4,2],[1,2,1]]/16, the i-th one dilated by 2**i, so the blur radius doubles at each level without
downsampling. Replicate padding keeps the size (it works for any pad, even wider than the image), so any
H, W >= 1 is accepted; a 1x1 image is all low band.
"""
import torch
import torch.nn.functional as F

from patchscaler.utils.errors import ConfigError, InputError

_KERNEL = ((1., 2., 1.), (2., 4., 2.), (1., 2., 1.))


def _check_image(name, x):
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        what = f'{tuple(x.shape)} {x.dtype}' if torch.is_tensor(x) else type(x).__name__
        raise InputError(f'{name} must be a floating-point (B, C, H, W) tensor, got {what}')


def _check_pair(sr, reference):
    _check_image('sr', sr)
    _check_image('reference', reference)
    if sr.shape != reference.shape:
        raise InputError(f'colour fix: reference is {tuple(reference.shape)} but sr is {tuple(sr.shape)}; '
                         'upsample the LR image to the SR size first')


def _work_dtype(dtype):
    """Blur in float32 at least: the repeated sums lose too much in bfloat16/float16 (and CPU half conv is slow)."""
    return torch.promote_types(dtype, torch.float32)


def _check_levels(levels):
    if not isinstance(levels, int) or levels < 0:
        raise ConfigError(f'wavelet levels must be an integer >= 0, got {levels!r}')


def _low(x, levels):
    """Low band of ``x`` (already in the work dtype): ``levels`` dilated binomial blurs, size preserved."""
    _check_levels(levels)
    c = x.shape[1]
    kernel = (torch.tensor(_KERNEL, dtype=x.dtype, device=x.device) / 16).expand(c, 1, 3, 3)
    for i in range(levels):
        d = 2 ** i
        x = F.conv2d(F.pad(x, (d, d, d, d), mode='replicate'), kernel, dilation=d, groups=c)
    return x


def wavelet_decompose(x, levels=5):
    """Split ``x`` (B, C, H, W) into ``(high, low)`` with ``high + low == x`` (up to rounding in x's dtype).

    ``low`` is ``x`` blurred ``levels`` times (dilations 1, 2, ..., 2**(levels-1)); ``high = x - low``. Both come
    back in ``x``'s dtype and device; the blur itself runs in float32 or wider.
    """
    _check_image('x', x)
    work = x.to(_work_dtype(x.dtype))
    low = _low(work, levels)
    return (work - low).to(x.dtype), low.to(x.dtype)


def wavelet_color_fix(sr, reference, levels=5, band=512):
    """``high(sr) + low(reference)``: the SR detail on the reference's colours, in ``sr``'s dtype and device.

    ``reference`` is the LR image upsampled (bicubic) to ``sr``'s size, same (B, C, H, W). The result is not
    clamped: it can leave [0, 1] slightly where SR detail sits on a saturated reference, so the caller clamps
    (as it would for any decoded image).

    ``band`` (rows): a taller image is fixed in bands of this many rows, each read with a margin of the blur's
    radius (2**levels - 1 rows) on both sides, so the work tensors are a band's, not the image's (an ×4 output of
    16000×12000 would otherwise hold several 2.3 GB copies). The margin covers everything the blurs reach, so the
    result is the same as in one pass. None: one pass.
    """
    _check_pair(sr, reference)
    _check_levels(levels)
    if band is not None and (not isinstance(band, int) or band < 1):
        raise ConfigError(f'colour fix band must be an integer >= 1 or None, got {band!r}')
    h, work = sr.shape[-2], _work_dtype(sr.dtype)
    if band is None or h <= band:
        return _fix(sr, reference, levels, work)
    out = torch.empty_like(sr)
    radius = 2 ** levels - 1
    for top in range(0, h, band):
        bottom = min(top + band, h)
        a, b = max(0, top - radius), min(h, bottom + radius)
        fixed = _fix(sr[..., a:b, :], reference[..., a:b, :], levels, work)
        out[..., top:bottom, :] = fixed[..., top - a:bottom - a, :]
    return out


def _fix(sr, reference, levels, work):
    sr_w = sr.to(work)
    ref_w = reference.to(device=sr.device, dtype=work)
    return (sr_w - _low(sr_w, levels) + _low(ref_w, levels)).to(sr.dtype)


def adain_color_fix(sr, reference, eps=1e-5):
    """StableSR's AdaIN colour fix (``scripts/wavelet_color_fix.py``, the one its paper uses): each channel of
    ``sr`` gets the mean and standard deviation of the reference's (the upsampled LR), over the whole image,
    ``(sr - μ_sr) / σ_sr · σ_ref + μ_ref``, with σ² the unbiased variance + ``eps``. Computed on [-1, 1] images as
    published (the eps sits on that scale) and returned in [0, 1], in ``sr``'s dtype; not clamped."""
    _check_pair(sr, reference)
    work = _work_dtype(sr.dtype)
    a = sr.to(work).flatten(2) * 2 - 1
    b = reference.to(device=sr.device, dtype=work).flatten(2) * 2 - 1
    a_std, b_std = (a.var(dim=2, keepdim=True) + eps).sqrt(), (b.var(dim=2, keepdim=True) + eps).sqrt()
    out = (a - a.mean(dim=2, keepdim=True)) / a_std * b_std + b.mean(dim=2, keepdim=True)
    return ((out.reshape(sr.shape) + 1) / 2).to(sr.dtype)


#: the colour fixes by name (option ``color_fix``; true = 'wavelet', false / 'none' = none)
COLOR_FIXES = {'wavelet': wavelet_color_fix, 'adain': adain_color_fix}


def color_fix_kind(value):
    """The colour-fix name of an option value: True -> 'wavelet' (PatchScaler's, section 4.1), False / None /
    'none' -> None, 'wavelet' / 'adain' as given."""
    if value is True or value == 'wavelet':
        return 'wavelet'
    if value in (False, None, 'none'):
        return None
    if value in COLOR_FIXES:
        return value
    raise ConfigError(f'color_fix must be true/false or one of {sorted(COLOR_FIXES)} / none, got {value!r}')

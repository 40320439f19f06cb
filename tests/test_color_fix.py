"""Wavelet colour fix: the output takes its low frequencies from the reference and its detail from the SR image."""
import math

import pytest
import torch

import patchscaler  # noqa: F401  (compat fixes before BasicSR)
from patchscaler.utils.color_fix import wavelet_color_fix, wavelet_decompose
from patchscaler.utils.errors import ConfigError, InputError

OFFSET = torch.tensor([0.1, -0.05, 0.08]).view(1, 3, 1, 1)


def smooth_image(h=64, w=80):
    """(1, 3, h, w) slowly varying colours in [0, 1]: all low band, like an upsampled LR image."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing='ij')
    return torch.stack([0.5 + 0.3 * torch.sin(math.pi * xx), 0.4 + 0.3 * yy,
                        0.5 + 0.2 * torch.cos(0.8 * math.pi * (xx + yy))])[None]


def drifted_sr(ref, seed=0):
    """The reference with a colour cast and fine detail (noise) on top, as a diffusion SR output might be."""
    detail = 0.1 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed))
    return ref + OFFSET + detail


def test_decompose_sums_back_and_keeps_shape():
    x = drifted_sr(smooth_image())
    high, low = wavelet_decompose(x)
    assert high.shape == low.shape == x.shape
    assert torch.allclose(high + low, x, atol=1e-6)
    assert low.std() < x.std()  # the blur removed the detail


def test_low_from_reference_high_from_sr():
    ref = smooth_image()
    sr = drifted_sr(ref)
    out = wavelet_color_fix(sr, ref)
    high_out, low_out = wavelet_decompose(out)
    high_sr, low_sr = wavelet_decompose(sr)
    high_ref, low_ref = wavelet_decompose(ref)
    # within a small tolerance (the blur is not an ideal projector) where sr's own bands are far off
    assert (low_out - low_ref).abs().max() < 0.03 < (low_sr - low_ref).abs().max()
    assert (high_out - high_sr).abs().max() < 0.03 < (high_ref - high_sr).abs().max()


def test_colour_cast_is_removed():
    ref = smooth_image()
    assert torch.allclose(wavelet_color_fix(ref + OFFSET, ref), ref, atol=1e-5)  # a pure cast goes exactly
    out = wavelet_color_fix(drifted_sr(ref), ref)
    assert torch.allclose(out.mean((2, 3)), ref.mean((2, 3)), atol=5e-3)


def test_result_is_not_clamped():
    ref = torch.ones(1, 3, 16, 16)
    out = wavelet_color_fix(drifted_sr(ref), ref)
    assert out.max() > 1  # clamping is the caller's job


@pytest.mark.parametrize('h,w', [(1, 1), (3, 5), (1, 7), (6, 1)])
def test_tiny_images(h, w):
    g = torch.Generator().manual_seed(h * 10 + w)
    sr, ref = torch.rand(2, 3, h, w, generator=g), torch.rand(2, 3, h, w, generator=g)
    out = wavelet_color_fix(sr, ref)
    assert out.shape == sr.shape and torch.isfinite(out).all()
    if h == w == 1:  # a single pixel is all low band: the reference comes back
        assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtype_is_preserved(dtype):
    ref = smooth_image(24, 20)
    sr = drifted_sr(ref)
    high, low = wavelet_decompose(sr.to(dtype))
    out = wavelet_color_fix(sr.to(dtype), ref.to(dtype))
    assert high.dtype == low.dtype == out.dtype == dtype
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    assert torch.allclose(out.double(), wavelet_color_fix(sr, ref).double(), atol=tol)


def test_shape_mismatch_raises_input_error():
    with pytest.raises(InputError, match='upsample'):
        wavelet_color_fix(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 16, 16))
    with pytest.raises(InputError):
        wavelet_color_fix(torch.rand(3, 32, 32), torch.rand(3, 32, 32))
    with pytest.raises(InputError):
        wavelet_decompose(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ConfigError):
        wavelet_decompose(torch.rand(1, 3, 8, 8), levels=-1)


def test_zero_levels_is_identity_split():
    x = torch.rand(1, 3, 8, 8)
    high, low = wavelet_decompose(x, levels=0)
    assert torch.equal(low, x) and not high.any()


@pytest.mark.parametrize('levels', [0, 1, 3, 5])
@pytest.mark.parametrize('band', [1, 7, 40, 64])
def test_bands_give_the_one_pass_result(levels, band):
    """Each band is read with the blur's full radius of margin, so banding changes nothing (the README's
    16000x12000 outputs are fixed this way)."""
    g = torch.Generator().manual_seed(levels * 100 + band)
    sr, ref = torch.rand(2, 3, 75, 33, generator=g), torch.rand(2, 3, 75, 33, generator=g)
    whole = wavelet_color_fix(sr, ref, levels, band=None)
    torch.testing.assert_close(wavelet_color_fix(sr, ref, levels, band=band), whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize('band', [0, -3, 2.5])
def test_bad_band_is_a_config_error(band):
    with pytest.raises(ConfigError):
        wavelet_color_fix(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), band=band)

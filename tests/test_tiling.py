"""tiled_apply: overlapping tiles, blended back, give the untiled result for pixel-local functions."""
import math

import pytest
import torch
import torch.nn.functional as F

import patchscaler  # noqa: F401  (compat fixes before BasicSR)
from patchscaler.utils.errors import ConfigError, InputError
from patchscaler.utils.tiling import tiled_apply


def n_tiles(length, tile, overlap):
    """Tiles along one side: offsets 0, stride, 2*stride, ... plus one flush with the far border."""
    return 1 if length <= tile else math.ceil((length - tile) / (tile - overlap)) + 1


class Counting:
    """Wraps fn and records the shape of every tile it is called on."""

    def __init__(self, fn):
        self.fn, self.shapes = fn, []

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        return self.fn(x)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize('tile,overlap', [(16, 8), (16, 4), (24, 12), (16, 0), (20, 16)])
def test_pixel_unshuffle_encoder_like(tile, overlap):
    x = rand(4, 3, 52, 76)
    fn = Counting(lambda t: F.pixel_unshuffle(t, 4))
    out = tiled_apply(fn, x, tile, overlap, scale=1 / 4, multiple=4)
    assert out.shape == (4, 48, 13, 19)
    assert torch.allclose(out, F.pixel_unshuffle(x, 4), atol=1e-6)
    assert len(fn.shapes) == n_tiles(52, tile, overlap) * n_tiles(76, tile, overlap)
    assert all(s[2] % 4 == 0 and s[3] % 4 == 0 for s in fn.shapes)


@pytest.mark.parametrize('tile,overlap', [(16, 8), (5, 2), (7, 6)])
def test_pixel_shuffle_decoder_like(tile, overlap):
    x = rand(2, 16, 13, 19, seed=1)
    fn = Counting(lambda t: F.pixel_shuffle(t, 4))
    out = tiled_apply(fn, x, tile, overlap, scale=4)
    assert out.shape == (2, 1, 52, 76)
    assert torch.allclose(out, F.pixel_shuffle(x, 4), atol=1e-6)
    assert len(fn.shapes) == n_tiles(13, tile, overlap) * n_tiles(19, tile, overlap)


def test_one_side_tiled_only():
    x = rand(1, 3, 12, 40, seed=2)
    fn = Counting(lambda t: t * 2 + 1)
    out = tiled_apply(fn, x, 16, 4, scale=1)
    assert torch.allclose(out, x * 2 + 1, atol=1e-6)
    assert fn.shapes == [(1, 3, 12, 16), (1, 3, 12, 16), (1, 3, 12, 16)]  # offsets 0, 12, 24


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_dtype_is_kept(dtype):
    x = rand(1, 2, 30, 30, seed=3, dtype=dtype)
    out = tiled_apply(lambda t: t * 3, x, 12, 4, scale=1)
    assert out.dtype == dtype
    assert torch.allclose(out.double(), (x * 3).double(), atol=1e-6 if dtype == torch.float64 else 2e-2)


def test_conv3x3_matches_away_from_seams_and_closely_at_them():
    x = rand(1, 3, 40, 56, seed=4)
    weight = rand(5, 3, 3, 3, seed=5) / 9

    def conv(t):
        return F.conv2d(t, weight, padding=1)
    full = conv(x)
    tile, overlap = 16, 8
    out = tiled_apply(conv, x, tile, overlap, scale=1)
    assert out.shape == full.shape
    err = (out - full).abs()
    # only pixels on a tile's inner edge (zero-padded there) are off; they enter with weight 0.5 / overlap
    edges = torch.zeros(40, 56, dtype=torch.bool)
    for length, dim in ((40, 0), (56, 1)):
        starts = list(range(0, length - tile, tile - overlap)) + [length - tile]
        for s in starts[1:]:
            edges.select(dim, s).fill_(True)
        for s in starts[:-1]:
            edges.select(dim, s + tile - 1).fill_(True)
    assert err[..., ~edges].max() < 1e-5
    assert err.max() < 0.5 / overlap * (conv(torch.zeros_like(x)) - full).abs().max() + 1e-5
    assert err.max() < 0.1 * full.abs().max()


def test_single_tile_is_exactly_fn_of_x():
    x = rand(2, 3, 16, 12, seed=6)
    sentinel = torch.zeros(1)
    fn = Counting(lambda t: sentinel)
    assert tiled_apply(fn, x, 16, 8, scale=1 / 8, multiple=8) is sentinel  # no checks, no blending
    assert fn.shapes == [(2, 3, 16, 12)]


def test_progress_bar(capsys):
    out = tiled_apply(lambda t: t, rand(1, 1, 20, 20), 8, 4, scale=1, progress=True)
    assert out.shape == (1, 1, 20, 20)
    assert '16/16' in capsys.readouterr().err


@pytest.mark.parametrize('tile,overlap,multiple', [
    (8, 8, 1), (8, 9, 1), (8, -1, 1), (0, 0, 1), (12, 4, 8), (16, 12, 8), (16.0, 4, 1), (16, 4, 0)])
def test_bad_tile_or_overlap_raises_config_error(tile, overlap, multiple):
    with pytest.raises(ConfigError):
        tiled_apply(lambda t: t, rand(1, 1, 32, 32), tile, overlap, scale=1, multiple=multiple)


def test_overlap_is_rounded_up_to_the_multiple():
    x = rand(1, 1, 40, 40, seed=7)
    fn = Counting(lambda t: F.pixel_unshuffle(t, 8))
    out = tiled_apply(fn, x, 16, 3, scale=1 / 8, multiple=8)  # overlap 3 -> 8: offsets 0, 8, 16, 24
    assert torch.allclose(out, F.pixel_unshuffle(x, 8), atol=1e-6)
    assert len(fn.shapes) == n_tiles(40, 16, 8) ** 2 == 16


def test_bad_input_or_scale():
    with pytest.raises(InputError):  # 36 is not a multiple of 8
        tiled_apply(lambda t: t, rand(1, 1, 36, 40), 16, 8, scale=1 / 8, multiple=8)
    with pytest.raises(ConfigError):  # 16 * (1/8) is whole but 8-pixel offsets are not with multiple=1
        tiled_apply(lambda t: F.avg_pool2d(t, 8), rand(1, 1, 40, 40), 16, 4, scale=1 / 8)
    with pytest.raises(ConfigError, match='expected'):  # fn does not scale by what the caller said
        tiled_apply(lambda t: t, rand(1, 1, 40, 40), 16, 8, scale=2)

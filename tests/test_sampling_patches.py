"""PatchGrid: overlapping V×V patches of a latent and their blending back (PGS's patch set)."""
import math

import pytest
import torch

import patchscaler  # noqa: F401  (compat fixes before BasicSR)
from patchscaler.sampling import PatchGrid, blend_window
from patchscaler.sampling.patches import num_patches
from patchscaler.utils.errors import ConfigError, InputError

WINDOWS = ('gaussian', 'linear', 'uniform')
# (h, w, V, stride): multiples of the stride, not multiples, sides smaller than V, a single pixel
GRID_CASES = [
    (32, 32, 16, 8), (40, 24, 16, 8), (37, 29, 16, 8), (33, 47, 16, 16), (35, 21, 16, 4), (19, 18, 16, 1),
    (5, 40, 16, 8), (40, 5, 16, 8), (3, 3, 16, 8), (1, 1, 16, 8), (16, 16, 16, 8), (17, 16, 16, 16),
    (9, 30, 8, 3), (12, 11, 8, 8), (7, 13, 8, 4),
]


def expected_count(length, v, stride):
    """Patches along one side: starts 0, s, 2s, ... plus one flush with the far border (a side < V is padded)."""
    return 1 if length <= v else math.ceil((length - v) / stride) + 1


def covering(grid):
    """(M, h, w) bool: which latent pixels each patch covers."""
    cover = torch.zeros(grid.num_patches, grid.height, grid.width, dtype=torch.bool)
    for m, (t, left, b, r) in enumerate(grid.boxes()):
        cover[m, t:b, left:r] = True
    return cover


@pytest.mark.parametrize('window', WINDOWS)
@pytest.mark.parametrize('h,w,v,stride', GRID_CASES)
def test_patchify_blend_is_bit_exact_float32(h, w, v, stride, window):
    grid = PatchGrid.for_shape(h, w, v, stride)
    x = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h * 100 + w)) * 3
    patches = grid.patchify(x)
    assert patches.shape == (2, grid.num_patches, 4, v, v)
    out = grid.blend(patches, window=window)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, x)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('h,w,v,stride', [(37, 29, 16, 8), (5, 40, 16, 8), (9, 30, 8, 3)])
def test_patchify_blend_is_bit_exact_half(h, w, v, stride, dtype):
    grid = PatchGrid.for_shape(h, w, v, stride)
    x = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(7)).to(dtype)
    out = grid.blend(grid.patchify(x))
    assert out.dtype == dtype
    assert torch.equal(out, x)


@pytest.mark.parametrize('h,w,v,stride', [(37, 29, 16, 8), (3, 3, 16, 8), (9, 30, 8, 3)])
def test_patches_are_the_boxes_of_the_latent(h, w, v, stride):
    grid = PatchGrid.for_shape(h, w, v, stride)
    x = torch.arange(2 * 3 * h * w, dtype=torch.float32).view(2, 3, h, w)
    patches = grid.patchify(x)
    for m, (t, left, b, r) in enumerate(grid.boxes()):
        assert torch.equal(patches[:, m, :, :b - t, :r - left], x[:, :, t:b, left:r])
    if h >= v and w >= v:  # no padding: every patch is a full V×V window of the latent
        for t, left, b, r in grid.boxes():
            assert (b - t, r - left) == (v, v)


def test_short_sides_are_padded_by_reflection_where_possible():
    x = torch.arange(12 * 20, dtype=torch.float32).view(1, 1, 12, 20)
    grid = PatchGrid.for_shape(12, 20, 16, 8)  # 4 padded rows < 12: reflect
    assert grid.padded_size == (16, 20) and grid.num_patches == 2
    p = grid.patchify(x)[0, 0, 0]  # rows 0..15, columns 0..15
    assert torch.equal(p[:12], x[0, 0, :, :16])
    assert torch.equal(p[12:], x[0, 0, [10, 9, 8, 7], :16])
    y = torch.arange(5 * 3, dtype=torch.float32).view(1, 1, 5, 3)
    grid = PatchGrid.for_shape(5, 3, 8, 4)  # pads of 3 and 5 rows/columns >= the sides: replicate
    q = grid.patchify(y)[0, 0, 0]
    assert grid.num_patches == 1 and q.shape == (8, 8)
    assert torch.equal(q[:5, :3], y[0, 0])
    assert torch.equal(q[5:, :3], y[0, 0, 4:5].expand(3, 3)) and torch.equal(q[:5, 3:], y[0, 0, :, 2:3].expand(5, 5))


@pytest.mark.parametrize('window', WINDOWS)
@pytest.mark.parametrize('h,w,v,stride', [(37, 29, 16, 8), (5, 40, 16, 8), (1, 1, 16, 8), (35, 21, 16, 4)])
def test_blend_of_constant_patches_is_the_constant(h, w, v, stride, window):
    grid = PatchGrid.for_shape(h, w, v, stride)
    patches = torch.full((2, grid.num_patches, 4, v, v), -1.375)
    out = grid.blend(patches, window=window)
    assert out.shape == (2, 4, h, w)
    assert torch.equal(out, torch.full_like(out, -1.375))


@pytest.mark.parametrize('h,w,v,stride', GRID_CASES)
def test_patch_count_formula(h, w, v, stride):
    grid = PatchGrid.for_shape(h, w, v, stride)
    ny, nx = expected_count(h, v, stride), expected_count(w, v, stride)
    assert (len(grid.rows), len(grid.cols)) == (ny, nx)
    assert grid.num_patches == ny * nx == len(grid.boxes()) == num_patches(h, w, v, stride)
    assert grid.patchify(torch.zeros(1, 1, h, w)).shape[1] == ny * nx
    # starts: multiples of the stride, the last one flush with the (padded) far border
    hp = max(h, v)
    assert grid.rows[:-1] == list(range(0, stride * (ny - 1), stride))
    assert grid.rows[-1] == hp - v


def test_default_stride_is_half_the_patch():
    grid = PatchGrid.for_shape(40, 40, 16)
    assert grid.stride == 8
    assert grid.rows == [0, 8, 16, 24]


@pytest.mark.parametrize('h,w,v,stride', GRID_CASES)
def test_boxes_cover_every_pixel(h, w, v, stride):
    grid = PatchGrid.for_shape(h, w, v, stride)
    for t, left, b, r in grid.boxes():
        assert 0 <= t < b <= h and 0 <= left < r <= w
        assert b - t == min(v, h) and r - left == min(v, w)
    count = covering(grid).sum(0)
    assert count.min() >= 1
    if stride == v and h % v == 0 and w % v == 0:
        assert count.max() == 1  # a tiling: no overlap at all


@pytest.mark.parametrize('window', WINDOWS)
@pytest.mark.parametrize('h,w,v,stride', [(37, 29, 16, 8), (35, 21, 16, 4), (9, 30, 8, 3), (5, 40, 16, 8)])
def test_blend_is_a_convex_combination_of_covering_patches(h, w, v, stride, window):
    grid = PatchGrid.for_shape(h, w, v, stride)
    values = torch.randn(grid.num_patches, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    patches = values.view(1, -1, 1, 1, 1).expand(1, -1, 2, v, v).float()
    out = grid.blend(patches, window=window)
    cover = covering(grid)  # (M, h, w)
    big = torch.tensor(float('inf'))
    lo = torch.where(cover, values.float().view(-1, 1, 1), big).amin(0)
    hi = torch.where(cover, values.float().view(-1, 1, 1), -big).amax(0)
    eps = 1e-6
    assert (out[0] >= lo - eps).all() and (out[0] <= hi + eps).all()
    if window == 'uniform':  # plain averaging: exactly the mean of the covering patches
        mean = (cover.double() * values.view(-1, 1, 1)).sum(0) / cover.sum(0)
        torch.testing.assert_close(out[0, 0].double(), mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(out[0, 1], out[0, 0], atol=0, rtol=0)


def test_gaussian_blend_weights_the_patch_centre_most():
    grid = PatchGrid.for_shape(16, 24, 16, 8)  # two patches: columns 0..15 and 8..23
    patches = torch.zeros(1, 2, 1, 16, 16)
    patches[:, 1] = 1.0
    out = grid.blend(patches, window='gaussian')[0, 0]
    # the overlap (columns 8..15) moves monotonically from patch 0's value towards patch 1's
    row = out[8, 8:16]
    assert (row[1:] > row[:-1]).all()
    assert row[0] < 0.5 < row[-1]
    assert torch.equal(out[:, :8], torch.zeros(16, 8)) and torch.equal(out[:, 16:], torch.ones(16, 8))


def test_blend_window_values():
    for kind in WINDOWS:
        wdw = blend_window(kind, 16)
        assert wdw.shape == (16, 16) and wdw.dtype == torch.float64
        assert (wdw > 0).all()
        torch.testing.assert_close(wdw, wdw.T)
    assert torch.equal(blend_window('uniform', 8), torch.ones(8, 8, dtype=torch.float64))
    g = blend_window('gaussian', 16, sigma=0.1)
    assert g[7, 7] == g.max() and g[0, 0] == g.min()


@pytest.mark.parametrize('h,w,v,stride', [(37, 29, 16, 8), (5, 40, 16, 8), (1, 1, 16, 8), (9, 30, 8, 3),
                                          (35, 21, 16, 4)])
def test_patch_mean_equals_brute_force(h, w, v, stride):
    grid = PatchGrid.for_shape(h, w, v, stride)
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(11))
    mean = grid.patch_mean(x)
    assert mean.shape == (2, grid.num_patches) and mean.dtype == torch.float32
    brute = torch.stack([x[:, :, t:b, left:r].double().mean((1, 2, 3)) for t, left, b, r in grid.boxes()], 1)
    torch.testing.assert_close(mean.double(), brute, atol=1e-7, rtol=0)


def test_patch_mean_of_an_integer_map_is_float():
    grid = PatchGrid.for_shape(8, 8, 4, 4)
    x = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    x[..., :4, :4] = 1
    mean = grid.patch_mean(x)
    assert mean.dtype == torch.float32
    assert mean.tolist() == [[1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize('h,w,v,stride', [(37, 29, 16, 8), (5, 40, 16, 8), (3, 3, 16, 8), (9, 30, 8, 3),
                                          (35, 21, 16, 4), (19, 18, 16, 1)])
def test_owner_map_is_the_nearest_covering_centre(h, w, v, stride):
    grid = PatchGrid.for_shape(h, w, v, stride)
    owner = grid.owner_map()
    assert owner.shape == (h, w) and owner.dtype == torch.long
    cover = covering(grid)
    centres = [(y + (v - 1) / 2, x + (v - 1) / 2) for y in grid.rows for x in grid.cols]
    for i in range(h):
        for j in range(w):
            m = int(owner[i, j])
            assert cover[m, i, j]
            d = [(cy - i) ** 2 + (cx - j) ** 2 for cy, cx in centres]
            best = min(d[k] for k in range(grid.num_patches) if cover[k, i, j])
            assert d[m] == best


@pytest.mark.parametrize('v,stride', [(16, 17), (16, 0), (16, -1), (0, 1), (8, 9)])
def test_bad_patch_size_or_stride_is_a_config_error(v, stride):
    with pytest.raises(ConfigError):
        PatchGrid.for_shape(32, 32, v, stride)


@pytest.mark.parametrize('h,w', [(0, 8), (8, 0)])
def test_empty_latent_is_an_input_error(h, w):
    with pytest.raises(InputError):
        PatchGrid.for_shape(h, w, 16, 8)


@pytest.mark.parametrize('shape', [(4, 24, 24), (1, 4, 24, 25), (1, 4, 23, 24), (1, 1, 4, 24, 24)])
def test_patchify_wrong_shape_is_an_input_error(shape):
    grid = PatchGrid.for_shape(24, 24, 16, 8)
    with pytest.raises(InputError):
        grid.patchify(torch.zeros(shape))
    with pytest.raises(InputError):
        grid.patch_mean(torch.zeros(shape))


@pytest.mark.parametrize('shape', [(1, 9, 4, 16, 16), (1, 4, 4, 8, 8), (1, 4, 4, 16, 8), (4, 4, 16, 16)])
def test_blend_wrong_shape_is_an_input_error(shape):
    grid = PatchGrid.for_shape(24, 24, 16, 8)
    assert grid.num_patches == 4
    with pytest.raises(InputError):
        grid.blend(torch.zeros(shape))


def test_bad_blend_window_is_a_config_error():
    grid = PatchGrid.for_shape(24, 24, 16, 8)
    patches = torch.zeros(1, 4, 1, 16, 16)
    with pytest.raises(ConfigError):
        grid.blend(patches, window='hann')
    with pytest.raises(ConfigError):
        grid.blend(patches, window='gaussian', sigma=0)


# ---------------------------------------------------------------- streaming: gather and PatchBlender
@pytest.mark.parametrize('h,w,v,stride', GRID_CASES)
def test_gather_reads_the_patches_by_flat_index(h, w, v, stride):
    """Patch i is image i // M, patch row (i % M) // cols, patch column (i % M) % cols of the padded latent
    (patchify is gather of every index, so this also pins down patchify's order)."""
    grid = PatchGrid.for_shape(h, w, v, stride)
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h + w))
    m, nx, padded = grid.num_patches, len(grid.cols), grid.pad(x)
    idx = torch.randperm(2 * m, generator=torch.Generator().manual_seed(1))[:max(1, m)]

    def box(i):
        top, left = grid.rows[(i % m) // nx], grid.cols[(i % m) % nx]
        return padded[i // m, :, top:top + v, left:left + v]
    expected = torch.stack([box(i) for i in idx.tolist()])
    assert torch.equal(grid.gather(x, idx), expected)


@pytest.mark.parametrize('h,w,v,stride', [(37, 29, 16, 8), (5, 40, 16, 8), (9, 30, 8, 3), (1, 1, 16, 8)])
def test_blender_in_any_batches_gives_the_blend(h, w, v, stride):
    """Patches added batch by batch in the blend's own order give exactly grid.blend; in a shuffled order (several
    devices finishing in turn) the same up to float64 rounding."""
    grid = PatchGrid.for_shape(h, w, v, stride)
    g = torch.Generator().manual_seed(3)
    patches = torch.randn(2, grid.num_patches, 3, v, v, generator=g)
    ref = grid.blend(patches)
    flat, n = patches.flatten(0, 1), 2 * grid.num_patches
    for order, exact in ((torch.arange(n), True), (torch.randperm(n, generator=g), False)):
        blender = grid.blender(2, 3)
        for chunk in order.split(5):
            blender.add(chunk, flat[chunk])
        out = blender.result()
        assert out.shape == (2, 3, h, w)
        if exact:
            assert torch.equal(out, ref)
        else:
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_blender_refuses_a_result_with_missing_patches_and_wrong_shapes():
    grid = PatchGrid.for_shape(24, 24, 16, 8)
    blender = grid.blender(1, 2)
    blender.add(torch.tensor([0, 1, 2]), torch.ones(3, 2, 16, 16))
    with pytest.raises(InputError, match='no patch'):
        blender.result()
    with pytest.raises(InputError, match='patches of'):
        blender.add(torch.tensor([3]), torch.ones(1, 3, 16, 16))


def test_blender_result_is_made_once():
    grid = PatchGrid.for_shape(16, 16, 16, 8)
    blender = grid.blender(1, 1)
    blender.add(torch.tensor([0]), torch.ones(1, 1, 16, 16))
    assert torch.equal(blender.result(), torch.ones(1, 1, 16, 16))
    with pytest.raises(RuntimeError, match='already'):
        blender.result()


def test_gather_and_blender_copy_the_grid_to_the_device_once(monkeypatch):
    """The patch starts and the window reach a device once per grid, not on every batch's gather or blend (each
    host-to-device copy is a host sync on CUDA)."""
    grid = PatchGrid.for_shape(29, 37, 8, 4)
    x = torch.randn(2, 3, 29, 37)
    idx = torch.arange(0, 2 * grid.num_patches, 3)
    grid.gather(x, idx)
    grid.blender(2, 3).add(idx, grid.gather(x, idx))
    grid.patch_mean(x)
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, 'tensor', lambda *a, **k: made.append(a) or real(*a, **k))
    for _ in range(3):
        blender = grid.blender(2, 3)
        blender.add(idx, grid.gather(x, idx))
        torch.testing.assert_close(grid.patch_mean(x), grid.patch_mean(x.clone()))
    assert made == []

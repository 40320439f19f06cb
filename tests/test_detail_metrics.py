"""The detail measures (patchscaler/metrics/detail.py): energy ratio, spectrum distance, pooling, masks."""
import numpy as np
import pytest

from patchscaler.metrics.detail import (
    DetailAccumulator,
    DetailScores,
    band_power,
    flat_patches,
    laplacian_energy,
    simple_mask,
    spectrum_distance_from,
)
from patchscaler.sampling.patches import PatchGrid


def _grating(size=128, f=0.3, angle=0.0, phase=0.0, amplitude=40.0, base=128.0):
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    a = np.deg2rad(angle)
    g = base + amplitude * np.cos(2 * np.pi * f * (x * np.cos(a) + y * np.sin(a)) + phase)
    return np.repeat(g[..., None], 3, 2)


def _ratio(img, ref):
    return laplacian_energy(img)[0] / laplacian_energy(ref)[0]


def test_energy_ratio_tells_blur_from_grain():
    import cv2
    hr = _grating()
    assert _ratio(hr, hr) == pytest.approx(1.0)
    assert _ratio(cv2.GaussianBlur(hr, (7, 7), 1.5), hr) < 0.1  # the regression answer: no detail
    noisy = hr + np.random.default_rng(0).normal(0, 20, hr.shape)
    assert _ratio(noisy, hr) > 1.2  # grain on top of the texture


def test_energy_inside_a_mask_ignores_what_is_outside():
    img = np.zeros((32, 32, 3))
    img[:, 16:] = np.random.default_rng(0).uniform(0, 255, (32, 16, 3))
    mask = np.zeros((32, 32), bool)
    mask[:, :15] = True  # the flat half (its last column's 3x3 window would reach the noise)
    assert laplacian_energy(img, mask)[0] == 0.0
    assert laplacian_energy(img, mask)[1] == 32 * 13 * 3 - 2 * 13 * 3  # windows wholly inside the mask


def test_spectrum_distance_rewards_the_right_texture_not_its_phase():
    hr = _grating(angle=45.0)
    same_texture = _grating(angle=45.0, phase=2.0)  # another sample of the same random-phase class
    wrong_orientation = _grating(angle=-45.0)
    white = 128 + np.random.default_rng(1).normal(0, hr[..., 0].std(), hr.shape)  # the same energy, as grain
    flat = np.full_like(hr, 128.0)

    def dist(img):
        return spectrum_distance_from(band_power(img)[0], band_power(hr)[0])
    assert dist(hr) == pytest.approx(0.0, abs=1e-9)
    assert dist(same_texture) < 1.0
    assert dist(white) > 10 * dist(same_texture)
    assert dist(wrong_orientation) > 10 * dist(same_texture)
    assert dist(flat) > dist(white)  # nothing at all is farthest (30 dB and more missing)


def test_band_power_uses_only_tiles_inside_the_mask():
    img = _grating(64)
    mask = np.zeros((64, 64), bool)
    mask[:40, :40] = True
    _, tiles = band_power(img, mask, tile=32, stride=16)
    assert tiles == 1
    assert band_power(img, np.zeros((64, 64), bool))[1] == 0


def test_accumulator_psnr_is_basicsrs_for_one_image():
    from basicsr.metrics import calculate_psnr
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (48, 40, 3)).astype(np.uint8)
    sr = np.clip(hr + rng.normal(0, 6, hr.shape), 0, 255).astype(np.uint8)
    acc = DetailAccumulator()
    acc.add(sr, hr)
    assert acc.result()['psnr'] == pytest.approx(calculate_psnr(sr, hr, 0), abs=1e-6)


def test_simple_mask_and_flat_patches_follow_the_grid():
    grid = PatchGrid.for_shape(8, 8, 4, 4)  # 2 x 2 patches of 4 latent px, factor 2 -> 8-px boxes
    groups = np.array([0, 2, 0, 1])
    mask = simple_mask(groups, grid, 2, (16, 16))
    assert mask[:8, :8].all() and not mask[:8, 8:].any() and mask[8:, :8].all() and not mask[8:, 8:].any()
    labels = np.zeros((16, 16), np.uint8)
    labels[:8, 8:] = 1  # patch 1 textured
    labels[12, 12] = 255  # a border pixel in patch 3
    assert flat_patches(groups, grid, labels, 2) == (2, 2)  # patches 0 and 2 are flat, both graded simple


def test_detail_scores_pool_a_set_per_output_and_class():
    hr = _grating(64).astype(np.uint8)
    labels = np.ones((64, 64), np.uint8)
    labels[:, :32] = 0
    hr[:, :32] = 100
    grm = hr.copy()
    grm[:, 32:] = 128  # the class mean: no detail
    classes = [{'name': 'flat', 'index': 0}, {'name': 'grating', 'index': 1}]
    scores = DetailScores(4, classes)
    grid = PatchGrid.for_shape(16, 16, 8, 8)
    for _ in range(2):
        scores.add_image({'GRM': grm, 'PGS': hr}, hr, np.array([0, 2, 0, 2]), grid, 4, crop_border=0, labels=labels,
                         margin=2, nfe={'PGS': 10})
    r = scores.result()
    assert r['images'] == 2
    assert r['outputs']['PGS']['psnr'] == float('inf')
    assert r['classes']['grating']['GRM']['hf_energy_ratio'] < 0.01
    assert r['classes']['grating']['PGS']['hf_energy_ratio'] == pytest.approx(1.0)
    assert r['flat_patches'] == 4 and r['flat_patches_simple'] == 1.0
    assert r['outputs']['PGS']['nfe_per_image'] == 10
    assert r['group_shares'] == [0.5, 0.0, 0.5]

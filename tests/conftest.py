"""Shared fixtures: small images written to tmp_path, the demo option file, a tiny AutoencoderKL config."""
import os

import numpy as np
import pytest

import patchscaler  # noqa: F401  (compat fixes before BasicSR)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
DEMO_YML = os.path.join(ROOT, 'options', 'demo', 'train_grm_demo.yml')


def write_png(path, array):
    """Write a uint8/uint16 array (H, W) or (H, W, 3 BGR) with OpenCV; returns the path."""
    import cv2
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), array), path
    return str(path)


def random_bgr(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture
def image_folder(tmp_path):
    """A folder of 3 random RGB PNGs (two at the top, one in a subfolder) plus a non-image file."""
    folder = tmp_path / 'imgs'
    write_png(str(folder / 'a.png'), random_bgr(40, 48, seed=1))
    write_png(str(folder / 'b.png'), random_bgr(32, 36, seed=2))
    write_png(str(folder / 'sub' / 'c.png'), random_bgr(24, 30, seed=3))
    (folder / 'notes.txt').write_text('not an image')
    return folder


@pytest.fixture
def demo_opt():
    """The demo option file, parsed with yaml.safe_load (a fresh dict per test)."""
    import yaml
    with open(DEMO_YML) as f:
        return yaml.safe_load(f)


TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, block_out_channels=[32, 32],
    down_block_types=['DownEncoderBlock2D'] * 2, up_block_types=['UpDecoderBlock2D'] * 2,
    latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=32)


@pytest.fixture
def tiny_vae_config():
    return {k: (list(v) if isinstance(v, list) else v) for k, v in TINY_VAE_CONFIG.items()}

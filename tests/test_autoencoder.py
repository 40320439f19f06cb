"""The frozen first stage: exact pixel-unshuffle autoencoder and the diffusers AutoencoderKL wrapper."""
import os

import pytest
import torch

import patchscaler  # noqa: F401  (registration; conftest.py imports it before BasicSR)
from patchscaler.archs.autoencoder_arch import DiffusersAutoencoderKL, PixelUnshuffleAutoencoder, pad_to_multiple
from patchscaler.utils.errors import ConfigError, MissingWeightsError


# ----------------------------------------------------------------------------- PixelUnshuffleAutoencoder
@pytest.mark.parametrize('d', [1, 2, 4, 8])
def test_pixel_unshuffle_round_trip_exact(d):
    torch.manual_seed(d)
    ae = PixelUnshuffleAutoencoder(downscale=d)
    x = torch.rand(2, 3, 2 * d * 3, d * 5)
    z = ae.encode(x)
    assert ae.latent_channels == 3 * d * d
    assert ae.downscale_factor == d
    assert z.shape == (2, 3 * d * d, 6, 5)
    # latents are in [-1, 1] (the SD VAE's input range)
    assert z.min() >= -1 and z.max() <= 1
    out = ae.decode(z)
    assert out.shape == x.shape
    assert torch.allclose(out, x, atol=1e-6, rtol=0)
    assert torch.allclose(ae(x), x, atol=1e-6, rtol=0)


def test_pixel_unshuffle_latent_layout():
    ae = PixelUnshuffleAutoencoder(downscale=2)
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0, 1, 0] = 1.0  # red channel, bottom-left pixel of the only 2x2 block
    z = ae.encode(x)
    assert z.shape == (1, 12, 1, 1)
    expected = -torch.ones(12)
    expected[2] = 1.0  # channel c*d*d + i*d + j = 0*4 + 1*2 + 0
    assert torch.equal(z.flatten(), expected)


@pytest.mark.parametrize('shape', [(1, 3, 6, 8), (1, 3, 8, 6), (1, 3, 5, 5)])
def test_encode_rejects_indivisible_size(shape):
    ae = PixelUnshuffleAutoencoder(downscale=4)
    with pytest.raises(ValueError, match='divisible by 4'):
        ae.encode(torch.rand(*shape))


@pytest.mark.parametrize('shape', [(1, 1, 8, 8), (1, 4, 8, 8), (3, 8, 8)])
def test_encode_rejects_non_rgb(shape):
    ae = PixelUnshuffleAutoencoder(downscale=4)
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        ae.encode(torch.rand(*shape))


def test_invalid_downscale():
    with pytest.raises(ConfigError):
        PixelUnshuffleAutoencoder(downscale=0)


@pytest.mark.parametrize('h,w,m', [(7, 9, 4), (3, 3, 8), (1, 5, 4), (8, 8, 4), (13, 2, 8)])
def test_pad_to_multiple(h, w, m):
    x = torch.rand(2, 3, h, w)
    padded, size = pad_to_multiple(x, m)
    assert size == (h, w)
    assert padded.shape[-2] % m == 0 and padded.shape[-1] % m == 0
    assert padded.shape[-2] == -(-h // m) * m and padded.shape[-1] == -(-w // m) * m
    assert padded.shape[:2] == x.shape[:2]
    # original content untouched at the top-left, padding copies image values (reflect/replicate)
    assert torch.equal(padded[..., :h, :w], x)
    assert padded.min() >= x.min() and padded.max() <= x.max()


def test_pad_to_multiple_noop_returns_same_values():
    x = torch.rand(1, 3, 8, 16)
    padded, size = pad_to_multiple(x, 8)
    assert size == (8, 16)
    assert torch.equal(padded, x)


def test_pad_then_round_trip():
    ae = PixelUnshuffleAutoencoder(downscale=4)
    x = torch.rand(1, 3, 3, 3)
    padded, (h, w) = pad_to_multiple(x, ae.downscale_factor)
    assert padded.shape[-2:] == (4, 4)
    out = ae.decode(ae.encode(padded))[..., :h, :w]
    assert torch.allclose(out, x, atol=1e-6)


def _frozen_checks(ae):
    assert not ae.training
    ret = ae.train()
    assert ret is ae
    assert not ae.training
    assert all(not m.training for m in ae.modules())
    ae.train(True)
    assert not ae.training
    assert all(not p.requires_grad for p in ae.parameters())


def test_pixel_unshuffle_frozen():
    ae = PixelUnshuffleAutoencoder(downscale=2)
    _frozen_checks(ae)
    assert list(ae.parameters()) == []  # weight-free


# ----------------------------------------------------------------------------- DiffusersAutoencoderKL
@pytest.fixture(scope='module')
def tiny_kl():
    from conftest import TINY_VAE_CONFIG
    torch.manual_seed(0)
    return DiffusersAutoencoderKL(config=dict(TINY_VAE_CONFIG))


def test_kl_shapes_and_round_trip(tiny_kl):
    assert tiny_kl.latent_channels == 4
    assert tiny_kl.downscale_factor == 2
    x = torch.rand(2, 3, 16, 12)
    with torch.no_grad():
        z = tiny_kl.encode(x)
        out = tiny_kl.decode(z)
    assert z.shape == (2, 4, 8, 6)
    assert out.shape == (2, 3, 16, 12)
    assert torch.isfinite(z).all() and torch.isfinite(out).all()


def test_kl_rejects_bad_inputs(tiny_kl):
    with pytest.raises(ValueError, match='divisible by 2'):
        tiny_kl.encode(torch.rand(1, 3, 9, 8))
    with pytest.raises(ValueError):
        tiny_kl.encode(torch.rand(1, 1, 8, 8))


def test_kl_frozen(tiny_kl):
    assert len(list(tiny_kl.parameters())) > 0
    _frozen_checks(tiny_kl)


def test_kl_scaling_factor(tiny_kl, tiny_vae_config):
    # default: the config's scaling_factor (diffusers' default 0.18215)
    assert tiny_kl.scaling_factor == pytest.approx(tiny_kl.vae.config.scaling_factor)
    unscaled = DiffusersAutoencoderKL(config=tiny_vae_config, scaling_factor=1.0)
    unscaled.vae.load_state_dict(tiny_kl.vae.state_dict())
    scaled = DiffusersAutoencoderKL(config=tiny_vae_config, scaling_factor=0.5)
    scaled.vae.load_state_dict(tiny_kl.vae.state_dict())
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        z1 = unscaled.encode(x)
        z05 = scaled.encode(x)
        zdef = tiny_kl.encode(x)
        # decode undoes the scaling: the same pixels from either latent
        out1 = unscaled.decode(z1)
        out05 = scaled.decode(z05)
    assert z1.abs().max() > 0
    assert torch.allclose(z05, 0.5 * z1, atol=1e-6)
    assert torch.allclose(zdef, tiny_kl.scaling_factor * z1, atol=1e-6)
    assert torch.allclose(out1, out05, atol=1e-5)


def test_kl_deterministic_mode(tiny_kl):
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(tiny_kl.encode(x), tiny_kl.encode(x))


def test_kl_missing_pretrained_path(tmp_path):
    missing = tmp_path / 'no_vae_here'
    with pytest.raises(MissingWeightsError) as info:
        DiffusersAutoencoderKL(pretrained_path=str(missing))
    assert f'{missing}/config.json' in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_kl_missing_subfolder(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        DiffusersAutoencoderKL(pretrained_path=str(tmp_path), subfolder='vae')
    assert os.path.join(str(tmp_path), 'vae') + '/config.json' in str(info.value)


def test_kl_needs_exactly_one_source(tmp_path, tiny_vae_config):
    with pytest.raises(ConfigError, match='exactly one'):
        DiffusersAutoencoderKL()
    with pytest.raises(ConfigError, match='exactly one'):
        DiffusersAutoencoderKL(pretrained_path=str(tmp_path), config=tiny_vae_config)


@pytest.mark.parametrize('subfolder', [None, 'vae'])
def test_kl_save_and_load_offline(tmp_path, monkeypatch, tiny_kl, subfolder):
    # no network: any hub access would fail loudly
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    folder = tmp_path / 'sd' / subfolder if subfolder else tmp_path / 'vae'
    tiny_kl.vae.save_pretrained(str(folder))
    assert (folder / 'config.json').is_file()
    root = tmp_path / 'sd' if subfolder else folder
    loaded = DiffusersAutoencoderKL(pretrained_path=str(root), subfolder=subfolder)
    assert loaded.latent_channels == 4 and loaded.downscale_factor == 2
    assert loaded.scaling_factor == pytest.approx(tiny_kl.scaling_factor)
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), tiny_kl.encode(x))


def test_kl_build_from_registries(tiny_vae_config):
    from basicsr.archs import build_network

    from patchscaler.archs.autoencoder_arch import build_autoencoder
    from patchscaler.registry import AUTOENCODERS
    a = build_autoencoder(dict(type='DiffusersAutoencoderKL', config=tiny_vae_config, scaling_factor=1.0))
    b = AUTOENCODERS.build(dict(type='DiffusersAutoencoderKL', config=tiny_vae_config))
    c = build_network(dict(type='PixelUnshuffleAutoencoder', downscale=4))
    assert isinstance(a, DiffusersAutoencoderKL) and a.scaling_factor == 1.0
    assert isinstance(b, DiffusersAutoencoderKL)
    assert isinstance(c, PixelUnshuffleAutoencoder) and c.latent_channels == 48
    with pytest.raises(ConfigError, match='did you mean'):
        build_autoencoder(dict(type='PixelUnshuffleAutoencoder', downscal=4))

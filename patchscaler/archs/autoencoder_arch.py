"""The frozen first stage: RGB in [0, 1] <-> latent (c, H/d, W/d).

Two autoencoders share one small interface (``encode``, ``decode``, ``latent_channels``,
``downscale_factor``), so everything downstream (GRM, PGS, Patch-DiT, the RTM) is independent of which
one a config picks:

* :class:`DiffusersAutoencoderKL` wraps diffusers' ``AutoencoderKL`` (the SD VAE the paper uses, c=4, d=8),
  loaded from a local folder or built from a config dict with random weights (tests, timing).
* :class:`PixelUnshuffleAutoencoder` is weight-free and exactly invertible (c = 3·d²). It is the demo's
  default: with no download, a restored latent decodes to exactly the restored pixels, so demo metrics
  measure the restoration and not an untrained decoder.

Both are frozen (``requires_grad=False``, eval mode; ``train()`` keeps them in eval mode).
Inputs must have H and W divisible by ``downscale_factor``; :func:`pad_to_multiple` pads.
"""
import os

import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from patchscaler.registry import AUTOENCODERS
from patchscaler.utils.errors import ConfigError, MissingWeightsError
from patchscaler.utils.padding import pad_bottom_right


def pad_to_multiple(x, multiple):
    """Reflect-pad (B, C, H, W) on the bottom/right to multiples of ``multiple``; returns (x, (H, W))."""
    h, w = x.shape[-2:]
    return pad_bottom_right(x, (-h) % multiple, (-w) % multiple), (h, w)


class FrozenAutoencoder(nn.Module):
    """Common base: frozen parameters, eval mode forever, pixels in [0, 1]."""

    latent_channels: int
    downscale_factor: int

    def _freeze(self):
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):  # noqa: ARG002 - a frozen stage never switches to training mode
        return super().train(False)

    def forward(self, x):
        """Round trip, for convenience: decode(encode(x))."""
        return self.decode(self.encode(x))

    def _check_input(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f'{type(self).__name__}.encode expects (B, 3, H, W) RGB, got {tuple(x.shape)}')
        d = self.downscale_factor
        if x.shape[-1] % d or x.shape[-2] % d:
            raise ValueError(f'{type(self).__name__}.encode needs H and W divisible by {d}, got '
                             f'{tuple(x.shape[-2:])}; pad with patchscaler.archs.autoencoder_arch.pad_to_multiple')


@AUTOENCODERS.register_module()
@ARCH_REGISTRY.register()
class PixelUnshuffleAutoencoder(FrozenAutoencoder):
    """Weight-free, exactly invertible: ``encode = pixel_unshuffle(2x - 1, d)``, c = 3·d².

    The [-1, 1] shift matches the SD VAE's input range so latents are roughly zero-mean.

    Args:
        downscale (int): d, the spatial downscaling factor. Default 4 (c = 48).
    """

    def __init__(self, downscale=4):
        super().__init__()
        if int(downscale) < 1:
            raise ConfigError(f'PixelUnshuffleAutoencoder: downscale must be >= 1, got {downscale}')
        self.downscale_factor = int(downscale)
        self.latent_channels = 3 * self.downscale_factor ** 2
        self.scaling_factor = 1.0
        self._freeze()

    def encode(self, x):
        self._check_input(x)
        return F.pixel_unshuffle(x * 2 - 1, self.downscale_factor)

    def decode(self, z):
        return (F.pixel_shuffle(z, self.downscale_factor) + 1) / 2


@AUTOENCODERS.register_module()
@ARCH_REGISTRY.register()
class DiffusersAutoencoderKL(FrozenAutoencoder):
    """diffusers ``AutoencoderKL``, frozen, with its latent scaling factor applied.

    Exactly one of:

    Args:
        pretrained_path (str): a local folder in diffusers layout (``config.json`` +
            ``diffusion_pytorch_model.safetensors``), e.g. a copy of an SD VAE, or such a model's root
            folder with the VAE in ``subfolder`` (e.g. ``vae``). Never downloads.
        config (dict): ``AutoencoderKL`` constructor arguments; random weights (tests, timing).
        subfolder (str | None): subfolder of ``pretrained_path`` holding the VAE.
        scaling_factor (float | None): overrides the config's ``scaling_factor`` (SD: 0.18215).
        sample_posterior (bool): encode to a posterior sample instead of its mode. Default False
            (deterministic latents, what StableSR and the paper's pipeline use at inference).
    """

    def __init__(self, pretrained_path=None, config=None, subfolder=None, scaling_factor=None,
                 sample_posterior=False):
        super().__init__()
        from diffusers import AutoencoderKL  # imported here: diffusers takes seconds to import

        if (pretrained_path is None) == (config is None):
            raise ConfigError('DiffusersAutoencoderKL needs exactly one of pretrained_path (a local folder) '
                              'or config (a dict of AutoencoderKL arguments)')
        if pretrained_path is not None:
            folder = os.path.join(pretrained_path, subfolder) if subfolder else pretrained_path
            if not os.path.isfile(os.path.join(folder, 'config.json')):
                raise MissingWeightsError(
                    f'autoencoder weights not found: {folder}/config.json is missing. Put a diffusers '
                    'AutoencoderKL folder there (config.json + diffusion_pytorch_model.safetensors, e.g. the '
                    '"vae" folder of a Stable Diffusion copy) or set autoencoder.pretrained_path to it.')
            self.vae = AutoencoderKL.from_pretrained(pretrained_path, subfolder=subfolder, local_files_only=True)
        else:
            self.vae = AutoencoderKL(**config)
        cfg = self.vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.downscale_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else cfg.scaling_factor)
        self.sample_posterior = sample_posterior
        self._freeze()

    def encode(self, x):
        self._check_input(x)
        dist = self.vae.encode(x * 2 - 1).latent_dist
        z = dist.sample() if self.sample_posterior else dist.mode()
        return z * self.scaling_factor

    def decode(self, z):
        return (self.vae.decode(z / self.scaling_factor).sample + 1) / 2


def build_autoencoder(opt):
    """Build an autoencoder from an options dict (``{'type': ..., **kwargs}``), checking its keys."""
    from patchscaler.utils.options_check import build_from_registry
    return build_from_registry(ARCH_REGISTRY, opt, where='autoencoder')

"""Recipe: speed up your own diffusion SR model with PGS — three lines.

PGS needs three things from a model: a denoiser call ``denoiser(x_t, t, cond)``, the latent to refine
(y0, e.g. the upsampled LR latent or a regression model's output) and a difficulty map in [0, 1] (high =
easy). With PatchScaler's GRM, the map is its confidence C. A model without one can use
:func:`~patchscaler.sampling.grouping.texture_confidence` (flat regions easy, busy regions hard) with
grouping by share, which ignores the map's scale::

    sampler = build_sampler('options/samplers/pgs_adaptive.yml')                      # 1. options
    denoiser = lambda x_t, t, y0: unet(torch.cat([y0, x_t], 1), t).sample             # 2. your call
    latent, report = sampler.sample(denoiser, y0, texture_confidence(y0), cond=y0)    # 3. sample

``cond=y0`` is cut into the same patches as y0, so each patch's denoiser call sees its own y0 patch. The
model must work on V×V patches (here 16×16 latents): a convolutional UNet does; a UNet trained on larger
crops is better run with a larger V (the paper uses V = 64 for Stable Diffusion's UNet in StableSR+PGS).

Run ``python -m patchscaler.sampling.example_unet`` for a random-init ``diffusers.UNet2DModel`` example.
"""
import os

import torch

from .grouping import texture_confidence
from .pgs import build_sampler

ADAPTIVE_OPTIONS = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, 'options', 'samplers',
                                'pgs_adaptive.yml')


def build_example_unet(latent_channels=4, patch_size=16, width=32):
    """A small random-init conditional UNet: input concat(y0, x_t) (2c channels), output ε (c channels)."""
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=patch_size, in_channels=2 * latent_channels, out_channels=latent_channels,
                       layers_per_block=1, block_out_channels=(width, 2 * width),
                       down_block_types=('DownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'UpBlock2D'),
                       norm_num_groups=8)


def run_example(y0=None, unet=None, options=ADAPTIVE_OPTIONS, **overrides):
    """PGS driving a diffusers UNet2DModel on a latent y0 (default: a random 4×40×48 latent)."""
    y0 = torch.randn(1, 4, 40, 48, generator=torch.Generator().manual_seed(0)) if y0 is None else y0
    unet = build_example_unet(y0.shape[1]).eval() if unet is None else unet
    sampler = build_sampler(options) if not overrides else _with_overrides(options, overrides)
    denoiser = lambda x_t, t, y0_patch: unet(torch.cat([y0_patch, x_t], 1), t).sample  # noqa: E731
    return sampler.sample(denoiser, y0, texture_confidence(y0), cond=y0)


def _with_overrides(options, overrides):
    import yaml
    with open(options) as f:
        opt = yaml.safe_load(f)['sampler']
    opt.update(overrides)
    return build_sampler(opt)


if __name__ == '__main__':
    latent, report = run_example(progress=True)
    print(f'refined latent {tuple(latent.shape)}; {report.summary()}')

"""StableSR-style denoiser: a diffusers UNet modulated by a time-aware encoder of the LR latent (SFT).

StableSR (Wang et al., IJCV 2024) fine-tunes nothing of Stable Diffusion's UNet: a small *time-aware
encoder* reads the LR latent together with the timestep and produces one feature map per UNet resolution;
SFT/SPADE layers turn each into a per-pixel scale γ and shift β applied to the UNet's residual blocks,
``h <- h·(1 + γ) + β``. The text conditioning is a fixed (empty) prompt. Here:

* The UNet is diffusers' ``UNet2DConditionModel``: built from a config dict (random weights: the demo,
  tests, timing) or loaded from a local folder in diffusers layout (the SD-2.1-base ``unet`` folder for
  StableSR's configuration). Never downloads.
* SFT modulates the output of every ``ResnetBlock2D`` of the down, mid and up blocks (a choice: StableSR
  puts its SPADE layers in the residual blocks; modulating all of them is the simplest reading). The γ/β
  convolutions are zero-initialised, so a fresh model is exactly the plain UNet: pretrained SD weights
  start from what they were trained to do.
* The prompt is a frozen buffer ``(1, L, D)``: zeros, or the empty-prompt text embedding loaded from
  ``prompt_embedding_path`` (a safetensors file holding ``prompt_embeds``; compute it once offline with the
  matching CLIP text encoder). StableSR uses the empty prompt; zeros are the weight-free stand-in. Like the
  noise schedule, the prompt comes from the options, not the checkpoint: train and test files must name the
  same ``prompt_embedding_path``.
* ``forward(x_t, t, cond)`` is the sampler interface: ``cond['y_lr']`` is the LR latent patch (the
  bicubic-upsampled LR image, encoded), the same crop of the same grid as x_t. The output is what
  ``prediction_type`` says (ε by default, StableSR's SD-2.1-base; 'v_prediction' for v-models).
* The time-aware features reach the wrapped resnets through a context variable set for the duration of one
  forward, not through module attributes: PGS may run one module from several threads (group-parallel
  devices), and each thread sees only its own features. (The UNet's gradient checkpointing, which re-runs
  the forward during backward, is therefore not supported.)
* ``patch_size`` is the latent size the UNet samples on (StableSR's 64 = 512 px with the SD VAE); the PGS
  sampler's V must equal it, as StableSR's own tiled sampling uses 64-latent tiles.
"""
import contextvars
import os

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from patchscaler.sampling.schedules import PREDICTION_TYPES
from patchscaler.utils.errors import ConfigError, InputError, MissingWeightsError


class SFT(nn.Module):
    """Spatial feature transform: (γ, β) from a condition feature map; zero-initialised (identity)."""

    def __init__(self, cond_channels, channels, hidden=None):
        super().__init__()
        hidden = hidden or min(cond_channels, channels)
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.SiLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)
        for conv in (self.gamma, self.beta):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, h, feature):
        s = self.shared(feature)
        return h * (1 + self.gamma(s)) + self.beta(s)


# the time-aware encoder's features of the StableSRUNet forward running in this thread/context
_FEATURES = contextvars.ContextVar('stablesr_features', default=None)


class SFTResnet(nn.Module):
    """A UNet ResnetBlock2D whose output is modulated by the time-aware encoder's feature at its level.

    The diffusers blocks call their resnets with their own arguments, so this wrapper needs no change to them;
    the feature comes from :class:`StableSRUNet`'s forward through a context variable."""

    def __init__(self, resnet, level, cond_channels):
        super().__init__()
        self.resnet, self.level = resnet, level
        self.sft = SFT(cond_channels, resnet.out_channels)

    def forward(self, *args, **kwargs):
        h = self.resnet(*args, **kwargs)
        features = _FEATURES.get()
        if features is None:
            raise RuntimeError('SFTResnet called outside StableSRUNet.forward (no condition feature set)')
        return self.sft(h, features[self.level])


class TimeAwareEncoder(nn.Module):
    """StableSR's time-aware encoder: LR latent + timestep -> one feature map per UNet resolution."""

    def __init__(self, in_channels, channels, temb_channels, norm_groups=8):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D

        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(channels[0], temb_channels)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        prev = channels[0]
        for i, ch in enumerate(channels):
            self.blocks.append(ResnetBlock2D(in_channels=prev, out_channels=ch, temb_channels=temb_channels,
                                             groups=min(norm_groups, prev), groups_out=min(norm_groups, ch)))
            self.downs.append(Downsample2D(ch, use_conv=True) if i < len(channels) - 1 else nn.Identity())
            prev = ch

    def forward(self, y_lr, t):
        temb = self.time_embed(self.time_proj(t).to(y_lr.dtype))
        h, features = self.conv_in(y_lr), []
        for block, down in zip(self.blocks, self.downs):
            h = block(h, temb)
            features.append(h)
            h = down(h)
        return features


def _load_unet(unet_path, config):
    from diffusers import UNet2DConditionModel
    if (unet_path is None) == (config is None):
        raise ConfigError('StableSRUNet needs exactly one of unet_path (a local diffusers UNet folder) or unet '
                          '(a dict of UNet2DConditionModel arguments)')
    if config is not None:
        return UNet2DConditionModel(**config)
    if not os.path.isfile(os.path.join(unet_path, 'config.json')):
        raise MissingWeightsError(
            f'UNet weights not found: {unet_path}/config.json is missing. Put a diffusers UNet2DConditionModel '
            'folder there (config.json + diffusion_pytorch_model.safetensors, e.g. the "unet" folder of a local '
            'stable-diffusion-2-1-base copy) or set network_g.unet_path to it.')
    return UNet2DConditionModel.from_pretrained(unet_path, local_files_only=True)


def _load_prompt(path, tokens, dim):
    if path is None:
        return torch.zeros(1, tokens, dim)
    if not os.path.isfile(path):
        raise MissingWeightsError(f'prompt embedding not found: {path}. Save the empty-prompt text embedding '
                                  '(1, 77, D) of the UNet\'s text encoder there as a safetensors file with the key '
                                  'prompt_embeds, or drop prompt_embedding_path to use zeros.')
    from safetensors.torch import load_file
    emb = load_file(path).get('prompt_embeds')
    if emb is None or emb.dim() not in (2, 3) or emb.shape[-1] != dim:
        raise ConfigError(f'{path} must hold prompt_embeds of shape (L, {dim}) or (1, L, {dim}), got '
                          f'{None if emb is None else tuple(emb.shape)}')
    return emb.reshape(1, -1, dim).float()


@ARCH_REGISTRY.register()
class StableSRUNet(nn.Module):
    """Args:
        unet (dict) | unet_path (str): UNet2DConditionModel arguments (random init) or a local folder.
        encoder_channels (list): channels of the time-aware encoder per UNet level (default: the UNet's
            ``block_out_channels`` halved, at least 16).
        patch_size (int): the latent V the UNet samples on (default: the UNet's ``sample_size``).
        prediction_type (str): 'epsilon' (default), 'v_prediction' or 'sample'.
        prompt_embedding_path (str): the fixed prompt, see the module docstring. prompt_tokens (int): L of
            the zero prompt (default 77 for a pretrained UNet, 1 for a config one).
    """

    cond_keys = ('y_lr',)  # what the sampler pipeline passes in cond: the LR latent, patchified like x_t

    def __init__(self, unet=None, unet_path=None, encoder_channels=None, patch_size=None,
                 prediction_type='epsilon', prompt_embedding_path=None, prompt_tokens=None):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f'prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}')
        self.unet = _load_unet(unet_path, dict(unet) if unet is not None else None)
        cfg = self.unet.config
        levels = list(cfg.block_out_channels)
        encoder_channels = list(encoder_channels or [max(16, c // 2) for c in levels])
        if len(encoder_channels) != len(levels):
            raise ConfigError(f'encoder_channels needs one entry per UNet level ({len(levels)}), got '
                              f'{encoder_channels}')
        self.in_channels, self.prediction_type = int(cfg.in_channels), prediction_type
        self.patch_size = int(patch_size or cfg.sample_size)
        self.multiple = 2 ** (len(levels) - 1)
        if self.patch_size % self.multiple:
            raise ConfigError(f'patch_size {self.patch_size} must be a multiple of {self.multiple} (the UNet '
                              f'downsamples {len(levels) - 1} times)')
        self.encoder = TimeAwareEncoder(self.in_channels, encoder_channels, levels[0] * 4)
        self.sft_layers = nn.ModuleList()
        n = len(levels)
        blocks = [(i, b) for i, b in enumerate(self.unet.down_blocks)] + [(n - 1, self.unet.mid_block)] + \
                 [(n - 1 - j, b) for j, b in enumerate(self.unet.up_blocks)]
        for level, block in blocks:
            if block is None:
                continue
            for k, resnet in enumerate(block.resnets):
                wrapped = SFTResnet(resnet, level, encoder_channels[level])
                block.resnets[k] = wrapped
                self.sft_layers.append(wrapped)
        tokens = prompt_tokens or (77 if unet_path else 1)
        self.register_buffer('prompt', _load_prompt(prompt_embedding_path, tokens, int(cfg.cross_attention_dim)),
                             persistent=False)

    def forward(self, x_t, t, cond):
        y_lr = cond['y_lr'] if isinstance(cond, dict) else cond
        if y_lr.shape != x_t.shape:
            raise InputError(f'the LR latent {tuple(y_lr.shape)} must have the shape of x_t {tuple(x_t.shape)}')
        if x_t.shape[-1] % self.multiple or x_t.shape[-2] % self.multiple:
            raise InputError(f'StableSRUNet needs latent sides divisible by {self.multiple}, got '
                             f'{tuple(x_t.shape[-2:])}')
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        token = _FEATURES.set(self.encoder(y_lr.to(x_t.dtype), t))
        try:
            context = self.prompt.to(x_t.dtype).expand(x_t.shape[0], -1, -1)
            return self.unet(x_t, t, encoder_hidden_states=context).sample
        finally:
            _FEATURES.reset(token)

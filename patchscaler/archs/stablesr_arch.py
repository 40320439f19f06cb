"""StableSR's denoiser (Wang et al., IJCV 2024) as published: SD's UNet with SPADE in every resnet, and the
time-aware encoder that feeds them.

The architecture is the one of the published checkpoint (IceClear/StableSR ``stablesr_000117.ckpt`` /
``stablesr_turbo.ckpt``, config ``configs/stableSRNew/v2-finetune_text_T_512.yaml``), written from its math and
shapes (the published code's licence allows no copying), so that ``tools/convert_stablesr.py`` maps every key of
that file onto this network and ``load_state_dict(strict=True)`` takes it whole:

* **UNet**: diffusers' ``UNet2DConditionModel`` (built from a config dict, or loaded from a local diffusers
  folder), where each of its resnets (SD-2.1: 8 down, 2 mid, 12 up = 22) is a :class:`SPADEResnetBlock2D`: the
  published ``ResBlockDual``. Its residual branch is ``conv2(drop(act(norm2(conv1(act(norm1(x))) + temb))))``,
  then ``SPADE`` modulates that branch *before* the skip is added: ``out = skip(x) + SPADE(h, features)``.
* **SPADE** (``ldm/modules/spade.py``, from Park et al. 2019): ``GroupNorm(32, C, affine)(h)·(1 + γ) + β``, with
  ``γ, β = conv3x3(ReLU(conv3x3(f)))`` through a 128-channel hidden layer, ``f`` the encoder feature whose
  spatial width equals h's (the published model picks the feature by ``str(h.size(-1))``). Parameter names
  ``spade.param_free_norm``, ``spade.mlp_shared.0``, ``spade.mlp_gamma``, ``spade.mlp_beta``.
* **Time-aware encoder** (``EncoderUNetModelWT``): the down half of an openai-UNet on the LR latent and the
  timestep (256 channels, mult [1, 1, 2, 2], 2 res blocks per level, attention at 1×, 2×, 4× downsampling, a middle
  block res/attention/res), whose feature is taken at each level's end (where the width changes) and after the
  middle block, each passed through its own ``fea_tran`` res block to 256 channels: one feature per UNet width
  (64, 32, 16, 8 for a 64-latent). 52.5 M parameters at the published size; the parameter names are the
  published ones (``input_blocks``, ``middle_block``, ``fea_tran``, ``time_embed``).
* Group norms of the encoder and SPADE compute in float32 (the published ``GroupNorm32``); an out-channel count
  that is no multiple of 32 gets one group per channel in the encoder's res blocks, as published.
* **Prompt**: a frozen buffer ``(1, L, D)``: the empty-prompt text embedding (StableSR conditions on the
  OpenCLIP-H penultimate embedding of ``''``, which the SD-2.1 ``text_encoder`` folder gives as
  ``last_hidden_state``), loaded from ``prompt_embedding_path`` (safetensors, key ``prompt_embeds``; the converter
  writes it), or zeros (weight-free: demo, tests). Like the noise schedule it comes from the options, not the
  checkpoint: train and test files name the same file.

``forward(x_t, t, cond)`` is the sampler interface: ``cond['y_lr']`` is the LR latent patch (the bicubic-upsampled
LR image, encoded), the same crop as x_t; the output is ε (the published model), v or x0 (``prediction_type``).
The encoder's features reach the resnets through a context variable set for one forward, not module attributes:
PGS may run one module from several threads, each seeing only its own features (so the UNet's gradient
checkpointing, which re-runs the forward during backward, is not supported).
"""
import contextvars
import math
import os

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from patchscaler.sampling.schedules import PREDICTION_TYPES
from patchscaler.utils.errors import ConfigError, InputError, MissingWeightsError

# the published configuration (v2-finetune_text_T_512.yaml, structcond_stage_config / semb_channels)
PUBLISHED_ENCODER = dict(model_channels=256, out_channels=256, channel_mult=(1, 1, 2, 2), num_res_blocks=2,
                         attention_resolutions=(4, 2, 1), num_heads=4)
SPADE_HIDDEN = 128  # "hardcoded" in the published SPADE
UNET_WEIGHT_FILES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (the published models' normalisation), whatever the dtype of the
    input and of its own weights (a bf16 model too)."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def timestep_embedding(t, dim, max_period=10000):
    """[cos(t·f_k), sin(t·f_k)], f_k = max_period^(-k / (dim/2)): the openai-UNet embedding (diffusers'
    ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class SPADE(nn.Module):
    """h -> GroupNorm(h)·(1 + γ(f)) + β(f), f the feature of h's spatial width (published names)."""

    def __init__(self, channels, cond_channels, groups=32, hidden=SPADE_HIDDEN):
        super().__init__()
        self.param_free_norm = GroupNorm32(groups, channels)
        self.mlp_shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, h, features):
        f = features.get(str(h.shape[-1]))
        if f is None:
            raise InputError(f'no time-aware encoder feature of width {h.shape[-1]} (it has {sorted(features)}): the '
                             f'encoder and the UNet must downsample alike')
        s = self.mlp_shared(f.to(h.dtype))
        return self.param_free_norm(h) * (1 + self.mlp_gamma(s)) + self.mlp_beta(s)


# the time-aware encoder's features of the StableSRUNet forward running in this thread/context
_FEATURES = contextvars.ContextVar('stablesr_features', default=None)


def _spade_resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """diffusers' ResnetBlock2D forward (time_embedding_norm 'default', no up/down) with SPADE on the residual
    branch before the skip add: the published ResBlockDual."""
    features = _FEATURES.get()
    if features is None:
        raise RuntimeError('a SPADE resnet was called outside StableSRUNet.forward (no encoder features set)')
    h = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
    if self.time_emb_proj is not None and temb is not None:
        h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]
    h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
    h = self.spade(h, features)
    skip = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
    return (skip + h) / self.output_scale_factor


def _spade_resnet_class():
    """``SPADEResnetBlock2D``: diffusers' ResnetBlock2D with the ResBlockDual forward, made once (at module level,
    so a whole network pickles), when diffusers is first needed."""
    global SPADEResnetBlock2D
    if SPADEResnetBlock2D is None:
        from diffusers.models.resnet import ResnetBlock2D
        SPADEResnetBlock2D = type('SPADEResnetBlock2D', (ResnetBlock2D,), {
            'forward': _spade_resnet_forward, '__doc__': _spade_resnet_forward.__doc__, '__module__': __name__})
    return SPADEResnetBlock2D


SPADEResnetBlock2D = None


def add_spade(unet, cond_channels):
    """Give every resnet of a diffusers UNet's down/mid/up blocks a ``spade`` and the ResBlockDual forward, in
    place (its own parameters keep their names). Returns the number of resnets changed."""
    groups = int(unet.config.norm_num_groups)
    spade_cls = _spade_resnet_class()
    count = 0
    blocks = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    for block in blocks:
        for resnet in getattr(block, 'resnets', []) if block is not None else []:
            if resnet.time_embedding_norm != 'default' or resnet.upsample is not None or \
                    resnet.downsample is not None or resnet.skip_time_act:
                raise ConfigError('StableSR\'s SPADE resnets need plain UNet resnets (resnet_time_scale_shift '
                                  '"default", no resnet up/downsampling, no skip_time_act), as in SD-2.1')
            resnet.spade = SPADE(resnet.out_channels, cond_channels, groups=groups)
            resnet.__class__ = spade_cls
            count += 1
    return count


class _ResBlock(nn.Module):
    """The openai-UNet res block (published ``ResBlock``): in_layers, emb_layers, out_layers, skip_connection."""

    def __init__(self, channels, emb_channels, out_channels=None, groups=32):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        out_groups = groups if out_channels % 32 == 0 else out_channels  # published: GroupNorm(C, C) otherwise
        self.out_layers = nn.Sequential(GroupNorm32(out_groups, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb).to(x.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class _AttentionBlock(nn.Module):
    """Self-attention over the pixels (published ``AttentionBlock``, legacy order: heads split before q/k/v)."""

    def __init__(self, channels, num_heads, groups=32):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, hgt, wid = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        q, k, v = qkv.reshape(b * self.num_heads, 3 * c // self.num_heads, -1).transpose(1, 2).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, -1)
        return (x + self.proj_out(h)).reshape(b, c, hgt, wid)


class _Downsample(nn.Module):
    """A stride-2 3×3 convolution, published name ``op``."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class _Step(nn.Sequential):
    """A ``TimestepEmbedSequential``: res blocks get the time embedding, other layers only x."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _ResBlock) else layer(x)
        return x


class TimeAwareEncoder(nn.Module):
    """StableSR's time-aware encoder (``EncoderUNetModelWT``): LR latent + t -> {width: feature}, see the module
    docstring. Defaults: the published configuration (:data:`PUBLISHED_ENCODER`)."""

    def __init__(self, in_channels=4, model_channels=256, out_channels=256, channel_mult=(1, 1, 2, 2),
                 num_res_blocks=2, attention_resolutions=(4, 2, 1), num_heads=4, groups=32):
        super().__init__()
        widths = sorted({int(m) * int(model_channels) for m in channel_mult})
        bad = [w for w in widths if w % groups or w % num_heads]
        if bad or int(out_channels) < 1:
            raise ConfigError(f'time-aware encoder: every width (model_channels × channel_mult: {widths}) must be a '
                              f'multiple of its {groups} norm groups and of num_heads={num_heads}; {bad} is not')
        self.model_channels = model_channels
        emb = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([_Step(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        ch, ds, taps = model_channels, 1, []
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [_ResBlock(ch, emb, mult * model_channels, groups)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(_AttentionBlock(ch, num_heads, groups))
                self.input_blocks.append(_Step(*layers))
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_Step(_Downsample(ch)))
                taps.append(ch)
                ds *= 2
        self.middle_block = _Step(_ResBlock(ch, emb, groups=groups), _AttentionBlock(ch, num_heads, groups),
                                  _ResBlock(ch, emb, groups=groups))
        taps.append(ch)
        self.fea_tran = nn.ModuleList(_ResBlock(c, emb, out_channels, groups) for c in taps)
        self.out_channels = out_channels

    def forward(self, x, t):
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        taps = []
        for block in self.input_blocks:
            h = block(x, emb)
            if h.shape[-1] != x.shape[-1]:
                taps.append(x)  # a level's output, before its downsampling
            x = h
        taps.append(self.middle_block(x, emb))
        return {str(f.shape[-1]): tran(f, emb) for f, tran in zip(taps, self.fea_tran)}


def _load_unet(unet_path, config):
    from diffusers import UNet2DConditionModel
    if (unet_path is None) == (config is None):
        raise ConfigError('StableSRUNet needs exactly one of unet_path (a local diffusers UNet folder) or unet '
                          '(a dict of UNet2DConditionModel arguments)')
    if config is not None:
        return UNet2DConditionModel(**config)
    if not os.path.isfile(os.path.join(unet_path, 'config.json')):
        raise MissingWeightsError(
            f'UNet config not found: {unet_path}/config.json is missing. Put a diffusers UNet2DConditionModel '
            'folder there (tools/convert_stablesr.py writes one for the published StableSR) or set '
            'network_g.unet_path to it.')
    if any(os.path.isfile(os.path.join(unet_path, f)) for f in UNET_WEIGHT_FILES):  # e.g. SD-2.1's, to train from
        return UNet2DConditionModel.from_pretrained(unet_path, local_files_only=True)
    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_path))


def _load_prompt(path, tokens, dim):
    if path is None:
        return torch.zeros(1, tokens, dim)
    if not os.path.isfile(path):
        raise MissingWeightsError(f'prompt embedding not found: {path}. tools/convert_stablesr.py writes it '
                                  '(the empty-prompt embedding of the SD-2.1 text encoder); or drop '
                                  'prompt_embedding_path to use zeros.')
    from safetensors.torch import load_file
    emb = load_file(path).get('prompt_embeds')
    if emb is None or emb.dim() not in (2, 3) or emb.shape[-1] != dim:
        raise ConfigError(f'{path} must hold prompt_embeds of shape (L, {dim}) or (1, L, {dim}), got '
                          f'{None if emb is None else tuple(emb.shape)}')
    return emb.reshape(1, -1, dim).float()


@ARCH_REGISTRY.register()
class StableSRUNet(nn.Module):
    """Args:
        unet (dict) | unet_path (str): UNet2DConditionModel arguments (random init), or a local diffusers UNet
            folder: its ``config.json`` gives the architecture, and its weights, where it has them (SD-2.1's
            ``unet`` folder, to train StableSR from), are loaded. The converted published StableSR
            (``tools/convert_stablesr.py``) writes the config only: its ``net_g`` file holds the whole network.
        encoder (dict): :class:`TimeAwareEncoder` arguments (default: the published configuration); its
            ``out_channels`` is SPADE's condition width, its levels must match the UNet's.
        patch_size (int): the latent tile it samples on (default: the UNet's ``sample_size``; published: 64).
        prediction_type (str): 'epsilon' (default, the published model), 'v_prediction' or 'sample'.
        prompt_embedding_path (str), prompt_tokens (int): the fixed prompt, see the module docstring (zeros of
            ``prompt_tokens`` tokens when no file: default 77 with ``unet_path``, else 1).
    """

    cond_keys = ('y_lr',)  # what the sampler pipeline passes in cond: the LR latent, patchified like x_t

    def __init__(self, unet=None, unet_path=None, encoder=None, patch_size=None, prediction_type='epsilon',
                 prompt_embedding_path=None, prompt_tokens=None, encoder_channels=None):
        super().__init__()
        if encoder_channels is not None:
            raise ConfigError('network_g.encoder_channels belonged to the former StableSR-style encoder; the '
                              'published time-aware encoder is configured by network_g.encoder '
                              '(model_channels, out_channels, channel_mult, num_res_blocks, attention_resolutions, '
                              'num_heads); drop encoder_channels')
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f'prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}')
        self.unet = _load_unet(unet_path, dict(unet) if unet is not None else None)
        cfg = self.unet.config
        levels = len(cfg.block_out_channels)
        unknown = set(encoder or {}) - set(PUBLISHED_ENCODER) - {'groups'}
        if unknown:
            raise ConfigError(f'network_g.encoder has no option(s) {sorted(unknown)}; it takes '
                              f'{sorted(PUBLISHED_ENCODER) + ["groups"]}')
        enc = {**PUBLISHED_ENCODER, **dict(encoder or {})}
        if len(enc['channel_mult']) != levels:
            raise ConfigError(f'network_g.encoder.channel_mult needs one entry per UNet level ({levels}), got '
                              f'{list(enc["channel_mult"])}: the encoder gives SPADE one feature per UNet width')
        self.in_channels, self.prediction_type = int(cfg.in_channels), prediction_type
        self.patch_size = int(patch_size or cfg.sample_size)
        self.multiple = 2 ** (levels - 1)
        if self.patch_size % self.multiple:
            raise ConfigError(f'patch_size {self.patch_size} must be a multiple of {self.multiple} (the UNet '
                              f'downsamples {levels - 1} times)')
        self.encoder = TimeAwareEncoder(self.in_channels, **enc)
        self.num_spade = add_spade(self.unet, self.encoder.out_channels)
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
        if torch.is_grad_enabled() and getattr(self.unet, 'is_gradient_checkpointing', False):
            raise ConfigError('StableSRUNet does not support the UNet\'s gradient checkpointing: the encoder features '
                              'reach the SPADE layers for one forward only, not for the re-run during backward')
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        token = _FEATURES.set(self.encoder(y_lr.to(x_t.dtype), t))
        try:
            context = self.prompt.to(x_t.dtype).expand(x_t.shape[0], -1, -1)
            return self.unet(x_t, t, encoder_hidden_states=context).sample
        finally:
            _FEATURES.reset(token)

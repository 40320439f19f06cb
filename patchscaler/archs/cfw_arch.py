"""StableSR's controllable feature wrapping (CFW): the SD VAE decoder, corrected by the LR image's encoder features.

StableSR (Wang et al., IJCV 2024, section 3.3; ``vqgan_cfw_00011.ckpt``, ``AutoencoderKLResi`` with its
``Decoder_Mix``) keeps SD's VAE and adds a fusion layer at two decoder levels. At decoder level i (1 and 2 of the
4 levels of SD's VAE, i.e. every level but the first and the last), after the level's resnets and before its
upsampler, with F_e the VAE *encoder*'s feature of the (bicubic-upsampled, [-1, 1]) LR image at level i (after
that level's resnets, before its downsampler) and F_d the decoder's:

    F_d <- F_d + w · C(concat(F_e, F_d))

C = ``encode_enc_1`` (a 2C -> C res block) -> ``encode_enc_2`` (two RRDBs, growth 32: BasicSR's, which the
published code imports too) -> ``encode_enc_3`` (a C -> C res block). The res blocks are the VAE's own kind
(GroupNorm(32, eps 1e-6) -> SiLU -> conv3×3, twice; a 1×1 ``conv_out`` on the skip when the width changes).
w is ``dec_w``: 0 gives exactly the plain SD decoder, 1 the most fidelity to the LR; StableSR recommends 0.5.
The layers keep their published names, ``fusion_layer_{i}.*``; ``tools/convert_stablesr.py --cfw`` writes them.

``decode(z, guide)`` needs the LR image the latent was sampled from (the pipeline passes it); at ``dec_w = 0``
no guide is needed.
"""
import os

import torch
from basicsr.archs.arch_util import make_layer
from basicsr.archs.rrdbnet_arch import RRDB
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from patchscaler.archs.autoencoder_arch import DiffusersAutoencoderKL
from patchscaler.registry import AUTOENCODERS
from patchscaler.utils.errors import ConfigError, InputError, MissingWeightsError


class _VAEResBlock(nn.Module):
    """The CFW's res block (published ``ResBlock`` of ``ldm/modules/diffusionmodules/model.py``)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_out = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return h + (self.conv_out(x) if hasattr(self, 'conv_out') else x)


class FuseBlock(nn.Module):
    """One CFW fusion layer (published ``Fuse_sft_block_RRDB``): F_d + w·C(concat(F_e, F_d))."""

    def __init__(self, channels, num_block=2, num_grow_ch=32):
        super().__init__()
        self.encode_enc_1 = _VAEResBlock(2 * channels, channels)
        self.encode_enc_2 = make_layer(RRDB, num_block, num_feat=channels, num_grow_ch=num_grow_ch)
        self.encode_enc_3 = _VAEResBlock(channels, channels)

    def forward(self, enc, dec, w):
        return dec + w * self.encode_enc_3(self.encode_enc_2(self.encode_enc_1(torch.cat([enc, dec], 1))))


@AUTOENCODERS.register_module()
@ARCH_REGISTRY.register()
class CFWAutoencoderKL(DiffusersAutoencoderKL):
    """The SD VAE with StableSR's CFW decoder. Args: those of :class:`DiffusersAutoencoderKL`, and

        cfw_path (str): the fusion layers (a safetensors file of ``fusion_layer_{i}.*``, written by
            ``tools/convert_stablesr.py --cfw vqgan_cfw_00011.ckpt``); None: random init (tests, ``config`` only).
        dec_w (float): the fusion weight w (StableSR: 0.5; 0 = the plain decoder).
        num_fuse_block (int): RRDBs per fusion layer (published: 2).
    """

    needs_guide = True  # decode(z, guide): the pipeline passes the upsampled LR image

    def __init__(self, pretrained_path=None, config=None, subfolder=None, scaling_factor=None, sample_posterior=False,
                 cfw_path=None, dec_w=0.5, num_fuse_block=2):
        super().__init__(pretrained_path, config, subfolder, scaling_factor, sample_posterior)
        if not 0 <= float(dec_w) <= 1:
            raise ConfigError(f'dec_w must be in [0, 1] (StableSR recommends 0.5), got {dec_w}')
        self.dec_w = float(dec_w)
        widths = list(self.vae.config.block_out_channels)
        self.fuse_levels = list(range(1, len(widths) - 1))  # every level but the first and the last
        self.fusion = nn.ModuleDict({f'fusion_layer_{i}': FuseBlock(widths[i], num_fuse_block)
                                     for i in self.fuse_levels})
        if cfw_path is None and pretrained_path is not None:
            raise ConfigError('CFWAutoencoderKL with a pretrained VAE needs cfw_path (the converted '
                              'vqgan_cfw_00011.ckpt); for the plain SD decoder use DiffusersAutoencoderKL')
        if cfw_path is not None:
            if not os.path.isfile(cfw_path):
                raise MissingWeightsError(f'CFW weights not found: {cfw_path}. Convert vqgan_cfw_00011.ckpt with '
                                          'tools/convert_stablesr.py --cfw, or set autoencoder.cfw_path to the file')
            from safetensors.torch import load_file

            from patchscaler.archs.stablesr_convert import check_state
            state = load_file(cfw_path)
            check_state(self.fusion, state, where=f'the CFW fusion layers ({cfw_path})')
            self.fusion.load_state_dict(state)
        self._freeze()

    def forward(self, x):
        """Round trip, for convenience: decode(encode(x), guide=x)."""
        return self.decode(self.encode(x), x)

    def encoder_features(self, guide):
        """{level: feature} of the VAE encoder on ``guide`` (B, 3, H, W) in [0, 1], at the fused levels."""
        enc = self.vae.encoder
        h, out = enc.conv_in(guide * 2 - 1), {}
        for i, block in enumerate(enc.down_blocks[:max(self.fuse_levels) + 1]):
            for resnet in block.resnets:
                h = resnet(h, None)
            if i in self.fuse_levels:
                out[i] = h
            for down in block.downsamplers or []:
                h = down(h)
        return out

    def decode(self, z, guide=None):
        if self.dec_w == 0:
            return super().decode(z)
        if guide is None:
            raise InputError('the CFW decoder (dec_w > 0) needs the LR image: decode(z, guide)')
        d = self.downscale_factor
        if tuple(guide.shape[-2:]) != (z.shape[-2] * d, z.shape[-1] * d):
            raise InputError(f'the CFW guide must be the latent size ×{d}: {tuple(guide.shape[-2:])} for a latent '
                             f'of {tuple(z.shape[-2:])}')
        feats = self.encoder_features(guide.to(z.dtype))
        dec, levels = self.vae.decoder, len(self.vae.config.block_out_channels)
        h = dec.mid_block(dec.conv_in(self.vae.post_quant_conv(z / self.scaling_factor)), None)
        for k, up in enumerate(dec.up_blocks):  # up_blocks[0] is the deepest level
            level = levels - 1 - k
            for resnet in up.resnets:
                h = resnet(h, None)
            if level in feats:
                h = self.fusion[f'fusion_layer_{level}'](feats[level], h, self.dec_w)
            for upsampler in up.upsamplers or []:
                h = upsampler(h)
        h = dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))
        return (h + 1) / 2

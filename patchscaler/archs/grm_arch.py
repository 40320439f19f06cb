"""Global Restoration Module (paper section 3.1, Fig. 2).

y_LR (latent of the bicubic-upsampled LR image) -> body -> two heads:

* a latent residual: y_HR = y_LR + head(features). The last conv starts at zero, so an untrained GRM
  returns y_LR (bicubic) and training only has to learn the correction;
* a confidence map C = sigmoid(head(features)), 1 channel, same spatial size, clamped to [eps, 1] so it
  lies in (0, 1] even where float32 sigmoid underflows to 0.

The body is BasicSR's, chosen in YAML (``body: swin | rrdb``): residual Swin transformer blocks (RSTB,
SwinIR) capture the long-range dependencies the paper asks of the GRM; RRDB (ESRGAN) is the all-conv
alternative. Any latent size works: the Swin body pads to a multiple of the window and crops back. BasicSR's
Swin block builds its shifted-window mask on the CPU and copies it to the device on every forward at a size other
than ``img_size``; here the masks are kept per (size, window, shift, device) instead (:class:`_MaskCachingSwinBlock`).
"""
import collections

import torch
from basicsr.archs.rrdbnet_arch import RRDB
from basicsr.archs.swinir_arch import RSTB, SwinTransformerBlock
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from patchscaler.archs.autoencoder_arch import pad_to_multiple
from patchscaler.utils.errors import ConfigError


class _MaskCachingSwinBlock(SwinTransformerBlock):
    """BasicSR's Swin block whose ``calculate_mask`` (called at every forward whose size is not the block's
    ``input_resolution``: 2·depth·num_blocks mask builds on the CPU plus host-to-device copies per GRM call) returns
    a mask kept on the block's device. The mask is a function of (size, window, shift) only, so one copy serves
    every block and model; the last :attr:`CACHE_SIZE` are kept (at paper scale one mask is ~16 MB)."""

    CACHE_SIZE = 8
    _cache = collections.OrderedDict()

    def calculate_mask(self, x_size):
        device = self.norm1.weight.device
        if torch.compiler.is_compiling():  # traced into the graph as BasicSR's is (a dict lookup would break it)
            return super().calculate_mask(x_size).to(device)
        key = (tuple(int(v) for v in x_size), self.window_size, self.shift_size, device)
        mask = self._cache.get(key)  # no lock: GRM forwards run in one thread; a race would build a mask twice
        if mask is None:
            mask = self._cache[key] = super().calculate_mask(x_size).to(device)
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        return mask


class _SwinBody(nn.Module):
    """A stack of RSTBs on a feature map; tokens in, tokens out, padded to the window size."""

    def __init__(self, num_feat, num_blocks, depth, num_heads, window_size, mlp_ratio, img_size):
        super().__init__()
        self.window_size = window_size
        resolution = (img_size, img_size)
        self.blocks = nn.ModuleList(
            RSTB(dim=num_feat, input_resolution=resolution, depth=depth, num_heads=num_heads,
                 window_size=window_size, mlp_ratio=mlp_ratio, img_size=img_size, patch_size=1)
            for _ in range(num_blocks))
        for module in self.blocks.modules():
            if type(module) is SwinTransformerBlock:
                module.__class__ = _MaskCachingSwinBlock  # same parameters and buffers, cached masks
        self.norm = nn.LayerNorm(num_feat)

    def forward(self, feat):
        h, w = feat.shape[-2:]
        x, _ = pad_to_multiple(feat, self.window_size)
        size = x.shape[-2:]
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        for block in self.blocks:
            tokens = block(tokens, size)
        x = self.norm(tokens).transpose(1, 2).reshape(x.shape)
        return x[..., :h, :w]


@ARCH_REGISTRY.register()
class GRM(nn.Module):
    """Global Restoration Module: y_LR -> (y_HR, C).

    Args:
        in_channels (int): latent channels c of the autoencoder (4 for the SD VAE, 3·d² for pixel unshuffle).
        num_feat (int): body width.
        body (str): 'swin' (BasicSR RSTB blocks) or 'rrdb' (BasicSR RRDB blocks).
        num_blocks (int): number of RSTB / RRDB blocks.
        depth (int): Swin layers per RSTB. num_heads, window_size, mlp_ratio: Swin settings.
        img_size (int): the latent size the Swin attention masks are precomputed for; other sizes work
            (their masks are made once per size and device). Must exceed ``window_size`` to keep shifted windows.
        num_grow_ch (int): RRDB growth channels.
        conf_eps (float): lower clamp of C.
    """

    def __init__(self, in_channels=4, num_feat=64, body='swin', num_blocks=4, depth=2, num_heads=4,
                 window_size=8, mlp_ratio=2.0, img_size=64, num_grow_ch=32, conf_eps=1e-4):
        super().__init__()
        self.conf_eps = conf_eps
        self.conv_first = nn.Conv2d(in_channels, num_feat, 3, 1, 1)
        if body == 'swin':
            if num_feat % num_heads:
                raise ConfigError(f'GRM: num_feat ({num_feat}) must be divisible by num_heads ({num_heads})')
            self.body = _SwinBody(num_feat, num_blocks, depth, num_heads, window_size, mlp_ratio, img_size)
        elif body == 'rrdb':
            self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_blocks)))
        else:
            raise ConfigError(f"GRM: body must be 'swin' or 'rrdb', got {body!r}")
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.residual_head = nn.Sequential(
            nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(num_feat, in_channels, 3, 1, 1))
        self.confidence_head = nn.Sequential(
            nn.Conv2d(num_feat, num_feat // 2, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(num_feat // 2, 1, 3, 1, 1))
        nn.init.zeros_(self.residual_head[-1].weight)
        nn.init.zeros_(self.residual_head[-1].bias)

    def forward(self, y_lr):
        """Returns ``(y_hr, confidence)``, shapes (B, c, h, w) and (B, 1, h, w)."""
        feat = self.conv_first(y_lr)
        feat = self.conv_after_body(self.body(feat)) + feat
        y_hr = y_lr + self.residual_head(feat)
        confidence = torch.sigmoid(self.confidence_head(feat)).clamp(self.conf_eps, 1.0)
        return y_hr, confidence

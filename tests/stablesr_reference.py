"""From-the-math reference of the published StableSR networks (IceClear/StableSR), for tests only.

Written from the equations and tensor shapes, not copied; only the module tree is reproduced, so ``state_dict()``
keys, order and shapes equal the official checkpoint's once the prefixes ``model.diffusion_model.`` (UNet) and
``structcond_stage_model.`` (encoder) are stripped. Official counterparts (ldm/modules/...):
  RefSPADE -> spade.py SPADE;  RefResBlock / RefResBlockDual -> diffusionmodules/openaimodel.py ResBlock /
  ResBlockDual;  RefAttentionBlock -> openaimodel.py AttentionBlock + QKVAttentionLegacy;  RefCrossAttention,
  RefFeedForward (RefGEGLU), RefBasicTransformerBlock, RefSpatialTransformerV2 -> attention.py CrossAttention,
  FeedForward (GEGLU), BasicTransformerBlockV2, SpatialTransformerV2;  RefDownsample / RefUpsample ->
  openaimodel.py Downsample / Upsample;  RefUNetDualcondV2 -> openaimodel.py UNetModelDualcondV2;
  RefEncoderUNetModelWT -> openaimodel.py EncoderUNetModelWT;  ``ref_stablesr_configs('full')`` ->
  configs/stableSRNew/v2-finetune_text_T_512.yaml.
Numerics: ResBlock/AttentionBlock/SPADE/UNet-out norms are GroupNorm(32, eps 1e-5) computed in float32 and cast
back; the transformer's input norm is a plain GroupNorm(32, eps 1e-6); LayerNorms eps 1e-5; attention scale
1/sqrt(head dim); softmax in float32. Zero-initialised layers (out_layers conv, proj_out, UNet out conv) make a
fresh model degenerate: ``ref_randomize_`` it before comparing outputs.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _hi(dtype):  # float32, or float64 for a float64 model (the official nets only run in float32 / autocast)
    return torch.promote_types(dtype, torch.float32)


class RefGroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in (at least) float32, the result cast back to the input dtype."""
    def forward(self, x):
        dt = _hi(x.dtype)
        return F.group_norm(x.to(dt), self.num_groups, self.weight.to(dt), self.bias.to(dt), self.eps).to(x.dtype)


def ref_timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half), zero-padded for odd dim."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    ang = t.float()[:, None] * freqs[None]  # float32, whatever the model's dtype
    return F.pad(torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1), (0, dim % 2))


def _zeroed(module):
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _conv3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def _attend(q, k, v):
    """softmax(q k^T / sqrt(d)) v on (batch, tokens, d) tensors; the softmax is taken in float32."""
    w = torch.bmm(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5
    return torch.bmm(w.to(_hi(w.dtype)).softmax(dim=-1).to(v.dtype), v)


class RefSPADE(nn.Module):
    """norm(x) * (1 + gamma(f)) + beta(f), f the encoder feature with x's spatial width."""
    def __init__(self, norm_nc, label_nc, hidden=128):
        super().__init__()
        self.param_free_norm = RefGroupNorm32(32, norm_nc)  # affine despite its name, as in the checkpoint
        self.mlp_shared = nn.Sequential(_conv3(label_nc, hidden), nn.ReLU())
        self.mlp_gamma, self.mlp_beta = _conv3(hidden, norm_nc), _conv3(hidden, norm_nc)

    def forward(self, x, feats):
        a = self.mlp_shared(feats[str(x.size(-1))])
        return self.param_free_norm(x) * (1 + self.mlp_gamma(a)) + self.mlp_beta(a)


class RefResBlock(nn.Module):
    """skip(x) + out_layers(in_layers(x) + W silu(emb)) (use_scale_shift_norm=False, no up/down)."""
    dual = False

    def __init__(self, channels, emb_channels, out_channels=None, semb_channels=None):
        super().__init__()
        out = out_channels or channels
        self.in_layers = nn.Sequential(RefGroupNorm32(32, channels), nn.SiLU(), _conv3(channels, out))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out))
        if self.dual:
            self.spade = RefSPADE(out, semb_channels)
        groups = 32 if (self.dual or out % 32 == 0) else out  # plain ResBlock: one group per channel then
        self.out_layers = nn.Sequential(RefGroupNorm32(groups, out), nn.SiLU(), nn.Dropout(0.0),
                                        _zeroed(_conv3(out, out)))
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def _residual(self, x, emb):
        h = self.in_layers(x)
        return self.out_layers(h + self.emb_layers(emb).to(h.dtype)[:, :, None, None])

    def forward(self, x, emb):
        return self.skip_connection(x) + self._residual(x, emb)


class RefResBlockDual(RefResBlock):
    """RefResBlock whose residual branch goes through SPADE before the skip add."""
    dual = True

    def __init__(self, channels, emb_channels, semb_channels, out_channels=None):
        super().__init__(channels, emb_channels, out_channels, semb_channels)

    def forward(self, x, emb, feats):
        return self.skip_connection(x) + self.spade(self._residual(x, emb), feats)


class RefAttentionBlock(nn.Module):
    """Self-attention over the H*W positions; qkv channels are laid out (head, [q|k|v], head_ch)."""
    def __init__(self, channels, num_heads=1, num_head_channels=-1):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.norm = RefGroupNorm32(32, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, hh * ww)
        qkv = self.qkv(self.norm(x)).reshape(b * self.num_heads, 3 * c // self.num_heads, hh * ww)
        q, k, v = (t.transpose(1, 2) for t in qkv.chunk(3, dim=1))
        a = _attend(q, k, v).transpose(1, 2).reshape(b, c, hh * ww)
        return (x + self.proj_out(a)).reshape(b, c, hh, ww)


class RefCrossAttention(nn.Module):
    """Multi-head attention, inner channels laid out (head, head_dim); context=None is self-attention."""
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
        super().__init__()
        inner, context_dim = heads * dim_head, context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        ctx, (b, n, _) = (x if context is None else context), x.shape

        def heads(t):  # (b, tokens, heads*d) -> (b*heads, tokens, d)
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2).flatten(0, 1)
        out = _attend(heads(self.to_q(x)), heads(self.to_k(ctx)), heads(self.to_v(ctx)))
        return self.to_out(out.unflatten(0, (b, self.heads)).transpose(1, 2).reshape(b, n, -1))


class RefGEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)  # first half the value, second half the (erf-)GELU gate
        return value * F.gelu(gate)


class RefFeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(RefGEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class RefBasicTransformerBlock(nn.Module):
    """Pre-norm: x += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x)."""
    def __init__(self, dim, n_heads, d_head, context_dim=None):
        super().__init__()  # registration order of the official block: attn1, ff, attn2, norm1..3
        self.attn1 = RefCrossAttention(dim, None, n_heads, d_head)
        self.ff = RefFeedForward(dim)
        self.attn2 = RefCrossAttention(dim, context_dim, n_heads, d_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class RefSpatialTransformerV2(nn.Module):
    """x + proj_out(blocks(proj_in(norm x))) on the H*W tokens, with the use_linear=True projections of the
    config: Linear layers applied to the flattened tokens (SpatialTransformer / use_linear=False: 1x1 convs)."""
    def __init__(self, in_channels, n_heads, d_head, depth=1, context_dim=None):
        super().__init__()
        inner = n_heads * d_head
        # the official proj_out is declared Linear(in_channels, inner), which only works when the two agree
        assert inner == in_channels, 'a linear SpatialTransformerV2 needs n_heads * d_head == in_channels'
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            RefBasicTransformerBlock(inner, n_heads, d_head, context_dim) for _ in range(depth))
        self.proj_out = _zeroed(nn.Linear(in_channels, inner))

    def forward(self, x, context=None):
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:  # (the official depth > 1 path wants one context per block)
            h = block(h, context)
        return x + self.proj_out(h).transpose(1, 2).reshape(x.shape)


class RefDownsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = _conv3(channels, channels, stride=2)

    def forward(self, x):
        return self.op(x)


class RefUpsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


class RefSeq(nn.Sequential):
    """Gives each layer its inputs: emb to ResBlocks, context to transformers, encoder features to SPADE blocks."""
    def forward(self, x, emb, context=None, feats=None):
        for layer in self:
            if isinstance(layer, RefResBlockDual):
                x = layer(x, emb, feats)
            elif isinstance(layer, RefResBlock):
                x = layer(x, emb)
            else:
                x = layer(x, context) if isinstance(layer, RefSpatialTransformerV2) else layer(x)
        return x


class _RefTimeNet(nn.Module):
    """Shared by both nets: time_embed (mc -> 4 mc -> 4 mc) and the input conv, input_blocks.0.0."""
    def __init__(self, in_channels, mc):
        super().__init__()
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, 4 * mc), nn.SiLU(), nn.Linear(4 * mc, 4 * mc))
        self.input_blocks = nn.ModuleList([RefSeq(_conv3(in_channels, mc))])

    def _emb(self, timesteps):
        w = self.time_embed[0].weight  # the official nets run in float32; follow the weights' dtype instead
        return self.time_embed(ref_timestep_embedding(timesteps, self.model_channels).to(w.device, w.dtype)), w.dtype


class RefUNetDualcondV2(_RefTimeNet):
    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 channel_mult, num_head_channels, context_dim, semb_channels, transformer_depth=1):
        super().__init__(in_channels, model_channels)
        mc, emb, last = model_channels, 4 * model_channels, len(channel_mult) - 1
        nrb = [num_res_blocks] * len(channel_mult) if isinstance(num_res_blocks, int) else list(num_res_blocks)

        def res(cin, cout=None):
            return RefResBlockDual(cin, emb, semb_channels, cout)

        def attn(ch):
            return RefSpatialTransformerV2(ch, ch // num_head_channels, num_head_channels, transformer_depth,
                                           context_dim)
        skips, ch, ds = [mc], mc, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(nrb[level]):
                layers, ch = [res(ch, mult * mc)], mult * mc
                self.input_blocks.append(RefSeq(*layers, *([attn(ch)] if ds in attention_resolutions else [])))
                skips.append(ch)
            if level != last:
                self.input_blocks.append(RefSeq(RefDownsample(ch)))
                skips.append(ch)
                ds *= 2
        self.middle_block = RefSeq(res(ch), attn(ch), res(ch))  # the middle always attends
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for i in range(nrb[level] + 1):
                layers, ch = [res(ch + skips.pop(), mc * channel_mult[level])], mc * channel_mult[level]
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == nrb[level]:
                    layers.append(RefUpsample(ch))
                    ds //= 2
                self.output_blocks.append(RefSeq(*layers))
        self.out = nn.Sequential(RefGroupNorm32(32, ch), nn.SiLU(), _zeroed(_conv3(mc, out_channels)))

    def forward(self, x, timesteps, context, struct_cond):
        emb, dtype = self._emb(timesteps)
        h, skips = x.to(dtype), []
        for block in self.input_blocks:
            h = block(h, emb, context, struct_cond)
            skips.append(h)
        h = self.middle_block(h, emb, context, struct_cond)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, struct_cond)
        return self.out(h.to(x.dtype))


class RefEncoderUNetModelWT(_RefTimeNet):
    """Half UNet returning {str(width): fea_tran_i(f_i, emb)} for each feature f_i entering a downsample, then the
    middle block's output (a 64x64 latent with channel_mult [1,1,2,2] gives keys '64', '32', '16', '8')."""
    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 channel_mult, num_heads=1, num_head_channels=-1):
        super().__init__(in_channels, model_channels)
        mc, emb = model_channels, 4 * model_channels

        def attn(ch):
            return RefAttentionBlock(ch, num_heads, num_head_channels)
        feat_chans, ch, ds = [], mc, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers, ch = [RefResBlock(ch, emb, mult * mc)], mult * mc
                self.input_blocks.append(RefSeq(*layers, *([attn(ch)] if ds in attention_resolutions else [])))
            if level != len(channel_mult) - 1:
                self.input_blocks.append(RefSeq(RefDownsample(ch)))
                feat_chans.append(ch)
                ds *= 2
        self.middle_block = RefSeq(RefResBlock(ch, emb), attn(ch), RefResBlock(ch, emb))
        self.fea_tran = nn.ModuleList(RefResBlock(c, emb, out_channels) for c in feat_chans + [ch])

    def forward(self, x, timesteps):
        emb, dtype = self._emb(timesteps)
        h, feats = x.to(dtype), []
        for block in self.input_blocks:
            prev, h = h, block(h, emb)
            if h.size(-1) != prev.size(-1):  # the width changed: keep the feature that entered the downsample
                feats.append(prev)
        feats.append(self.middle_block(h, emb))
        assert len(feats) == len(self.fea_tran)
        return {str(f.size(-1)): tran(f, emb) for f, tran in zip(feats, self.fea_tran)}


def ref_stablesr_configs(size='full'):
    """Constructor kwargs {'unet': ..., 'encoder': ...}: 'full' is v2-finetune_text_T_512.yaml, 'tiny' a CPU-fast
    pair keeping every structural feature: 1x1 and identity skips, attention on all but the deepest level (as
    in 'full'), three widths (a 16x16 latent gives encoder keys '16', '8', '4')."""
    if size == 'full':
        unet = dict(in_channels=4, model_channels=320, out_channels=4, num_res_blocks=2,
                    attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4], num_head_channels=64,
                    context_dim=1024, semb_channels=256)
        enc = dict(in_channels=4, model_channels=256, out_channels=256, num_res_blocks=2,
                   attention_resolutions=[4, 2, 1], channel_mult=[1, 1, 2, 2], num_heads=4)
    elif size == 'tiny':
        unet = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=2, attention_resolutions=[2, 1],
                    channel_mult=[1, 2, 2], num_head_channels=16, context_dim=32, semb_channels=32)
        enc = dict(in_channels=4, model_channels=32, out_channels=32, num_res_blocks=2, attention_resolutions=[2, 1],
                   channel_mult=[1, 2, 2], num_heads=2)
    else:
        raise ValueError(f'unknown size {size!r}')
    return {'unet': unet, 'encoder': enc}


@torch.no_grad()
def ref_randomize_(module, seed=0, std=0.05):
    """Fill every parameter with N(0, std^2) (1-D weights, i.e. norm scales, with 1 + N(0, std^2))."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        p.copy_(float(name.endswith('weight') and p.dim() == 1) + std * torch.randn(p.shape, generator=g))
    return module

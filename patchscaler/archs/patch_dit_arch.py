"""Patch-DiT: the patch-level diffusion transformer of PatchScaler (section 3.1, 3.3, Fig. 2).

DiT (Peebles & Xie) on one V×V latent patch, with two changes from the paper:

* the input is concat(y0, y_t) (2c channels): the GRM's coarse patch y0 and the noisy patch y_t, and the
  output is the predicted x0 (c channels);
* every block has a cross-attention layer to the texture-prompt tokens. The prompt is time-independent
  (computed once per patch by :class:`TextureEncoder`); what changes with t is a dimension-wise scale of
  the cross-attention output, projected from the time embedding — the paper's "efficient alternative" to
  re-encoding the prompt at every step.

Choices where the paper is silent (its supplementary is not public):

* The output is a residual on y0: ``x0 = y0 + head(...)``. With DiT's zero-initialised adaLN gates, final
  layer and (here) cross-attention scale, a fresh Patch-DiT returns y0 exactly — an identity-like start
  at the GRM's answer, which is the paper's x0 = y0 + Δx0 (Eq. 5) with Δx0 = 0.
* The prompt may carry a per-token additive attention bias (the texture encoder's log-weight of each
  prior's similarity), so a prior that matches badly gets less attention in every block.
* Presets in the spirit of DiT; ``B`` is the paper-scale default. Parameters and GFLOPs per call for one
  V=16, p=2 patch with a K=4 prompt (measured by ``tools/benchmark.py --parts dit``) are in docs/pgs.md.

Attention runs through ``F.scaled_dot_product_attention``, so GPUs get flash / memory-efficient kernels.
"""
import math

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from patchscaler.utils.errors import ConfigError, InputError

PRESETS = {
    'S': dict(hidden_size=384, depth=12, num_heads=6),
    'B': dict(hidden_size=768, depth=12, num_heads=12),
    'L': dict(hidden_size=1024, depth=24, num_heads=16),
}


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(dim, grid):
    """Fixed 2D sine-cosine position embedding (grid², dim), as in DiT/MAE."""
    if dim % 4:
        raise ConfigError(f'the embedding dimension must be a multiple of 4 for 2D sin-cos positions, got {dim}')
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing='ij')
    parts = [f(c.flatten()[:, None] * omega[None]) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, 1).float()


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies of t -> MLP (DiT)."""

    def __init__(self, hidden_size, freq_size=256):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(nn.Linear(freq_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.freq_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head attention through SDPA; self-attention when ``context`` is None, else cross-attention."""

    def __init__(self, dim, num_heads, context_dim=None):
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f'hidden_size {dim} must be divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, bias=None):
        b, n, d = x.shape
        context = x if context is None else context
        h = self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        mask = None if bias is None else bias[:, None, None, :].to(q.dtype)  # (b, 1, 1, L): per prompt token
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class PatchDiTBlock(nn.Module):
    """adaLN-Zero self-attention and MLP (DiT) with a time-scaled cross-attention to the prompt between them."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, prompt_dim=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(approximate='tanh'),
                                 nn.Linear(hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        if prompt_dim:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = Attention(hidden_size, num_heads, context_dim=prompt_dim)
            # dimension-wise scale of the cross-attention output from the time embedding (section 3.3)
            self.cross_scale = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        else:
            self.cross_attn = None

    def forward(self, x, c, prompt=None, prompt_bias=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None and prompt is not None:
            x = x + self.cross_scale(c).unsqueeze(1) * self.cross_attn(self.norm_cross(x), prompt, prompt_bias)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


@ARCH_REGISTRY.register()
class PatchDiT(nn.Module):
    """Patch-DiT: ``forward(x_t, t, y0, prompt=None, prompt_bias=None) -> x0`` for V×V latent patches.

    Args:
        in_channels (int): c, the latent channels (SD VAE: 4). input_size (int): V. patch_size (int): p,
            the token patch (V/p)² tokens. preset (str | None): 'S', 'B' or 'L' (hidden_size, depth,
            num_heads as in DiT); explicit arguments override it. mlp_ratio (float).
        prompt_dim (int | None): width of the texture-prompt tokens (the TextureEncoder's ``dim``); None
            builds no cross-attention (the paper's "no prompt" ablation).
        residual (bool): predict x0 as y0 + head(...) (default; see the module docstring).
    """

    def __init__(self, in_channels=4, input_size=16, patch_size=2, preset=None, hidden_size=None, depth=None,
                 num_heads=None, mlp_ratio=4.0, prompt_dim=None, residual=True):
        super().__init__()
        if preset is not None and preset not in PRESETS:
            raise ConfigError(f'PatchDiT preset must be one of {sorted(PRESETS)}, got {preset!r}')
        size = dict(PRESETS[preset]) if preset else {}
        for key, value in (('hidden_size', hidden_size), ('depth', depth), ('num_heads', num_heads)):
            if value is not None:
                size[key] = value
            elif key not in size:
                raise ConfigError(f'PatchDiT needs {key} (or a preset: {sorted(PRESETS)})')
        if input_size % patch_size:
            raise ConfigError(f'PatchDiT: input_size V={input_size} must be divisible by patch_size p={patch_size}')
        self.in_channels, self.input_size, self.patch_size = in_channels, input_size, patch_size
        self.hidden_size, self.residual, self.prompt_dim = size['hidden_size'], residual, prompt_dim
        d, grid = size['hidden_size'], input_size // patch_size
        self.x_embedder = nn.Conv2d(2 * in_channels, d, patch_size, patch_size)
        self.t_embedder = TimestepEmbedder(d)
        self.register_buffer('pos_embed', sincos_2d(d, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(PatchDiTBlock(d, size['num_heads'], mlp_ratio, prompt_dim)
                                    for _ in range(size['depth']))
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.head = nn.Linear(d, patch_size * patch_size * in_channels)
        self._init_weights()

    def _init_weights(self):
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(xavier)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        zero = [self.adaLN_final[-1], self.head]
        for block in self.blocks:
            zero.append(block.adaLN_modulation[-1])
            if block.cross_attn is not None:
                zero.append(block.cross_scale[-1])
        for lin in zero:  # adaLN-Zero: every residual branch and the head start at zero
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, tokens):
        p, g, c = self.patch_size, self.input_size // self.patch_size, self.in_channels
        x = tokens.view(tokens.shape[0], g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(tokens.shape[0], c, g * p, g * p)

    def _check(self, x_t, t, y0, prompt, prompt_bias):
        want = (self.in_channels, self.input_size, self.input_size)
        for name, x in (('x_t', x_t), ('y0', y0)):
            if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != want:
                raise InputError(f'PatchDiT expects {name} of shape (n, {want[0]}, {want[1]}, {want[2]}) (c, V, V), '
                                 f'got {tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}')
        if y0.shape[0] != x_t.shape[0] or t.shape != (x_t.shape[0],):
            raise InputError(f'PatchDiT: y0 {tuple(y0.shape)} and t {tuple(t.shape)} must match x_t\'s batch '
                             f'{x_t.shape[0]}')
        if prompt is not None:
            if self.prompt_dim is None:
                raise InputError('this PatchDiT was built without prompt_dim (no cross-attention) but got a prompt')
            if prompt.dim() != 3 or prompt.shape[0] != x_t.shape[0] or prompt.shape[2] != self.prompt_dim:
                raise InputError(f'the prompt must be (n, L, {self.prompt_dim}), got {tuple(prompt.shape)}')
            if prompt_bias is not None and tuple(prompt_bias.shape) != tuple(prompt.shape[:2]):
                raise InputError(f'prompt_bias must be (n, L) = {tuple(prompt.shape[:2])}, got '
                                 f'{tuple(prompt_bias.shape)}')

    def forward(self, x_t, t, y0, prompt=None, prompt_bias=None):
        """x_t, y0: (n, c, V, V); t: (n,) integer timesteps; prompt: (n, L, prompt_dim) or None."""
        if not torch.is_tensor(t) or t.dim() == 0:
            t = torch.full((x_t.shape[0],), int(t), device=x_t.device)
        self._check(x_t, t, y0, prompt, prompt_bias)
        x = self.x_embedder(torch.cat([y0, x_t], 1)).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t)
        for block in self.blocks:
            x = block(x, c, prompt, prompt_bias)
        shift, scale = self.adaLN_final(c).chunk(2, dim=1)
        out = self.unpatchify(self.head(modulate(self.norm_final(x), shift, scale)))
        return y0 + out.to(y0.dtype) if self.residual else out

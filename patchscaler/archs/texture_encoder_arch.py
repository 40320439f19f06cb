"""The similarity-aware texture encoder (section 3.3): top-K texture priors -> texture-prompt tokens.

Input: the K priors tp^k (n, K, c, V, V) retrieved from the RTM for each y0 patch (Algorithm 1) and their
cosine similarities s^k (n, K). Output: prompt tokens (n, K·(V/q)², dim) for Patch-DiT's cross-attention
and a per-token attention bias (n, K·(V/q)²).

Time-independent: it sees no timestep, so it runs once per patch and its output is reused for every
denoising step of that patch (PGS's ``prepare_cond``); the time dependence lives in Patch-DiT's
time-embedding scale of the cross-attention output.

Choices where the paper is silent:

* Each prior is split into q×q tokens (``token_patch``; q=4 gives 16 tokens per prior at V=16), with
  fixed 2D sin-cos positions, and a few pre-norm transformer layers let the K priors' tokens see each
  other.
* Similarity awareness, two ways: the tokens of prior k are FiLM-modulated by an embedding of s^k (what
  the similarity is), and the bias ``log σ(a·s^k + b)`` with learned a, b (initialised so that s=0.5
  gives σ=0.5 and good matches ≈ 1) is added to Patch-DiT's cross-attention logits for those tokens: a
  prior that matches badly gets less attention, independently of its content.
"""
import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from patchscaler.archs.patch_dit_arch import sincos_2d
from patchscaler.utils.errors import ConfigError, InputError


@ARCH_REGISTRY.register()
class TextureEncoder(nn.Module):
    """``forward(priors (n, K, c, V, V), similarities (n, K)) -> (tokens (n, L, dim), bias (n, L))``.

    Args:
        in_channels (int): c. input_size (int): V. token_patch (int): q, tokens per prior = (V/q)².
        dim (int): token width (Patch-DiT's ``prompt_dim``). depth (int): transformer layers over the
            K·(V/q)² tokens (0: none). num_heads (int). similarity_bias (bool): add the log-weight bias.
    """

    def __init__(self, in_channels=4, input_size=16, token_patch=4, dim=256, depth=2, num_heads=4,
                 similarity_bias=True):
        super().__init__()
        if input_size % token_patch:
            raise ConfigError(f'TextureEncoder: input_size V={input_size} must be divisible by token_patch '
                              f'q={token_patch}')
        self.in_channels, self.input_size, self.token_patch, self.dim = in_channels, input_size, token_patch, dim
        self.embed = nn.Conv2d(in_channels, dim, token_patch, token_patch)
        self.register_buffer('pos_embed', sincos_2d(dim, input_size // token_patch)[None, None], persistent=False)
        self.sim_film = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, 2 * dim))
        nn.init.zeros_(self.sim_film[-1].weight)
        nn.init.zeros_(self.sim_film[-1].bias)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout=0.0, activation='gelu', batch_first=True,
                                       norm_first=True) for _ in range(depth))
        self.out_norm = nn.LayerNorm(dim, eps=1e-6)
        self.similarity_bias = similarity_bias
        if similarity_bias:  # only when used: DDP refuses parameters that get no gradient
            self.bias_scale = nn.Parameter(torch.tensor(8.0))
            self.bias_shift = nn.Parameter(torch.tensor(-4.0))

    def forward(self, priors, similarities):
        if not torch.is_tensor(priors) or priors.dim() != 5 or tuple(priors.shape[2:]) != (
                self.in_channels, self.input_size, self.input_size):
            raise InputError(f'TextureEncoder expects priors (n, K, {self.in_channels}, {self.input_size}, '
                             f'{self.input_size}), got {tuple(priors.shape) if torch.is_tensor(priors) else priors}')
        n, k = priors.shape[:2]
        if tuple(similarities.shape) != (n, k):
            raise InputError(f'similarities must be (n, K) = ({n}, {k}), got {tuple(similarities.shape)}')
        tok = self.embed(priors.flatten(0, 1)).flatten(2).transpose(1, 2)  # (n·K, T, dim)
        tok = tok.view(n, k, -1, self.dim) + self.pos_embed.to(tok.dtype)
        s = similarities.to(tok.dtype)
        shift, scale = self.sim_film(s[..., None]).chunk(2, dim=-1)  # (n, K, dim) each
        tok = self.norm(tok) * (1 + scale[:, :, None]) + shift[:, :, None]
        tok = tok.flatten(1, 2)
        for layer in self.layers:
            tok = layer(tok)
        tok = self.out_norm(tok)
        per_token = tok.shape[1] // k
        if self.similarity_bias:
            bias = F.logsigmoid(self.bias_scale * similarities.float() + self.bias_shift)
        else:
            bias = torch.zeros_like(similarities, dtype=torch.float32)
        return tok, bias.repeat_interleave(per_token, dim=1).to(tok.dtype)

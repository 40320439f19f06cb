"""Patch-DiT with its texture prompt: the denoiser PatchScaler trains and PGS calls (sections 3.2-3.3).

:class:`PromptedPatchDiT` joins Patch-DiT and the (optional) texture encoder into one module,
``forward(x_t, t, cond)`` with ``cond = {y0, prompt, prompt_bias}``; :func:`make_prompt_fn` is PGS's
``prepare_cond``: RTM retrieval on a batch of y0 patches (Algorithm 1), then the texture encoder, once per patch.
:func:`build_denoiser` and :func:`build_rtm_for` build both from an option file.
"""
import contextlib

from torch import nn

from patchscaler.utils.errors import ConfigError


class PromptedPatchDiT(nn.Module):
    """Patch-DiT with its (optional) texture encoder: the denoiser PGS calls, ``forward(x_t, t, cond)``."""

    def __init__(self, dit, texture_encoder=None):
        super().__init__()
        if texture_encoder is not None:
            if dit.prompt_dim != texture_encoder.dim:
                raise ConfigError(f'network_dit.prompt_dim ({dit.prompt_dim}) must equal network_texture.dim '
                                  f'({texture_encoder.dim})')
            if (texture_encoder.in_channels, texture_encoder.input_size) != (dit.in_channels, dit.input_size):
                raise ConfigError(f'network_texture (in_channels, input_size) = ({texture_encoder.in_channels}, '
                                  f'{texture_encoder.input_size}) must match network_dit\'s '
                                  f'({dit.in_channels}, {dit.input_size})')
        elif dit.prompt_dim:
            raise ConfigError('network_dit has prompt_dim set but there is no network_texture; drop prompt_dim for '
                              'the no-prompt ablation or add network_texture and rtm')
        self.dit = dit
        self.texture_encoder = texture_encoder

    cond_keys = ('y0',)
    prediction_type = 'sample'

    @property
    def patch_size(self):
        return self.dit.input_size

    def encode_prompt(self, priors, similarities):
        tokens, bias = self.texture_encoder(priors, similarities)
        return {'prompt': tokens, 'prompt_bias': bias}

    def forward(self, x_t, t, cond):
        """``cond``: ``y0`` and either the encoded prompt (``prompt``, ``prompt_bias``: PGS encodes it once per
        patch in ``prepare_cond``) or the raw ``priors`` and ``similarities`` (training: encoded here, inside
        the forward, so DistributedDataParallel sees the encoder's parameters used)."""
        if 'priors' in cond and self.texture_encoder is not None:
            cond = {**cond, **self.encode_prompt(cond['priors'], cond['similarities'])}
        return self.dit(x_t, t, cond['y0'], cond.get('prompt'), cond.get('prompt_bias'))


def make_prompt_fn(denoiser, rtm, top_k=None, home=None, lock=None):
    """PGS ``prepare_cond``: retrieve the top-K priors for a batch of y0 patches and encode the prompt. With
    group-parallel devices the batch may sit on another device than the RTM (``home``): retrieval runs at home
    and the prompt is encoded by that device's copy of the denoiser (PGS passes it); ``lock`` serialises the
    retrieval of the devices' threads (a faiss GPU index must not be searched concurrently)."""
    if rtm is None or getattr(denoiser, 'texture_encoder', None) is None:
        return None

    def prepare(cond, denoiser=denoiser):
        y0 = cond['y0']
        with lock or contextlib.nullcontext():
            priors, sims = rtm.query(y0 if home is None else y0.to(home), top_k)
        return {**cond, **denoiser.encode_prompt(priors.to(y0.device), sims.to(y0.device))}
    return prepare


def build_denoiser(opt):
    """PromptedPatchDiT from ``network_dit`` (+ ``network_texture``) options, or None without ``network_dit``."""
    from basicsr.archs import build_network
    if not opt.get('network_dit'):
        if opt.get('network_texture'):
            raise ConfigError('network_texture is set but network_dit is not; the texture prompt feeds Patch-DiT')
        return None
    texture = build_network(dict(opt['network_texture'])) if opt.get('network_texture') else None
    return PromptedPatchDiT(build_network(dict(opt['network_dit'])), texture)


def build_rtm_for(opt, autoencoder, denoiser, device):
    """The RTM of ``opt['rtm']`` when the denoiser has a texture encoder (checked against its AE and V)."""
    from patchscaler.retrieval import build_retriever
    if denoiser is None or denoiser.texture_encoder is None:
        return None
    if not opt.get('rtm'):
        raise ConfigError('network_texture needs an rtm option ({type: ReferenceTextureMemory, path: ...}); build '
                          'one with tools/build_rtm.py, or drop network_texture and prompt_dim (no-prompt ablation)')
    return build_retriever(opt['rtm'], autoencoder, denoiser.patch_size, device)

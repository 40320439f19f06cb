"""The published StableSR checkpoints -> this project's networks (``tools/convert_stablesr.py`` is the CLI).

The published files (IceClear/StableSR on GitHub / Hugging Face) are PyTorch-Lightning checkpoints of
``LatentDiffusionSRTextWT``: ``state_dict`` holds ``model.diffusion_model.*`` (the SPADE UNet, ldm names),
``structcond_stage_model.*`` (the time-aware encoder), ``first_stage_model.*`` (the SD-2.1 VAE),
``cond_stage_model.*`` (OpenCLIP-H, not needed: the prompt is fixed) and the schedule's buffers (``betas``,
``alphas_cumprod``, ...). ``vqgan_cfw_00011.ckpt`` holds an ``AutoencoderKLResi``: ``encoder.*``, ``decoder.*`` with
the CFW ``decoder.fusion_layer_{1,2}.*``, ``quant_conv``, ``post_quant_conv`` and its training loss's ``loss.*``.

* :func:`convert_stablesr_checkpoint` maps the UNet with diffusers' own LDM single-file conversion
  (``convert_ldm_unet_checkpoint``, which carries every ``spade`` key along with its resnet's new name) and
  prefixes it ``unet.``, strips the encoder's prefix to ``encoder.`` (its names are the published ones, see
  :mod:`patchscaler.archs.stablesr_arch`), and refuses a file with a UNet key the conversion did not map.
* :func:`convert_vae_checkpoint` maps an SD VAE (diffusers' ``convert_ldm_vae_checkpoint``); the CFW decoder's
  fusion layers keep their published names (:mod:`patchscaler.archs.cfw_arch`).
* :func:`check_schedule` compares the file's ``alphas_cumprod`` with the sampler's scheduler: StableSR is SD's
  scaled-linear schedule (β from 0.00085 to 0.012, T = 1000).
* :func:`check_state` is the strict key/shape check, naming the first missing/unexpected key.

Conversion only renames and (for the VAE's attention) reshapes: it touches no values, so it runs on meta tensors
(the tests convert a full-size fake checkpoint in seconds).
"""
import torch

from patchscaler.utils.errors import CheckpointError

UNET_PREFIX, ENCODER_PREFIX, VAE_PREFIX = 'model.diffusion_model.', 'structcond_stage_model.', 'first_stage_model.'

# The published unet_config (v2-finetune_text_T_512.yaml: model_channels 320, channel_mult [1, 2, 4, 4],
# attention_resolutions [4, 2, 1], num_head_channels 64, context_dim 1024, linear transformer projections) in
# diffusers' terms: SD-2.1-base's UNet2DConditionModel.
SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
    up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
    attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, cross_attention_dim=1024,
    flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, norm_eps=1e-5)
# the published first_stage_config (ch 128, ch_mult [1, 2, 4, 4], z 4, 512 px) = SD-2.1's VAE
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                down_block_types=['DownEncoderBlock2D'] * 4, up_block_types=['UpDecoderBlock2D'] * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
# LatentDiffusion's "linear" schedule = diffusers' scaled_linear
STABLESR_BETAS = dict(num_train_timesteps=1000, beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012)


def lightning_state_dict(ckpt):
    """The ``state_dict`` of a loaded Lightning checkpoint (or the dict itself when it is one already)."""
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError('the file holds no state_dict of tensors (expected a StableSR Lightning checkpoint '
                              'with state_dict: model.diffusion_model.*, structcond_stage_model.*, ...)')
    return state


def _unet_config(unet_config):
    cfg = dict(unet_config)
    cfg['layers_per_block'] = int(cfg.get('layers_per_block', 2))
    return cfg


def convert_stablesr_checkpoint(state_dict, unet_config=None):
    """``{model.diffusion_model.*, structcond_stage_model.*}`` -> the state dict of :class:`StableSRUNet`
    (``unet.*`` in diffusers names, ``encoder.*``). ``unet_config``: the UNet2DConditionModel config the file
    was trained with (default: SD-2.1-base, the published models'). Raises :class:`CheckpointError` for a file
    without these parts, or with a UNet key the conversion leaves unmapped (named)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_in = {k: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    encoder = {'encoder.' + k[len(ENCODER_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
    for part, keys, prefix in (('UNet', unet_in, UNET_PREFIX), ('time-aware encoder', encoder, ENCODER_PREFIX)):
        if not keys:
            raise CheckpointError(f'no {part} in the file (no key starts with {prefix!r}; it has e.g. '
                                  f'{next(iter(state_dict), None)!r}): not a StableSR checkpoint')
    unet = convert_ldm_unet_checkpoint(unet_in, _unet_config(unet_config or SD21_BASE_UNET))
    used = {id(v) for v in unet.values()}  # the UNet conversion renames only: each output is an input tensor
    unmapped = sorted(k for k, v in unet_in.items() if id(v) not in used)
    if unmapped:
        raise CheckpointError(f'{len(unmapped)} UNet key(s) of the file map onto no diffusers key, e.g. {unmapped[0]}: '
                              'the file is not a StableSR UNet of this configuration')
    return {**{'unet.' + k: v for k, v in unet.items()}, **encoder}


def convert_vae_checkpoint(state_dict, vae_config=None, prefix=VAE_PREFIX):
    """The SD VAE under ``prefix`` (``first_stage_model.``; '' for a bare VAE such as the CFW file) -> diffusers
    ``AutoencoderKL`` names."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae_in = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)
              and k[len(prefix):].split('.')[0] in ('encoder', 'decoder', 'quant_conv', 'post_quant_conv')}
    if not vae_in:
        raise CheckpointError(f'no VAE in the file (no key starts with {prefix + "encoder."!r})')
    return convert_ldm_vae_checkpoint(vae_in, dict(vae_config or SD21_VAE))


def check_schedule(state_dict, alphas_cumprod, atol=1e-5):
    """The file's ``alphas_cumprod`` (when it has one) must be the sampler's: a model sampled on another noise
    schedule than it was trained on gives garbage, not an error."""
    ours = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    theirs = state_dict.get('alphas_cumprod')
    if theirs is None or theirs.is_meta:
        return False
    theirs = theirs.detach().to('cpu', torch.float64)
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=atol, rtol=0):
        diff = 'length' if theirs.shape != ours.shape else f'max |Δ| {float((theirs - ours).abs().max()):.2e}'
        raise CheckpointError(f'the file\'s alphas_cumprod ({tuple(theirs.shape)}) is not the sampler\'s schedule '
                              f'({tuple(ours.shape)}, {diff}): StableSR uses scaled_linear betas 0.00085..0.012, '
                              'T=1000')
    return True


def check_state(net, state, where='the network'):
    """Strict key and shape check of ``state`` against ``net``: one :class:`CheckpointError` naming the first
    missing and unexpected key, or the first shape that differs."""
    from patchscaler.utils.checkpoint import state_differences
    missing, unexpected, shapes = state_differences(net.state_dict(), state)
    if missing or unexpected or shapes:
        parts = ([f'{len(missing)} missing, first {missing[0]}'] if missing else []) + \
                ([f'{len(unexpected)} unexpected, first {unexpected[0]}'] if unexpected else []) + \
                ([f'{len(shapes)} shape(s) differ (file vs network), first {shapes[0]}'] if shapes else [])
        raise CheckpointError(f'the converted file does not fit {where}: {"; ".join(parts)}')


def empty_prompt_embedding(sd_folder):
    """StableSR's fixed prompt: the OpenCLIP-H penultimate-layer embedding of '' (``FrozenOpenCLIPEmbedder``,
    layer "penultimate"), which an SD-2.x diffusers folder gives as its ``text_encoder``'s (23 layers: the last
    one dropped, then the final layer norm) ``last_hidden_state`` of the padded empty prompt: (1, 77, 1024).
    ``sd_folder``: a local SD-2.1(-base) folder with ``tokenizer/`` and ``text_encoder/``."""
    import os

    from patchscaler.utils.errors import MissingWeightsError
    for sub in ('tokenizer', 'text_encoder'):
        if not os.path.isdir(os.path.join(sd_folder, sub)):
            raise MissingWeightsError(f'{sd_folder}/{sub} not found: --text-encoder takes a local Stable Diffusion '
                                      '2.1 folder (diffusers layout) with tokenizer/ and text_encoder/')
    from transformers import CLIPTextModel, CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(sd_folder, subfolder='tokenizer', local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(sd_folder, subfolder='text_encoder', local_files_only=True).eval()
    ids = tokenizer([''], padding='max_length', max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors='pt').input_ids
    with torch.no_grad():
        return encoder(ids).last_hidden_state.float()


def _prompt(text_encoder, prompt_embedding, dim):
    """The fixed prompt from a text encoder folder, a given file, or zeros; (1, L, dim) checked."""
    if text_encoder is not None:
        prompt = empty_prompt_embedding(text_encoder)
    elif prompt_embedding is not None:
        from patchscaler.archs.stablesr_arch import _load_prompt
        prompt = _load_prompt(prompt_embedding, 77, dim)
    else:
        prompt = torch.zeros(1, 77, dim)
    if prompt.dim() != 3 or prompt.shape[-1] != dim:
        from patchscaler.utils.errors import ConfigError
        raise ConfigError(f'the prompt embedding is {tuple(prompt.shape)}, the UNet cross-attends to width {dim}: '
                          f'{text_encoder or prompt_embedding} is not an SD-2.x text encoder (OpenCLIP-H, 1024)')
    return prompt


def write_prompt(out, text_encoder=None, prompt_embedding=None, dim=1024):
    """Only the empty-prompt embedding, to ``out/prompt_embeds.safetensors`` (to train StableSR from SD-2.1's UNet
    without a StableSR checkpoint). Returns {'prompt': path}."""
    import os

    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, 'prompt_embeds.safetensors')
    save_file({'prompt_embeds': _prompt(text_encoder, prompt_embedding, dim).contiguous()}, path)
    return {'prompt': path}


def convert_cfw_checkpoint(state_dict, vae_config=None):
    """``vqgan_cfw_00011.ckpt``'s state dict -> (diffusers VAE state dict, CFW fusion layers' state dict)."""
    fusion = {k[len('decoder.'):]: v for k, v in state_dict.items() if k.startswith('decoder.fusion_layer_')}
    if not fusion:
        raise CheckpointError('no CFW fusion layers in the file (no key starts with decoder.fusion_layer_): not '
                              'vqgan_cfw_00011.ckpt')
    rest = {k: v for k, v in state_dict.items() if not k.startswith('decoder.fusion_layer_')}
    return convert_vae_checkpoint(rest, vae_config, prefix=''), fusion


def convert_stablesr_files(ckpt, out, cfw=None, text_encoder=None, prompt_embedding=None, zero_prompt=False,
                           unet_config=None, encoder_config=None, vae_config=None):
    """What ``tools/convert_stablesr.py`` does: read the published file(s) (``weights_only`` loading), convert,
    check every part strictly against the networks built on the meta device, and write to ``out``:
    ``net_g.pth`` (BasicSR ``{'params': ...}`` of :class:`StableSRUNet`), ``unet/config.json``, ``vae/`` (diffusers
    AutoencoderKL), ``prompt_embeds.safetensors`` and, with ``cfw``, ``cfw.safetensors``. Returns {name: path}.
    The configs default to the published ones (SD-2.1-base UNet and VAE, the published encoder); the tests
    convert tiny files."""
    import os

    from diffusers import AutoencoderKL, DDIMScheduler
    from safetensors.torch import save_file

    from patchscaler.archs.cfw_arch import CFWAutoencoderKL
    from patchscaler.archs.stablesr_arch import StableSRUNet
    from patchscaler.utils.checkpoint import atomic_save, safe_torch_load
    from patchscaler.utils.errors import ConfigError

    given = sum(x is not None and x is not False for x in (text_encoder, prompt_embedding, zero_prompt or None))
    if given != 1:
        raise ConfigError('give exactly one of --text-encoder (a local SD-2.1 folder: the published empty-prompt '
                          'embedding is computed from it), --prompt-embedding (a safetensors file with '
                          'prompt_embeds) or --zero-prompt (zeros: not what the published model was trained with)')
    cfg, vae_cfg = dict(unet_config or SD21_BASE_UNET), dict(vae_config or SD21_VAE)
    state = lightning_state_dict(safe_torch_load(ckpt))
    net_state = convert_stablesr_checkpoint(state, cfg)
    with torch.device('meta'):
        net = StableSRUNet(unet=cfg, encoder=encoder_config)
    check_state(net, net_state, where=f'StableSRUNet ({ckpt})')
    check_schedule(state, DDIMScheduler(**STABLESR_BETAS).alphas_cumprod)
    vae_state = convert_vae_checkpoint(state, vae_cfg)
    with torch.device('meta'):
        vae = AutoencoderKL(**vae_cfg)
    check_state(vae, vae_state, where=f'the VAE ({ckpt})')
    fusion = None
    if cfw is not None:
        cfw_vae, fusion = convert_cfw_checkpoint(lightning_state_dict(safe_torch_load(cfw)), vae_cfg)
        check_state(vae, cfw_vae, where=f'the VAE ({cfw})')
        with torch.device('meta'):
            cfw_net = CFWAutoencoderKL(config=vae_cfg)
        check_state(cfw_net.fusion, fusion, where=f'the CFW fusion layers ({cfw})')
        differs = [k for k in vae_state if not torch.equal(vae_state[k].float(), cfw_vae[k].float())]
        if differs:  # CFW was trained with the VAE frozen: both files should hold SD-2.1's
            from basicsr.utils import get_root_logger
            get_root_logger().warning(
                f'the VAE of {cfw} differs from the one of {ckpt} in {len(differs)} tensor(s) (e.g. {differs[0]}); '
                f'published StableSR encodes with the latter and decodes with the former. One VAE is written '
                f'(vae/, from {ckpt}): CFW decoding with it is not exactly the published one')
    prompt = _prompt(text_encoder, prompt_embedding, cfg['cross_attention_dim'])
    os.makedirs(os.path.join(out, 'unet'), exist_ok=True)
    paths = {'net_g': os.path.join(out, 'net_g.pth'), 'unet': os.path.join(out, 'unet'),
             'vae': os.path.join(out, 'vae'), 'prompt': os.path.join(out, 'prompt_embeds.safetensors')}
    atomic_save({'params': {k: v.contiguous() for k, v in net_state.items()}}, paths['net_g'])
    net.unet.save_config(paths['unet'])  # the architecture; the weights are net_g's
    vae = AutoencoderKL(**vae_cfg)
    vae.load_state_dict(vae_state, strict=True)
    vae.save_pretrained(paths['vae'], safe_serialization=True)
    save_file({'prompt_embeds': prompt.contiguous()}, paths['prompt'])
    if fusion is not None:
        paths['cfw'] = os.path.join(out, 'cfw.safetensors')
        save_file({k: v.contiguous() for k, v in fusion.items()}, paths['cfw'])
    return paths


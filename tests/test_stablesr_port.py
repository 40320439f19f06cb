"""The published StableSR, ported: the converter on a full-size key/shape fixture of the published checkpoint, and
numerical equivalence of the port against a from-the-math reference of the official forward
(tests/stablesr_reference.py), the respaced ancestral DDPM step, AdaIN and the CFW decoder."""
import json
import os

import pytest
import torch
from stablesr_reference import RefEncoderUNetModelWT, RefUNetDualcondV2, ref_randomize_, ref_stablesr_configs

from patchscaler.archs.stablesr_arch import StableSRUNet
from patchscaler.archs.stablesr_convert import (
    SD21_BASE_UNET,
    STABLESR_BETAS,
    check_schedule,
    check_state,
    convert_stablesr_checkpoint,
)
from patchscaler.utils.errors import CheckpointError

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, 'fixtures', 'stablesr_published_keys.json')
# the tiny reference configuration of stablesr_reference.py in diffusers' terms: widths 32/64/64, attention at the
# first two levels (heads = width / 16), two resnets per level, linear transformer projections
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[32, 64, 64],
                 down_block_types=['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
                 up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'], attention_head_dim=[2, 4, 4],
                 use_linear_projection=True, cross_attention_dim=32, norm_num_groups=32)
TINY_ENCODER = dict(model_channels=32, out_channels=32, channel_mult=[1, 2, 2], num_res_blocks=2,
                    attention_resolutions=[2, 1], num_heads=2)


def _alphas_cumprod():
    from diffusers import DDIMScheduler
    return DDIMScheduler(**STABLESR_BETAS).alphas_cumprod


def _fake_published():
    with open(FIXTURE) as f:
        keys = json.load(f)['keys']
    state = {k: torch.empty(shape, device='meta') for k, shape in keys.items()}
    state['alphas_cumprod'] = _alphas_cumprod()  # a schedule buffer of the Lightning file
    return state


def test_fixture_is_the_official_configuration():
    """The fixture's names and shapes are those of the official config (built by the reference on the meta device):
    22 SPADE resnets, an encoder of 52.5 M parameters, SD-2.1's UNet besides."""
    with open(FIXTURE) as f:
        keys = json.load(f)['keys']
    cfg = ref_stablesr_configs('full')
    with torch.device('meta'):
        unet, enc = RefUNetDualcondV2(**cfg['unet']), RefEncoderUNetModelWT(**cfg['encoder'])
    expected = {**{'model.diffusion_model.' + k: list(v.shape) for k, v in unet.state_dict().items()},
                **{'structcond_stage_model.' + k: list(v.shape) for k, v in enc.state_dict().items()}}
    assert keys == expected
    assert len({k.split('.spade.')[0] for k in keys if '.spade.' in k}) == 22
    n_enc = sum(torch.Size(s).numel() for k, s in keys.items() if k.startswith('structcond_stage_model.'))
    assert round(n_enc / 1e6, 1) == 52.5


def test_full_size_fake_checkpoint_converts_and_loads_strict_on_meta():
    state = _fake_published()
    converted = convert_stablesr_checkpoint(state)
    assert check_schedule(state, _alphas_cumprod())
    with torch.device('meta'):
        net = StableSRUNet(unet=SD21_BASE_UNET)
    assert net.num_spade == 22
    check_state(net, converted, where='StableSRUNet')
    net.load_state_dict(converted, strict=True, assign=True)
    assert set(net.state_dict()) == set(converted) and len(converted) == len(state) - 1  # every tensor, once


def test_a_checkpoint_that_does_not_match_is_one_error_naming_the_key():
    state = _fake_published()
    with torch.device('meta'):
        net = StableSRUNet(unet=SD21_BASE_UNET)
    dropped = 'model.diffusion_model.input_blocks.1.0.spade.mlp_gamma.weight'
    del state[dropped]
    first = r'missing, first unet\.down_blocks\.0\.resnets\.0\.spade\.mlp_gamma\.weight'
    with pytest.raises(CheckpointError, match=first):
        check_state(net, convert_stablesr_checkpoint(state))
    state = _fake_published()
    state['model.diffusion_model.input_blocks.1.7.extra'] = torch.empty(3, device='meta')
    with pytest.raises(CheckpointError, match=r'input_blocks\.1\.7\.extra'):
        convert_stablesr_checkpoint(state)  # a key diffusers' conversion drops silently is named
    with pytest.raises(CheckpointError, match='no UNet'):
        convert_stablesr_checkpoint({'first_stage_model.encoder.conv_in.weight': torch.zeros(1)})
    state = _fake_published()
    state['alphas_cumprod'] = state['alphas_cumprod'] * 0.99
    with pytest.raises(CheckpointError, match='alphas_cumprod'):
        check_schedule(state, _alphas_cumprod())


def _tiny_pair(seed=0):
    cfg = ref_stablesr_configs('tiny')
    ref_unet = ref_randomize_(RefUNetDualcondV2(**cfg['unet']), seed).eval()
    ref_enc = ref_randomize_(RefEncoderUNetModelWT(**cfg['encoder']), seed + 1).eval()
    ldm = {**{'model.diffusion_model.' + k: v for k, v in ref_unet.state_dict().items()},
           **{'structcond_stage_model.' + k: v for k, v in ref_enc.state_dict().items()}}
    net = StableSRUNet(unet=TINY_UNET, encoder=TINY_ENCODER).eval()
    converted = convert_stablesr_checkpoint(ldm, TINY_UNET)
    check_state(net, converted)
    net.load_state_dict(converted, strict=True)
    return ref_unet, ref_enc, net


@torch.no_grad()
def test_port_equals_the_official_forward_at_tiny_size():
    """Random non-zero weights everywhere, converted by the real converter: the port's ε equals the reference's
    UNetModelDualcondV2(x, t, context, EncoderUNetModelWT(y_lr, t)) to float tolerance, and its encoder's
    features equal the reference's at every width."""
    ref_unet, ref_enc, net = _tiny_pair()
    g = torch.Generator().manual_seed(0)
    x, y_lr = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([999, 53])
    context = torch.randn(1, 3, 32, generator=g)
    net.prompt = context
    feats, ref_feats = net.encoder(y_lr, t), ref_enc(y_lr, t)
    assert sorted(feats) == sorted(ref_feats) == ['16', '4', '8']
    for k in feats:
        torch.testing.assert_close(feats[k], ref_feats[k], rtol=1e-4, atol=1e-5)
    ours = net(x, t, {'y_lr': y_lr})
    theirs = ref_unet(x, t, context.expand(2, -1, -1), ref_feats)
    assert theirs.abs().mean() > 0.05  # a non-trivial output
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_respaced_timesteps_are_stablesrs():
    from patchscaler.sampling.schedules import respaced_timesteps
    ts = respaced_timesteps(1000, 20)
    assert ts[:3] == [999, 946, 894] and ts[-2:] == [53, 0] and len(ts) == 20
    assert respaced_timesteps(1000, 4) == [999, 666, 333, 0]  # turbo
    assert respaced_timesteps(400, 8)[0] == 399 and respaced_timesteps(400, 8)[-1] == 0


def test_ddim_eta_1_on_respaced_timesteps_is_the_published_ddpm_posterior():
    """LatentDiffusion's respaced chain (betas 1 - ᾱ_t / ᾱ_prev over the kept timesteps): posterior mean
    coef1·x0 + coef2·x_t and variance β·(1 - ᾱ_prev)/(1 - ᾱ_t), noise-free at the last step; the sampler's DDIM
    step with η = 1 is that, for every respaced step."""
    from patchscaler.sampling.schedules import ddim_step, respaced_timesteps
    a = _alphas_cumprod().double()
    ts = respaced_timesteps(1000, 20)
    g = torch.Generator().manual_seed(0)
    x_t, eps, z = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for i, t in enumerate(ts):
        a_t = float(a[t])
        a_prev = float(a[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        beta = 1 - a_t / a_prev
        x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        mean = beta * a_prev ** 0.5 / (1 - a_t) * x0 + (1 - a_prev) * (1 - beta) ** 0.5 / (1 - a_t) * x_t
        var = beta * (1 - a_prev) / (1 - a_t)
        expected = mean + var ** 0.5 * z
        got = ddim_step(eps, x_t, a_t, a_prev, 'epsilon', eta=1.0, noise=z)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert var == 0  # t = 0: the posterior mean, x0, without noise


def test_sampler_walks_respaced_timesteps_with_eta_1():
    from patchscaler.sampling import build_sampler
    s = build_sampler(dict(type='PatchGroupSampler', patch_size=8, groups=[{'tau': 1000, 'steps': 20},
                                                                            {'timesteps': [500, 250, 0]}],
                           grouping={'mode': 'share', 'shares': [0.5, 0.5]}, timestep_spacing='respaced', eta=1.0,
                           scheduler=dict(type='DDIMScheduler', **STABLESR_BETAS), prediction_type='epsilon'))
    assert s.timesteps[0][:2] == [999, 946] and s.timesteps[1] == [500, 250, 0] and s.groups[1] == (501, 3)
    from patchscaler.utils.errors import ConfigError
    with pytest.raises(ConfigError, match='timestep_spacing'):
        build_sampler(dict(type='PatchGroupSampler', timestep_spacing='leading'))
    with pytest.raises(ConfigError, match='distinct integers'):
        build_sampler(dict(type='PatchGroupSampler', groups=[{'timesteps': [10, 10]}]))


def test_adain_is_the_published_formula():
    """StableSR's adaptive_instance_normalization on [-1, 1] images (unbiased var + 1e-5), in [0, 1] here."""
    from patchscaler.utils.color_fix import adain_color_fix, color_fix_kind
    g = torch.Generator().manual_seed(0)
    sr, ref = torch.rand(2, 3, 12, 10, generator=g), torch.rand(2, 3, 12, 10, generator=g) * 0.5
    a, b = sr * 2 - 1, ref * 2 - 1

    def stats(x):
        flat = x.reshape(2, 3, -1)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + 1e-5).sqrt()[..., None, None]
    (ma, sa), (mb, sb) = stats(a), stats(b)
    torch.testing.assert_close(adain_color_fix(sr, ref), ((a - ma) / sa * sb + mb + 1) / 2)
    assert color_fix_kind(True) == 'wavelet' and color_fix_kind('adain') == 'adain' and color_fix_kind(False) is None


TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 32, 64, 64],
                down_block_types=['DownEncoderBlock2D'] * 4, up_block_types=['UpDecoderBlock2D'] * 4,
                layers_per_block=1, norm_num_groups=32)


@torch.no_grad()
def test_cfw_decoder_at_dec_w_0_is_the_plain_decoder_and_its_fusion_is_published():
    """dec_w = 0 gives exactly the SD decoder; dec_w > 0 adds w·C(concat(F_e, F_d)) at decoder levels 1 and 2
    (reference: the plain decoder's manual walk with the fusion written out from Decoder_Mix's math)."""
    from patchscaler.archs.autoencoder_arch import DiffusersAutoencoderKL
    from patchscaler.archs.cfw_arch import CFWAutoencoderKL
    torch.manual_seed(0)
    cfw = CFWAutoencoderKL(config=TINY_VAE, dec_w=0.0)
    ref_randomize_(cfw.fusion, 3, std=0.02)
    plain = DiffusersAutoencoderKL(config=TINY_VAE)
    plain.vae.load_state_dict(cfw.vae.state_dict())
    lr = torch.rand(1, 3, 64, 64)
    z = cfw.encode(lr)
    assert torch.equal(cfw.decode(z, lr), plain.decode(z))
    cfw.dec_w = 0.5
    fused = cfw.decode(z, lr)
    # the reference: encoder features of 2·lr - 1 after levels 1 and 2 (before their downsamplers), decoder walk
    vae, sums = plain.vae, {}
    h = vae.encoder.conv_in(lr * 2 - 1)
    for i, block in enumerate(vae.encoder.down_blocks):
        for r in block.resnets:
            h = r(h, None)
        sums[i] = h
        h = block.downsamplers[0](h) if block.downsamplers else h
    d = vae.decoder
    h = d.mid_block(d.conv_in(vae.post_quant_conv(z / cfw.scaling_factor)), None)
    for k, up in enumerate(d.up_blocks):
        level = 3 - k
        for r in up.resnets:
            h = r(h, None)
        if level in (1, 2):
            h = _ref_fuse(cfw.fusion.state_dict(), f'fusion_layer_{level}.', sums[level], h, 0.5)
        h = up.upsamplers[0](h) if up.upsamplers else h
    expected = (d.conv_out(d.conv_act(d.conv_norm_out(h))) + 1) / 2
    torch.testing.assert_close(fused, expected)
    assert (fused - plain.decode(z)).abs().max() > 1e-3


def _published_fusion_keys(widths=(128, 256, 512, 512), grow=32, num_block=2):
    """Names and shapes of the published CFW fusion layers (``Decoder_Mix``: ``fusion_layer_{i}`` =
    ``Fuse_sft_block_RRDB(C_i)`` at every decoder level but the first and last; its ``ResBlock(2C, C)``, two RRDBs of
    three 5-conv dense blocks, ``ResBlock(C, C)``), from the official code's structure: a fixture in code."""
    keys = {}

    def res(p, cin, cout):
        keys.update({p + 'norm1.weight': (cin,), p + 'norm1.bias': (cin,), p + 'conv1.weight': (cout, cin, 3, 3),
                     p + 'conv1.bias': (cout,), p + 'norm2.weight': (cout,), p + 'norm2.bias': (cout,),
                     p + 'conv2.weight': (cout, cout, 3, 3), p + 'conv2.bias': (cout,)})
        if cin != cout:
            keys.update({p + 'conv_out.weight': (cout, cin, 1, 1), p + 'conv_out.bias': (cout,)})
    for level in range(1, len(widths) - 1):
        c, p = widths[level], f'fusion_layer_{level}.'
        res(p + 'encode_enc_1.', 2 * c, c)
        for b in range(num_block):
            for r in (1, 2, 3):
                for k in range(1, 6):
                    out = c if k == 5 else grow
                    q = f'{p}encode_enc_2.{b}.rdb{r}.conv{k}.'
                    keys.update({q + 'weight': (out, c + (k - 1) * grow, 3, 3), q + 'bias': (out,)})
        res(p + 'encode_enc_3.', c, c)
    return keys


def _ref_fuse(sd, p, enc, dec, w):
    """Fuse_sft_block_RRDB from its math, on a state dict of the published names: dec + w·C(concat(enc, dec))."""
    import torch.nn.functional as F

    def conv(x, q, pad=1):
        return F.conv2d(x, sd[q + 'weight'], sd[q + 'bias'], padding=pad)

    def res(x, q):
        h = conv(F.silu(F.group_norm(x, 32, sd[q + 'norm1.weight'], sd[q + 'norm1.bias'], 1e-6)), q + 'conv1.')
        h = conv(F.silu(F.group_norm(h, 32, sd[q + 'norm2.weight'], sd[q + 'norm2.bias'], 1e-6)), q + 'conv2.')
        return h + (conv(x, q + 'conv_out.', 0) if q + 'conv_out.weight' in sd else x)

    def rdb(x, q):  # residual dense block: 4 LReLU(0.2) convs on the running concatenation, a 5th, ×0.2 + x
        feats = [x]
        for k in range(1, 5):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1), f'{q}conv{k}.'), 0.2))
        return conv(torch.cat(feats, 1), f'{q}conv5.') * 0.2 + x

    h = res(torch.cat([enc, dec], 1), p + 'encode_enc_1.')
    for b in (0, 1):
        q = f'{p}encode_enc_2.{b}.'
        h = rdb(rdb(rdb(h, q + 'rdb1.'), q + 'rdb2.'), q + 'rdb3.') * 0.2 + h
    return dec + w * res(h, p + 'encode_enc_3.')


def test_cfw_fusion_layers_have_the_published_names_and_shapes():
    from patchscaler.archs.cfw_arch import CFWAutoencoderKL
    from patchscaler.archs.stablesr_convert import SD21_VAE, convert_cfw_checkpoint
    with torch.device('meta'):
        cfw = CFWAutoencoderKL(config=SD21_VAE)
    ours = {k: tuple(v.shape) for k, v in cfw.fusion.state_dict().items()}
    assert ours == _published_fusion_keys()
    fake = {'decoder.' + k: torch.empty(s, device='meta') for k, s in _published_fusion_keys().items()}
    with pytest.raises(CheckpointError, match='no VAE'):  # fusion layers alone are not the CFW file
        convert_cfw_checkpoint(fake)


def _ldm_vae_names(vae):
    """The ldm (first_stage_model) names of a diffusers AutoencoderKL's state dict, reshaping the mid attention's
    linear weights back to 1×1 convolutions: the layout of the published files' VAE."""
    import re
    levels = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        n = k.replace('conv_norm_out', 'norm_out').replace('conv_shortcut', 'nin_shortcut')
        n = re.sub(r'encoder\.down_blocks\.(\d+)\.resnets\.(\d+)', r'encoder.down.\1.block.\2', n)
        n = re.sub(r'encoder\.down_blocks\.(\d+)\.downsamplers\.0', r'encoder.down.\1.downsample', n)
        n = re.sub(r'decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)',
                   lambda m: f'decoder.up.{levels - 1 - int(m[1])}.' +
                   (f'block.{m[3]}' if m[2] == 'resnets' else 'upsample'), n)
        n = re.sub(r'mid_block\.resnets\.(\d+)', lambda m: f'mid.block_{int(m[1]) + 1}', n)
        n = n.replace('mid_block.attentions.0.group_norm', 'mid.attn_1.norm')
        n = n.replace('mid_block.attentions.0', 'mid.attn_1')
        n = n.replace('to_q', 'q').replace('to_k', 'k').replace('to_v', 'v').replace('to_out.0', 'proj_out')
        if '.attn_1.' in n and n.endswith('weight') and v.dim() == 2:
            v = v[:, :, None, None]
        out[n] = v
    return out


def _tiny_published_files(tmp_path):
    """A tiny stand-in of stablesr_000117.ckpt and vqgan_cfw_00011.ckpt: real Lightning layouts, random weights."""
    from diffusers import AutoencoderKL

    from patchscaler.archs.cfw_arch import CFWAutoencoderKL
    cfg = ref_stablesr_configs('tiny')
    unet = ref_randomize_(RefUNetDualcondV2(**cfg['unet']), 0)
    enc = ref_randomize_(RefEncoderUNetModelWT(**cfg['encoder']), 1)
    torch.manual_seed(0)
    vae = ldm_vae = _ldm_vae_names(AutoencoderKL(**TINY_VAE))
    state = {**{'model.diffusion_model.' + k: v for k, v in unet.state_dict().items()},
             **{'structcond_stage_model.' + k: v for k, v in enc.state_dict().items()},
             **{'first_stage_model.' + k: v for k, v in vae.items()},
             'cond_stage_model.model.positional_embedding': torch.zeros(77, 32), 'alphas_cumprod': _alphas_cumprod()}
    torch.save({'state_dict': state, 'global_step': 117000}, tmp_path / 'stablesr.ckpt')
    fusion = ref_randomize_(CFWAutoencoderKL(config=TINY_VAE).fusion, 2, std=0.02).state_dict()
    cfw = {**ldm_vae, **{'decoder.' + k: v for k, v in fusion.items()}, 'loss.logvar': torch.zeros(())}
    torch.save({'state_dict': cfw}, tmp_path / 'cfw.ckpt')
    return unet, enc


def test_converted_files_run_through_infer_for_stablesr_and_stablesr_pgs(tmp_path):
    """The converter writes what the option files read; tools/infer.py then runs the UNet (with and without a GRM);
    a non-strict load that would load nothing refuses."""
    import yaml

    from patchscaler.archs.stablesr_convert import convert_stablesr_files
    from patchscaler.inference import load_pipeline, run
    from patchscaler.utils.checkpoint import load_weights
    _tiny_published_files(tmp_path)
    paths = convert_stablesr_files(str(tmp_path / 'stablesr.ckpt'), str(tmp_path / 'w'), cfw=str(tmp_path / 'cfw.ckpt'),
                                   zero_prompt=True, unet_config=TINY_UNET, encoder_config=TINY_ENCODER,
                                   vae_config=TINY_VAE)
    assert set(paths) == {'net_g', 'unet', 'vae', 'prompt', 'cfw'}
    with open(os.path.join(HERE, '..', 'options', 'stablesr', 'test_stablesr_pgs_x4.yml')) as f:
        opt = yaml.safe_load(f)
    w = str(tmp_path / 'w')
    opt['autoencoder'].update(pretrained_path=f'{w}/vae', cfw_path=f'{w}/cfw.safetensors')
    opt['network_g'].update(unet_path=f'{w}/unet', prompt_embedding_path=f'{w}/prompt_embeds.safetensors',
                            patch_size=16, encoder=TINY_ENCODER)
    opt['sampler'].update(patch_size=16, stride=8, batch_size=8)
    opt['network_grm'] = dict(type='GRM', in_channels=4, num_feat=16, body='rrdb', num_blocks=1)
    from basicsr.archs import build_network
    grm = build_network(dict(opt['network_grm']))
    torch.save({'params_ema': grm.state_dict()}, tmp_path / 'grm.pth')
    opt['path'] = {'pretrain_network_g': paths['net_g'], 'param_key_g': 'params',
                   'pretrain_network_grm': str(tmp_path / 'grm.pth')}
    opt['tile'] = None
    from conftest import random_bgr, write_png
    write_png(tmp_path / 'in' / 'a.png', random_bgr(24, 20))
    pgs = run(dict(opt), [str(tmp_path / 'in')], str(tmp_path / 'out_pgs'), device='cpu', progress=False)
    plain_opt = {k: v for k, v in opt.items() if k != 'network_grm'}
    plain_opt['sampler'] = dict(opt['sampler'], groups=[{'tau': 1000, 'steps': 4}])
    plain_opt['sampler'].pop('grouping')
    plain_opt['path'] = {k: v for k, v in opt['path'].items() if 'grm' not in k}
    pipe = load_pipeline(dict(plain_opt), device='cpu')
    out = pipe(torch.rand(1, 3, 24, 20), return_grm=False)
    assert out.report is not None and out.report.nfe_total > 0 and out.sr.shape == (1, 3, 96, 80)
    assert pgs.failures == [] and pgs.nfe > 0 and os.path.isfile(tmp_path / 'out_pgs' / 'a.png')
    net = build_network(dict(opt['network_g']))
    with pytest.raises(CheckpointError, match='would load nothing'):
        load_weights(net, str(tmp_path / 'grm.pth'), 'params_ema', strict=False)


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    import sys
    sys.path.insert(0, os.path.join(HERE, '..', 'tools'))
    import convert_stablesr
    with pytest.raises(SystemExit, match='checkpoint not found: .*nowhere.ckpt'):
        convert_stablesr.main(['-i', str(tmp_path / 'nowhere.ckpt'), '-o', str(tmp_path / 'o'), '--zero-prompt'])
    with pytest.raises(SystemExit, match='exactly one of --text-encoder'):
        convert_stablesr.main(['-i', str(tmp_path / 'nowhere.ckpt'), '-o', str(tmp_path / 'o')])
    torch.save({'state_dict': {'first_stage_model.encoder.conv_in.weight': torch.zeros(1)}}, tmp_path / 'vae.ckpt')
    with pytest.raises(SystemExit, match='no UNet in the file'):
        convert_stablesr.main(['-i', str(tmp_path / 'vae.ckpt'), '-o', str(tmp_path / 'o'), '--zero-prompt'])
    from safetensors.torch import save_file  # without -i: only the prompt, its width checked
    save_file({'prompt_embeds': torch.randn(1, 77, 1024)}, str(tmp_path / 'p.safetensors'))
    convert_stablesr.main(['-o', str(tmp_path / 'p'), '--prompt-embedding', str(tmp_path / 'p.safetensors')])
    assert os.path.isfile(tmp_path / 'p' / 'prompt_embeds.safetensors')
    save_file({'prompt_embeds': torch.randn(1, 77, 768)}, str(tmp_path / 'sd1.safetensors'))
    with pytest.raises(SystemExit, match='1024'):
        convert_stablesr.main(['-o', str(tmp_path / 'p'), '--prompt-embedding', str(tmp_path / 'sd1.safetensors')])

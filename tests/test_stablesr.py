"""StableSR baseline: the published architecture (UNet with SPADE + time-aware encoder) at demo size, its training
targets, the model's training/checkpoints, and StableSR vs StableSR+PGS through the same sampler, built from the demo
YAML. The port against the published model: tests/test_stablesr_port.py."""
import os

import pytest
import torch
import yaml
from basicsr.archs import build_network

from patchscaler.archs.stablesr_arch import StableSRUNet
from patchscaler.models.stablesr_model import StableSRModel
from patchscaler.sampling.schedules import q_sample, to_x0_eps, training_target
from patchscaler.utils.errors import ConfigError, MissingWeightsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_UNET = dict(sample_size=8, in_channels=12, out_channels=12, block_out_channels=[16, 32], layers_per_block=1,
                 down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D'],
                 up_block_types=['CrossAttnUpBlock2D', 'UpBlock2D'], cross_attention_dim=16, attention_head_dim=4,
                 norm_num_groups=8)
TINY_ENCODER = dict(model_channels=32, out_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                    attention_resolutions=[2], num_heads=2)


def _yaml(name):
    with open(os.path.join(ROOT, 'options', 'stablesr', 'demo', name)) as f:
        return yaml.safe_load(f)


def _tiny_net(**kw):
    return build_network(dict(type='StableSRUNet', unet=dict(TINY_UNET), encoder=dict(TINY_ENCODER), **kw))


def test_demo_arch_builds_from_yaml_and_keeps_shapes():
    net = build_network(dict(_yaml('train_stablesr_demo.yml')['network_g']))
    assert isinstance(net, StableSRUNet) and net.patch_size == 16 and net.prediction_type == 'v_prediction'
    assert net.num_spade == 8  # every resnet: 2 down, 2 mid, 4 up
    spades = [n for n, _ in net.named_modules() if n.endswith('.spade')]
    assert len(spades) == 8 and len(list(net.parameters())) == len(net.state_dict())  # each registered once
    x = torch.randn(2, 48, 16, 16)
    assert net(x, torch.tensor([3, 900]), {'y_lr': torch.randn_like(x)}).shape == x.shape


def test_spade_conditions_every_level_on_the_lr_latent():
    """Another LR latent gives another output; the features are not kept between calls; old options are refused."""
    torch.manual_seed(0)
    net = _tiny_net().eval()
    x, t = torch.randn(2, 12, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        a, b = net(x, t, {'y_lr': torch.randn_like(x)}), net(x, t, {'y_lr': torch.randn_like(x)})
    assert (a - b).abs().mean() > 1e-4
    from patchscaler.archs.stablesr_arch import _FEATURES
    assert _FEATURES.get() is None  # nothing held between calls
    with pytest.raises(ConfigError, match='encoder_channels belonged to the former'):
        build_network(dict(type='StableSRUNet', unet=dict(TINY_UNET), encoder_channels=[8, 16]))
    with pytest.raises(ConfigError, match='one entry per UNet level'):
        _tiny_net_enc(channel_mult=[1, 2, 2])
    with pytest.raises(ConfigError, match='num_heads=3'):
        _tiny_net_enc(num_heads=3)
    with pytest.raises(ConfigError, match=r"no option\(s\) \['heads'\]"):
        _tiny_net_enc(heads=2)
    net.unet.enable_gradient_checkpointing()
    with pytest.raises(ConfigError, match='gradient checkpointing'):
        net(x, t, {'y_lr': x})


def _tiny_net_enc(**enc):
    return build_network(dict(type='StableSRUNet', unet=dict(TINY_UNET), encoder=dict(TINY_ENCODER, **enc)))


def test_loads_a_local_unet_folder_and_names_missing_files(tmp_path):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    unet.save_pretrained(tmp_path / 'unet')
    net = build_network(dict(type='StableSRUNet', unet_path=str(tmp_path / 'unet'), encoder=dict(TINY_ENCODER)))
    assert torch.equal(net.unet.conv_in.weight, unet.conv_in.weight) and net.prompt.shape == (1, 77, 16)
    with pytest.raises(MissingWeightsError, match='nowhere/config.json'):
        StableSRUNet(unet_path=str(tmp_path / 'nowhere'))
    with pytest.raises(MissingWeightsError, match='empty.safetensors'):
        _tiny_net(prompt_embedding_path=str(tmp_path / 'empty.safetensors'))
    from safetensors.torch import save_file
    save_file({'prompt_embeds': torch.randn(1, 5, 16)}, str(tmp_path / 'p.safetensors'))
    assert _tiny_net(prompt_embedding_path=str(tmp_path / 'p.safetensors')).prompt.shape == (1, 5, 16)
    with pytest.raises(ConfigError, match='multiple of 2'):
        _tiny_net(patch_size=7)


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction', 'sample'])
def test_training_target_inverts_to_x0(prediction_type):
    """A denoiser that outputs the training target exactly gives back x0 through the sampler's conversion, and
    v is diffusers' velocity: sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 400, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = training_target(x0, eps, a, prediction_type)
    x_t = q_sample(x0, eps, a)
    x0_hat, eps_hat = to_x0_eps(target, x_t, a, prediction_type)
    assert torch.allclose(x0_hat, x0, atol=1e-4) and torch.allclose(eps_hat, eps, atol=1e-2)
    if prediction_type == 'v_prediction':
        assert torch.allclose(target, sched.get_velocity(x0, eps, t), atol=1e-5)


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
def test_stablesr_sampler_follows_ddim_from_the_noised_lr_latent(prediction_type):
    """StableSR's sampler (SD schedule, one group from T, 20 ancestral steps on the respaced timesteps, overlapping
    tiles fused at every step) with a denoiser that outputs the exact ε / v of a known x0: the first call sees
    sqrt(ᾱ_999)·y0 + sqrt(1-ᾱ_999)·n (y0 = the LR latent, n the sampler's seeded noise), the calls walk
    999, 946, …, 53, 0 with all tiles at each, and the result is x0."""
    from patchscaler.models.stablesr_model import stablesr_sampler_options
    from patchscaler.sampling import build_sampler
    from patchscaler.sampling.patches import PatchGrid
    sampler = build_sampler(dict(stablesr_sampler_options(8, prediction_type), stride=4))
    assert sampler.eta == 1 and sampler.fuse_overlaps and sampler.timestep_spacing == 'respaced'
    a_bar = sampler.scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0, y0 = torch.randn(1, 12, 24, 20, generator=g) * 0.5, torch.randn(1, 12, 24, 20, generator=g) * 0.5
    grid = PatchGrid.for_shape(24, 20, 8, 4)
    y0_p = grid.patchify(y0).flatten(0, 1)
    n_p = grid.patchify(torch.randn(1, 12, 24, 20, generator=torch.Generator().manual_seed(0))).flatten(0, 1)
    calls = []

    def oracle(x_t, t, cond):
        calls.append((x_t.clone(), int(t[0])))
        a = a_bar[t].view(-1, 1, 1, 1).to(x_t)
        return training_target(cond['x0'], (x_t - a.sqrt() * cond['x0']) / (1 - a).sqrt(), a, prediction_type)
    out, report = sampler.sample(oracle, y0, None, cond={'x0': x0}, seed=0)
    from patchscaler.sampling.schedules import ddim_step, respaced_timesteps, step_noise
    ts = respaced_timesteps(1000, 20)
    assert [t for _, t in calls] == ts  # one batch of all patches per step
    a = a_bar[999]
    assert torch.allclose(calls[0][0], a.sqrt() * y0_p + (1 - a).sqrt() * n_p, atol=1e-5)
    # every later x_t: the ancestral (η = 1) step of the exact x0 from the previous x_t, with that step's noise
    x = a.sqrt() * y0 + (1 - a).sqrt() * torch.randn(1, 12, 24, 20, generator=torch.Generator().manual_seed(0))
    for i, (x_t, t) in enumerate(calls):
        assert torch.allclose(x_t, grid.patchify(x).flatten(0, 1), atol=1e-4), t
        a_t, a_prev = a_bar[t], (a_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0))
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = ddim_step(eps, x, float(a_t), float(a_prev), 'epsilon', 1.0, step_noise(0, t, x.shape))
    assert torch.allclose(out, x0, atol=1e-5) and report.nfe_total == 20 * report.num_patches


def test_freeze_unet_trains_only_the_encoder_and_spade(tmp_path):
    """StableSR keeps SD's UNet fixed: with train.freeze_unet only the time-aware encoder and SPADE layers move."""
    torch.manual_seed(0)
    opt = _opt('train_stablesr_demo.yml', tmp_path, True)
    opt['train']['freeze_unet'] = True
    model = StableSRModel(opt)
    net = model.net_g
    spade = {n for n, _ in net.named_parameters() if '.spade.' in n}
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for it in (1, 2):
        model.feed_data(_batch(it))
        model.optimize_parameters(it)
    moved = {n for n, p in net.named_parameters() if not torch.equal(before[n], p)}
    assert moved and all(n.startswith('encoder.') or n in spade for n in moved)
    assert any(n.startswith('encoder.') for n in moved) and moved & spade
    trained = {id(p) for g in model.optimizer_g.param_groups for p in g['params']}
    assert trained == {id(p) for n, p in net.named_parameters() if n.startswith('encoder.') or n in spade}


def _opt(name, tmp_path, is_train, **extra):
    opt = _yaml(name)
    opt.update(is_train=is_train, dist=False, rank=0, world_size=1, num_gpu=0, **extra)
    opt['autoencoder'] = {'type': 'PixelUnshuffleAutoencoder', 'downscale': 2}
    opt['network_g'] = dict(type='StableSRUNet', unet=dict(TINY_UNET), encoder=dict(TINY_ENCODER), patch_size=8,
                            prediction_type=opt['network_g']['prediction_type'])
    opt['sampler'] = dict(opt['sampler'], patch_size=8, stride=4)
    opt['path'] = dict(opt['path'], models=str(tmp_path / 'models'), training_states=str(tmp_path / 'states'),
                       experiments_root=str(tmp_path), visualization=str(tmp_path / 'vis'))
    (tmp_path / 'models').mkdir(exist_ok=True)
    if 'train' in opt:
        opt['train'] = dict(opt['train'], gt_size=16, patches_per_image=2, total_iter=3)
    return opt


def _batch(seed=0, size=16):
    gt = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return {'lq': torch.nn.functional.interpolate(gt, scale_factor=0.25, mode='area'), 'gt': gt}


@pytest.mark.parametrize('prediction_type', ['v_prediction', 'epsilon'])
def test_trains_its_prediction_type_on_the_samplers_schedule_and_checkpoints(tmp_path, monkeypatch, prediction_type):
    """The loss is MSE(net(x_t, t, y_LR tile), target) with x_t from Eq. 4 on the sampler's ᾱ and the target of
    the network's prediction type (v or ε)."""
    torch.manual_seed(0)
    opt = _opt('train_stablesr_demo.yml', tmp_path, True)
    opt['network_g']['prediction_type'] = opt['sampler']['prediction_type'] = prediction_type
    model = StableSRModel(opt)
    assert torch.equal(model.alphas_cumprod, model.sampler.scheduler.alphas_cumprod.float())
    seen, noise = {}, {}
    real = model.net_g.forward

    def spy(x_t, t, cond):
        seen.update(x_t=x_t, t=t, y_lr=cond['y_lr'], out=real(x_t, t, cond))
        return seen['out']
    monkeypatch.setattr(model.net_g, 'forward', spy)
    real_randn_like = torch.randn_like
    monkeypatch.setattr(torch, 'randn_like', lambda x: noise.setdefault('eps', real_randn_like(x)))
    x0, y_lr = torch.randn(4, 12, 8, 8), torch.randn(4, 12, 8, 8)
    monkeypatch.setattr('patchscaler.models.stablesr_model.random_patches', lambda ts, v, n: [x0, y_lr])
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    model.feed_data(_batch())
    model.optimize_parameters(1)
    a = model.alphas_cumprod[seen['t']].view(-1, 1, 1, 1)
    assert torch.allclose(seen['x_t'], a.sqrt() * x0 + (1 - a).sqrt() * noise['eps'], atol=1e-6)
    assert torch.equal(seen['y_lr'], y_lr)
    target = noise['eps'] if prediction_type == 'epsilon' else a.sqrt() * noise['eps'] - (1 - a).sqrt() * x0
    expected = torch.nn.functional.mse_loss(seen['out'].detach(), target)
    assert abs(model.get_current_log()['l_pix'] - expected.item()) < 1e-5
    assert any(not torch.equal(before[k], v) for k, v in model.net_g.state_dict().items())
    model.save(0, 1)
    ckpt = torch.load(tmp_path / 'models' / 'net_g_1.pth', weights_only=True)
    assert set(ckpt) == {'params', 'params_ema'}
    assert ckpt['params'].keys() == model.net_g.state_dict().keys()


def test_stablesr_and_stablesr_pgs_share_weights_and_sampler_code(tmp_path):
    """StableSR: one group from T, 20 steps on every tile from the noised LR latent. StableSR+PGS: the same
    weights file and the same sampler class, only a GRM and three groups in the options — fewer NFE."""
    torch.manual_seed(0)
    trained = StableSRModel(_opt('train_stablesr_demo.yml', tmp_path, True))
    trained.save(0, 1)
    grm = build_network({'type': 'GRM', 'in_channels': 12, 'num_feat': 8, 'body': 'rrdb', 'num_blocks': 1,
                         'num_grow_ch': 4})
    torch.save({'params': grm.state_dict()}, tmp_path / 'grm.pth')
    weights = {'pretrain_network_g': str(tmp_path / 'models' / 'net_g_1.pth')}
    uni = StableSRModel(_opt('test_stablesr_demo.yml', tmp_path, False, path=weights))
    pgs_opt = _opt('test_stablesr_pgs_demo.yml', tmp_path, False,
                   path=dict(weights, pretrain_network_grm=str(tmp_path / 'grm.pth')))
    pgs_opt['network_grm'] = {'type': 'GRM', 'in_channels': 12, 'num_feat': 8, 'body': 'rrdb', 'num_blocks': 1,
                              'num_grow_ch': 4}
    pgs = StableSRModel(pgs_opt)
    assert type(uni.sampler) is type(pgs.sampler)
    assert (uni.method_name, pgs.method_name) == ('StableSR', 'StableSR+PGS')
    for a, b in zip(uni.net_g.state_dict().values(), pgs.net_g.state_dict().values()):
        assert torch.equal(a, b)
    batch = _batch(1, size=32)
    for model in (uni, pgs):
        model.feed_data(batch)
        model.test()
        assert model.output.shape == (2, 3, 32, 32) and torch.isfinite(model.output).all()
    m = uni.report.num_patches
    assert uni.report.patches_per_group == (m,) and uni.report.nfe_total == 20 * m and uni.confidence is None
    assert len(pgs.report.patches_per_group) == 3 and pgs.confidence is not None
    assert pgs.report.nfe_total == sum(n * c for n, c in zip((8, 14, 20), pgs.report.patches_per_group))
    errors = uni.x0_errors()  # the v output converted to x0, at 4 timesteps, then y0 = y_LR itself
    assert errors.shape == (5,) and torch.isfinite(errors).all()
    for model in (uni, pgs):  # a validation pass, detail measures included: StableSR has no GRM output to score
        model.nondist_validation(_Loader(batch), 1, None, False)
        assert set(model.metric_results) >= {'psnr', 'ssim'}


class _Loader(list):
    """One validation image as BasicSR's dataloader yields it."""

    def __init__(self, batch):
        super().__init__([{'lq': batch['lq'][:1], 'gt': batch['gt'][:1], 'lq_path': ['x/a.png']}])
        self.dataset = type('D', (), {'opt': {'name': 'tiny', 'type': 'PairedSRDataset'}})()


def test_pgs_without_a_grm_and_grm_without_weights_are_config_errors(tmp_path):
    opt = _opt('test_stablesr_pgs_demo.yml', tmp_path, False, path={'pretrain_network_g': None})
    opt.pop('network_grm')
    trained = StableSRModel(_opt('train_stablesr_demo.yml', tmp_path, True))
    trained.save(0, 1)
    opt['path'] = {'pretrain_network_g': str(tmp_path / 'models' / 'net_g_1.pth')}
    with pytest.raises(ConfigError, match='needs network_grm'):
        StableSRModel(opt)
    opt['network_grm'] = {'type': 'GRM', 'in_channels': 12, 'num_feat': 8, 'body': 'rrdb', 'num_blocks': 1,
                          'num_grow_ch': 4}
    with pytest.raises(ConfigError, match='pretrain_network_grm'):
        StableSRModel(opt)

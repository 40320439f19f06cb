"""Stage 'full' of PatchScalerModel (GRM for grm_iters, then frozen; Patch-DiT throughout), its checkpoints,
and the inference pipeline it validates with: built from the demo YAML, shrunk to seconds."""
import math

import pytest
import torch

from patchscaler.models.patchscaler_model import PatchScalerModel, random_patches
from patchscaler.models.pipeline import PatchScalerPipeline
from patchscaler.utils.errors import CheckpointError, ConfigError, InputError


def _model(opt, tmp_path, is_train=True):
    opt = dict(opt, is_train=is_train, dist=False, rank=0, world_size=1, num_gpu=0)
    opt['path'] = dict(opt['path'], models=str(tmp_path / 'models'), training_states=str(tmp_path / 'states'),
                       experiments_root=str(tmp_path), visualization=str(tmp_path / 'vis'))
    opt['train'] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in opt['train'].items()}
    (tmp_path / 'models').mkdir(parents=True, exist_ok=True)
    return PatchScalerModel(opt)


def _batch(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(2, 3, size, size, generator=g)
    return {'lq': torch.nn.functional.interpolate(gt, scale_factor=0.25, mode='area'), 'gt': gt}


def _trained(opt, tmp_path, iters):
    """A model trained for ``iters`` iterations from seed 0 on the _batch(1..iters) batches."""
    torch.manual_seed(0)
    model = _model(opt, tmp_path)
    for it in range(1, iters + 1):
        model.feed_data(_batch(it))
        model.optimize_parameters(it)
    return model


def _params(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _changed(before, net):
    return {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}


def test_full_stage_trains_grm_then_freezes_it_and_dit_throughout(tiny_patchscaler, tmp_path):
    opt, _ = tiny_patchscaler
    torch.manual_seed(0)
    model = _model(opt, tmp_path)
    assert model.stage == 'full' and model.grm_iters == 2
    for it in (1, 2, 3, 4):
        grm, dit, ema = _params(model.net_grm), _params(model.net_g), _params(model.net_g_ema)
        model.feed_data(_batch(it))
        model.optimize_parameters(it)
        assert bool(_changed(grm, model.net_grm)) == (it <= 2), it
        if it > 2:
            assert not model.net_grm.training and not any(p.requires_grad for p in model.net_grm.parameters())
        assert _changed(dit, model.net_g)  # Patch-DiT + encoder train every iteration
        assert _changed(ema, model.net_g_ema)  # and the EMA follows
        log = model.get_current_log()
        assert ('l_conf' in log) == (it <= 2) and {'l_x0', 'l_x0_coarse'} <= set(log)
        assert all(torch.isfinite(torch.tensor(v)) for v in log.values())


def test_non_finite_steps_are_skipped_then_training_stops(tiny_patchscaler, tmp_path, caplog):
    """A NaN loss skips the step: GRM, Patch-DiT, the optimizers' state and the EMA stay as they were; a finite
    step afterwards trains again; train.max_nonfinite_steps NaN steps in a row stop training with one error."""
    from patchscaler.utils.errors import TrainingError
    opt, _ = tiny_patchscaler
    opt = dict(opt, train=dict(opt['train'], max_nonfinite_steps=2, grm_iters=10))
    torch.manual_seed(0)
    model = _model(opt, tmp_path)
    confidence_loss, x0_loss = model.cri_confidence, model.cri_x0
    model.cri_confidence = lambda *a: confidence_loss(*a) * float('nan')
    model.cri_x0 = lambda *a: x0_loss(*a) * float('nan')
    nets = (model.net_grm, model.net_g, model.net_g_ema)
    before = [_params(n) for n in nets]
    model.feed_data(_batch(1))
    model.optimize_parameters(1)
    assert all(not _changed(b, n) for b, n in zip(before, nets))  # no NaN written anywhere
    assert all(torch.isfinite(p).all() for n in nets for p in n.state_dict().values())
    assert not model.optimizer_grm.state and not model.optimizer_g.state  # Adam never stepped
    assert 'GRM: non-finite loss or gradient' in caplog.text and 'denoiser: non-finite' in caplog.text
    model.cri_confidence, model.cri_x0 = confidence_loss, x0_loss  # finite again: training goes on
    model.feed_data(_batch(2))
    model.optimize_parameters(2)
    assert all(_changed(b, n) for b, n in zip(before, nets)) and model.nonfinite_run == {'GRM': 0, 'denoiser': 0}
    model.cri_confidence = lambda *a: confidence_loss(*a) * float('inf')
    model.optimize_parameters(3)
    with pytest.raises(TrainingError, match='GRM: 2 non-finite steps in a row'):
        model.optimize_parameters(4)
    with pytest.raises(ConfigError, match='max_nonfinite_steps'):
        _model(dict(opt, train=dict(opt['train'], max_nonfinite_steps=0)), tmp_path / 'bad')


def test_training_noise_follows_eq4_with_the_samplers_schedule(tiny_patchscaler, tmp_path, monkeypatch):
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·ε with ᾱ of DiT's linear betas, the same table PGS samples with."""
    opt, _ = tiny_patchscaler
    model = _model(opt, tmp_path)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert torch.allclose(model.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-6)
    assert torch.equal(model.alphas_cumprod, model.sampler.scheduler.alphas_cumprod.float())
    seen = {}
    real = model.net_g.forward

    def spy(x_t, t, cond):
        seen.update(x_t=x_t, t=t, y0=cond['y0'])
        return real(x_t, t, cond)
    monkeypatch.setattr(model.net_g, 'forward', spy)
    noise = {}
    real_randn_like = torch.randn_like
    monkeypatch.setattr(torch, 'randn_like', lambda x: noise.setdefault('eps', real_randn_like(x)))
    x0, y0 = torch.randn(4, 12, 8, 8), torch.randn(4, 12, 8, 8)
    monkeypatch.setattr('patchscaler.models.patchscaler_model.random_patches', lambda ts, v, n: [x0, y0])
    model._diffusion_step(torch.zeros(1), torch.zeros(1))
    a = model.alphas_cumprod[seen['t']].view(-1, 1, 1, 1)
    assert torch.allclose(seen['x_t'], a.sqrt() * x0 + (1 - a).sqrt() * noise['eps'], atol=1e-6)
    assert torch.equal(seen['y0'], y0) and seen['t'].min() >= 0 and seen['t'].max() < 1000


def test_random_patches_are_aligned_crops():
    a = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).view(2, 3, 10, 12)
    pa, pb = random_patches([a, a * 2], 4, 5, torch.Generator().manual_seed(0))
    assert pa.shape == (10, 3, 4, 4) and torch.equal(pb, pa * 2)
    flat = a.view(2, -1)
    assert all(bool(torch.isin(p, flat[i // 5]).all()) for i, p in enumerate(pa))


def test_checkpoints_round_trip_and_another_config_is_refused(tiny_patchscaler, tmp_path):
    opt, _ = tiny_patchscaler
    model = _trained(opt, tmp_path, 3)
    model.save(0, 3)
    models = tmp_path / 'models'
    assert {p.name for p in models.iterdir()} == {'net_grm_3.pth', 'net_dit_3.pth', 'net_texture_3.pth'}
    assert set(torch.load(models / 'net_dit_3.pth', weights_only=True)) == {'params', 'params_ema'}
    test_opt = dict(opt, path={'pretrain_network_grm': str(models / 'net_grm_3.pth'),
                               'pretrain_network_dit': str(models / 'net_dit_3.pth'), 'param_key_dit': 'params_ema',
                               'pretrain_network_texture': str(models / 'net_texture_3.pth'),
                               'param_key_texture': 'params_ema'})
    tested = _model(test_opt, tmp_path / 'test', is_train=False)
    batch = _batch(9)
    model.feed_data(batch)
    model.test()
    tested.feed_data(batch)
    tested.test()
    assert torch.equal(model.output, tested.output)  # validation samples with the EMA weights, as loaded here
    bigger = dict(test_opt, network_dit=dict(opt['network_dit'], hidden_size=64))
    with pytest.raises(CheckpointError, match='does not fit PatchDiT.*shape'):
        _model(bigger, tmp_path / 'other', is_train=False)


def test_a_run_saved_on_a_gpu_resumes_on_a_cpu(tiny_patchscaler, tmp_path, monkeypatch):
    """Resume across devices: the networks and training state of a GPU run (their storages tagged cuda:0, as a
    GPU run writes the optimizers' state; forged here by tagging CPU tensors) load on a CPU-only machine the way
    tools/train.py --auto_resume loads them, and training goes on from the same weights and Adam state."""
    import torch.serialization

    from patchscaler import compat
    opt, _ = tiny_patchscaler
    model = _trained(opt, tmp_path, 3)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, 'location_tag', lambda storage: 'cuda:0')
        model.save(0, 3)
    state_path = tmp_path / 'states' / '3.state'
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='CUDA'):
            torch.load(state_path, weights_only=True)  # the file really asks for a GPU
    resume_opt = dict(opt, auto_resume=False, num_gpu=0, path=dict(opt['path'], models=str(tmp_path / 'models'),
                                                                     resume_state=str(state_path)))
    state = compat.load_resume_state(resume_opt)  # also points the pretrain paths at net_*_3.pth (check_resume)
    assert state['iter'] == 3 and resume_opt['path']['pretrain_network_dit'].endswith('net_dit_3.pth')
    resumed = _model(resume_opt, tmp_path / 'resumed')
    resumed.resume_training(state)
    for a, b in zip(model.optimizers, resumed.optimizers):
        moments = [(s['exp_avg'], t['exp_avg']) for s, t in zip(a.state.values(), b.state.values())]
        assert moments and all(y.device.type == 'cpu' and torch.equal(x, y) for x, y in moments)
    assert not _changed(_params(model.net_g), resumed.net_g) and not _changed(_params(model.net_grm), resumed.net_grm)
    assert not _changed(_params(model.net_g_ema), resumed.net_g_ema)
    for m in (model, resumed):  # the next step is the same on both
        torch.manual_seed(4)
        m.feed_data(_batch(4))
        m.optimize_parameters(4)
    assert not _changed(_params(model.net_g), resumed.net_g)


def test_texture_encoder_runs_once_per_batch_of_patches_not_per_step(tiny_patchscaler, tmp_path):
    opt, _ = tiny_patchscaler
    model = _model(opt, tmp_path)
    pipe = model.pipeline()
    assert pipe.denoiser is model.net_g_ema  # validation samples with the EMA weights
    calls, dit_calls = [], []
    pipe.denoiser.texture_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    pipe.denoiser.dit.register_forward_hook(lambda m, i, o: dit_calls.append(i[0].shape[0]))
    out = pipe(_batch(1, size=64)['lq'])
    r = out.report
    assert len(calls) == r.cond_calls and sum(calls) == r.num_patches  # each patch's prompt computed once
    assert len(dit_calls) == r.denoiser_calls > len(calls) and sum(dit_calls) == r.nfe_total
    assert out.sr.shape == (2, 3, 64, 64) and out.grm.shape == out.sr.shape
    assert set(out.seconds) == {'encode', 'grm', 'pgs', 'decode', 'color_fix'}


def test_pipeline_without_prompt_and_grm_only(tiny_patchscaler, tmp_path):
    opt, _ = tiny_patchscaler
    no_prompt = {k: v for k, v in opt.items() if k not in ('network_texture', 'rtm')}
    no_prompt['network_dit'] = {k: v for k, v in opt['network_dit'].items() if k != 'prompt_dim'}
    model = _model(no_prompt, tmp_path)
    assert model.rtm is None and model.net_g.texture_encoder is None
    lq = _batch(2)['lq']
    out = model.pipeline()(lq)
    assert out.report is not None and out.report.cond_calls == 0 and out.sr.shape == (2, 3, 32, 32)
    grm_only = model.pipeline()(lq, refine=False)
    assert grm_only.report is None and 'pgs' not in grm_only.seconds and torch.equal(grm_only.sr, grm_only.grm)


def test_pipeline_keep_latents_false_gives_the_same_image_and_lets_go_of_the_rest(tiny_patchscaler, tmp_path):
    """tools/infer.py's lean call (large images): the same SR, confidence and report, no latents or bicubic kept."""
    opt, _ = tiny_patchscaler
    model = _model(opt, tmp_path)
    lq, pipe = _batch(3)['lq'], model.pipeline()
    full = pipe(lq, seed=1, return_grm=False)
    lean = pipe(lq, seed=1, return_grm=False, keep_latents=False)
    assert torch.equal(lean.sr, full.sr) and torch.equal(lean.confidence, full.confidence)
    assert lean.report.nfe_total == full.report.nfe_total
    assert full.y_hr is not None and full.y_lr is not None and full.bicubic is not None
    assert lean.y_hr is None and lean.y_lr is None and lean.bicubic is None


def test_pipeline_errors(tiny_patchscaler, tmp_path):
    opt, _ = tiny_patchscaler
    model = _model(opt, tmp_path)
    pipe = model.pipeline()
    with pytest.raises(InputError, match='at least 1 px'):
        pipe(torch.rand(1, 3, 0, 5))
    with pytest.raises(InputError, match=r'\(B, 3, h, w\)'):
        pipe(torch.rand(1, 1, 8, 8))
    with pytest.raises(ConfigError, match='tile_overlap'):
        PatchScalerPipeline(model.autoencoder, model.net_grm, 4, tile=64, tile_overlap=64)
    with pytest.raises(ConfigError, match='patch_size'):
        sampler = type(model.sampler)(patch_size=16)
        PatchScalerPipeline(model.autoencoder, model.net_grm, 4, model.net_g, sampler, model.rtm)
    with pytest.raises(InputError, match='smaller than the V=8'):
        random_patches([torch.zeros(1, 12, 4, 8)], 8, 2)
    missing_rtm = {k: v for k, v in opt.items() if k != 'rtm'}
    with pytest.raises(ConfigError, match='needs an rtm'):
        _model(missing_rtm, tmp_path / 'x')


def test_tiled_autoencoder_in_the_pipeline_matches_untiled(tiny_patchscaler, tmp_path):
    opt, _ = tiny_patchscaler
    model = _model(opt, tmp_path)
    lq = _batch(3, size=96)['lq'][:1]
    full = model.pipeline()(lq, refine=False).sr
    model.tile, model.tile_overlap = 32, 8
    tiled = model.pipeline()(lq, refine=False).sr
    assert torch.allclose(full, tiled, atol=1e-5)  # pixel unshuffle is pointwise: tiling is exact


def test_validation_x0_loss_of_a_fresh_patch_dit_equals_y0s(tiny_patchscaler, tmp_path):
    """A fresh Patch-DiT returns y0 at every t, so each x0-prediction MSE equals y0's; training moves them."""
    opt, _ = tiny_patchscaler
    torch.manual_seed(0)
    model = _model(opt, tmp_path)
    model.feed_data(_batch(5))
    model.test()  # validation's order: the pipeline first, its y_HR then serves x0_errors
    errs = model.x0_errors()
    assert errs.shape == (5,) and torch.allclose(errs[:4], errs[4].expand(4))
    for it in range(1, 4):
        model.feed_data(_batch(it))
        model.optimize_parameters(it)
    model.feed_data(_batch(5))
    model.test()
    assert not torch.allclose(model.x0_errors()[:4], errs[:4])


def test_min_snr_weighting_is_the_mean_of_weighted_losses(tiny_patchscaler, tmp_path, monkeypatch):
    """train.loss_weighting {type: min_snr}: l_x0 = mean(w_t * (pred - x0)^2), w_t = min(SNR_t, γ) (Hang et al.,
    Eq. 8), not BasicSR's weighted mean that divides by the batch's sum of weights: a batch drawn entirely at
    t = 999 (SNR ≈ 0) must give a loss of about SNR times the unweighted one."""
    opt, _ = tiny_patchscaler
    losses, randint = {}, torch.randint
    for name, weighting in (('plain', None), ('min_snr', {'type': 'min_snr', 'gamma': 5})):
        opt_w = dict(opt, train=dict(opt['train'], loss_weighting=weighting))
        torch.manual_seed(0)
        model = _model(opt_w, tmp_path / name)
        # the timestep draw (high = T) at t = 999; the crop positions as they come
        monkeypatch.setattr(torch, 'randint', lambda low, high, size, **kw: torch.full(
            size, 999, device=kw.get('device')) if high == 1000 else randint(low, high, size, **kw))
        model.feed_data(_batch(1))
        model.optimize_parameters(3)  # past grm_iters: the diffusion step only, from the same weights
        monkeypatch.undo()
        losses[name] = float(model.get_current_log()['l_x0'])
        a_bar = float(model.alphas_cumprod[999])
    snr = a_bar / (1 - a_bar)
    assert losses['min_snr'] == pytest.approx(snr * losses['plain'], rel=1e-4)
    with pytest.raises(ConfigError, match='loss weighting'):
        _model(dict(opt, train=dict(opt['train'], loss_weighting='min_snr')), tmp_path / 'bad')


def test_raising_total_iter_of_a_finished_run_and_resuming(tiny_patchscaler, tmp_path):
    """A run trained to the end of its cosine periods, resumed with longer periods and total_iter: the option
    file's schedule applies from the saved iteration (BasicSR restored the saved periods and failed with a
    TypeError at the first iteration past them); periods that do not cover total_iter are refused up front."""
    from patchscaler import compat
    from patchscaler.utils.options_check import check_options
    opt, _ = tiny_patchscaler
    sched = {'type': 'CosineAnnealingRestartLR', 'periods': [3], 'restart_weights': [1], 'eta_min': 1e-6}
    opt = dict(opt, train=dict(opt['train'], scheduler=sched, total_iter=3))
    torch.manual_seed(0)
    model = _model(opt, tmp_path)
    for it in range(1, 4):
        model.feed_data(_batch(it))
        model.optimize_parameters(it)
        model.update_learning_rate(it)
    model.save(0, 3)
    longer = dict(opt, train=dict(opt['train'], total_iter=6, scheduler=dict(sched, periods=[6])))
    with pytest.raises(ConfigError, match=r'periods sum to 3 but total_iter is 6.*periods: \[6\]'):
        check_options(dict(longer, train=dict(longer['train'], scheduler=sched)))
    resume_opt = dict(longer, auto_resume=False, num_gpu=0,
                      path=dict(opt['path'], models=str(tmp_path / 'models'),
                                resume_state=str(tmp_path / 'states' / '3.state')))
    state = compat.load_resume_state(resume_opt)
    resumed = _model(resume_opt, tmp_path / 'resumed')
    resumed.resume_training(state)
    base = resumed.schedulers[0].base_lrs[0]
    for it in range(4, 7):
        resumed.update_learning_rate(it)
        want = 1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * (it - 1) / 6))  # BasicSR steps from it 2
        assert resumed.get_current_learning_rate()[0] == pytest.approx(want, rel=1e-6)

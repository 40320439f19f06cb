"""PGS, patch-adaptive group sampling: exactness against oracles and diffusers, NFE, conditioning, devices."""
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch

import patchscaler  # noqa: F401  (compat fixes before BasicSR)
from patchscaler.sampling import (
    PAPER_GROUPS,
    PatchGrid,
    PatchGroupSampler,
    PerPatch,
    assign_groups,
    build_sampler,
    sample,
)
from patchscaler.sampling.schedules import DEFAULT_SCHEDULER, ddim_step, denoise
from patchscaler.utils.errors import ConfigError, InputError
from patchscaler.utils.visualize import qmap_overlay

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
SAMPLER_YMLS = [os.path.join(ROOT, 'options', 'samplers', n) for n in ('pgs_paper.yml', 'pgs_adaptive.yml')]
PAPER_TIMESTEPS = [list(range(399, 48, -50)), list(range(699, 48, -50)), list(range(999, 48, -50))]
V, STRIDE = 8, 4


# ---------------------------------------------------------------- helpers
def latents(b=2, c=4, h=24, w=32, seed=0):
    """(x0, y0): a target latent and a coarse latent near it."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, c, h, w, generator=g)
    return x0, x0 + 0.05 * torch.randn(b, c, h, w, generator=g)


def mixed_confidence(b=2, h=24, w=32, seed=0):
    """A confidence map in [0, 1] that fills all three paper groups for V=8, stride 4: confident left third,
    medium middle third, unsure right third (mirrored for odd images), with a little noise."""
    x = torch.arange(w, dtype=torch.float32)
    base = torch.where(x < w / 3, 1.0, torch.where(x < 2 * w / 3, 0.85, 0.2))
    c = base.view(1, 1, 1, w).repeat(b, 1, h, 1)
    c[1::2] = c[1::2].flip(-1)
    noise = torch.rand(c.shape, generator=torch.Generator().manual_seed(seed)) * 0.02 - 0.01
    return (c + noise).clamp(0, 1)


def oracle(sampler, kind):
    """A denoiser that knows the true x0 (passed as the spatial cond) and answers in ``kind`` parametrisation."""
    alphas = sampler.scheduler.alphas_cumprod.double()

    def den(x_t, t, cond):
        x0 = cond.double()
        if kind == 'sample':
            return x0.to(x_t.dtype)
        a = alphas[t].view(-1, 1, 1, 1)
        eps = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if kind == 'epsilon' else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.to(x_t.dtype)
    return den


def pixel_denoiser(x_t, t, cond):
    """Per-pixel (no spatial mixing): denoising patches equals denoising the whole latent."""
    return 0.7 * x_t + 0.2 * cond + 0.3 * (t.to(x_t.dtype) / 1000).view(-1, 1, 1, 1)


class CountingDenoiser:
    def __init__(self, fn):
        self.fn, self.calls, self.nfe, self.patches_at = fn, 0, 0, Counter()

    def __call__(self, x_t, t, cond):
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],) and (t == t[0]).all()
        self.calls += 1
        self.nfe += x_t.shape[0]
        self.patches_at[int(t[0])] += x_t.shape[0]
        return self.fn(x_t, t, cond)


class PixelNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(8, 4, 1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.mix.weight.copy_(0.3 * torch.randn(self.mix.weight.shape, generator=g))
            self.mix.bias.copy_(0.1 * torch.randn(self.mix.bias.shape, generator=g))

    def forward(self, x_t, t, cond):
        return self.mix(torch.cat([x_t, cond], 1)) + (t.float() / 1000).view(-1, 1, 1, 1)


def ddim_reference(y0, denoiser, cond, seed, prediction_type, steps=20):
    """The whole latent at once with diffusers' own DDIMScheduler (trailing spacing), same ε as the sampler."""
    from diffusers import DDIMScheduler
    cfg = {k: v for k, v in DEFAULT_SCHEDULER.items() if k != 'type'}
    sched = DDIMScheduler(**cfg, prediction_type=prediction_type)
    sched.set_timesteps(steps)
    noise = torch.randn(y0.shape, generator=torch.Generator().manual_seed(seed))
    x = sched.add_noise(y0, noise, torch.tensor([int(sched.timesteps[0])]))
    for t in sched.timesteps:
        x = sched.step(denoiser(x, t.repeat(y0.shape[0]), cond), t, x, eta=0.0).prev_sample
    return x, sched.timesteps.tolist()


# ---------------------------------------------------------------- 1. oracles return x0
CONFIGS = {
    'paper': dict(groups=PAPER_GROUPS),
    'G1': dict(groups=[(1000, 20)]),
    'G2': dict(groups=[(600, 10), (1000, 20)], grouping=dict(thresholds=[0.9])),
    'G4': dict(groups=[(300, 6), (500, 7), (900, 13), (1000, 20)], grouping=dict(thresholds=[0.95, 0.8, 0.5])),
    'non_aligned': dict(groups=[(500, 7), (900, 13)], grouping=dict(thresholds=[0.9])),
    'quantile': dict(groups=PAPER_GROUPS, grouping=dict(mode='quantile', quantiles=[0.6, 0.3])),
    'share': dict(groups=PAPER_GROUPS, grouping=dict(mode='share', shares=[0.4, 0.3, 0.3])),
}


@pytest.mark.parametrize('kind', ['sample', 'epsilon', 'v_prediction'])
@pytest.mark.parametrize('config', sorted(CONFIGS))
def test_oracle_denoiser_returns_x0(config, kind):
    x0, y0 = latents()
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, prediction_type=kind, batch_size=16, **CONFIGS[config])
    out, report = sampler.sample(oracle(sampler, kind), y0, mixed_confidence(), cond=x0)
    assert out.shape == x0.shape and out.dtype == x0.dtype
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    assert (out - y0).abs().max() > 0.05  # it did move away from the coarse latent
    used = sum(c > 0 for c in report.patches_per_group)
    assert used == len(sampler.groups)  # every group took part
    assert sum(report.patches_per_group) == report.num_patches == 2 * PatchGrid.for_shape(24, 32, V, STRIDE).num_patches


@pytest.mark.parametrize('config,aligned', [('paper', True), ('G1', True), ('non_aligned', False), ('G2', False)])
def test_report_schedules(config, aligned):
    x0, y0 = latents(b=1)
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, **CONFIGS[config])
    _, report = sampler.sample(oracle(sampler, 'sample'), y0, mixed_confidence(b=1), cond=x0)
    assert report.aligned is aligned
    assert report.timesteps == tuple(tuple(ts) for ts in sampler.timesteps)
    assert report.taus == tuple(t for t, _ in sampler.groups) and report.steps == tuple(n for _, n in sampler.groups)
    for (tau, n), ts in zip(sampler.groups, report.timesteps):
        assert len(ts) == n and ts[0] == tau - 1 and list(ts) == sorted(ts, reverse=True)
    if config == 'paper':
        assert [list(ts) for ts in report.timesteps] == PAPER_TIMESTEPS
    if config == 'non_aligned':
        assert report.timesteps == ((499, 428, 356, 285, 213, 142, 70),
                                    tuple(round(900 - k * 900 / 13) - 1 for k in range(13)))


# ---------------------------------------------------------------- 2. patches == whole latent == diffusers DDIM
@pytest.mark.parametrize('groups', [[(1000, 20)] * 3, [(1000, 20)]])
@pytest.mark.parametrize('prediction_type', ['sample', 'epsilon', 'v_prediction'])
def test_all_groups_full_schedule_equals_diffusers_ddim_on_the_whole_latent(prediction_type, groups):
    _, y0 = latents(seed=3)
    seed = 5
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, groups=groups, prediction_type=prediction_type,
                                batch_size=5)
    out, report = sampler.sample(pixel_denoiser, y0, mixed_confidence(), cond=y0, seed=seed)
    ref, ref_timesteps = ddim_reference(y0, pixel_denoiser, y0, seed, prediction_type)
    assert all(ts == ref_timesteps for ts in sampler.timesteps)
    assert ref_timesteps == PAPER_TIMESTEPS[2]
    if len(groups) == 3:
        assert all(c > 0 for c in report.patches_per_group)
    assert (out - y0).abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('prediction_type', ['sample', 'epsilon', 'v_prediction'])
def test_ddim_step_matches_diffusers_including_eta(prediction_type, eta):
    from diffusers import DDIMScheduler
    cfg = {k: v for k, v in DEFAULT_SCHEDULER.items() if k != 'type'}
    sched = DDIMScheduler(**cfg, prediction_type=prediction_type)
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x, out, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    alphas = sched.alphas_cumprod
    for t, t_prev in [(599, 549), (999, 949), (49, -1)]:
        ref = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        a_prev = 1.0 if t_prev < 0 else float(alphas[t_prev])
        ours = ddim_step(out, x, float(alphas[t]), a_prev, prediction_type, eta, noise if eta else None)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- 3. NFE accounting
@pytest.mark.parametrize('batch_size', [1, 3, 64])
def test_nfe_accounting_is_exact(batch_size):
    x0, y0 = latents()
    conf = mixed_confidence()
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, batch_size=batch_size)
    den = CountingDenoiser(oracle(sampler, 'sample'))
    _, report = sampler.sample(den, y0, conf, cond=x0)
    groups, _ = assign_groups(conf, V, STRIDE)
    counts = [int((groups == g).sum()) for g in range(3)]
    assert all(counts) and report.patches_per_group == tuple(counts)
    assert torch.equal(report.groups, groups)
    steps = [8, 14, 20]
    assert den.nfe == report.nfe_total == int(report.nfe_per_patch.sum()) == sum(n * s for n, s in zip(counts, steps))
    assert torch.equal(report.nfe_per_patch, torch.tensor(steps)[groups])
    assert den.calls == report.denoiser_calls == sum(math.ceil(n / batch_size) * s for n, s in zip(counts, steps))
    # every patch of a group is evaluated once at each of its group's timesteps
    expected_at = Counter()
    for n, ts in zip(counts, PAPER_TIMESTEPS):
        for t in ts:
            expected_at[t] += n
    assert den.patches_at == expected_at
    m = groups.numel()
    assert report.nfe_uniform == 20 * m and report.uniform_steps == 20
    assert report.nfe_ratio == (8 * counts[0] + 14 * counts[1] + 20 * counts[2]) / (20 * m)
    assert f'NFE {report.nfe_total} vs {report.nfe_uniform}' in report.summary()
    assert sampler.nfe(groups) == (report.nfe_total, report.nfe_uniform)


@pytest.mark.parametrize('value,ratio,group', [(1.0, 8 / 20, 0), (0.0, 1.0, 2), (0.9, 14 / 20, 1)])
def test_nfe_ratio_for_uniform_confidence(value, ratio, group):
    x0, y0 = latents()
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE)
    den = CountingDenoiser(oracle(sampler, 'sample'))
    _, report = sampler.sample(den, y0, torch.full((2, 1, 24, 32), value), cond=x0)
    m = report.num_patches
    assert (report.groups == group).all()
    assert report.nfe_ratio == ratio
    assert report.nfe_total == den.nfe == m * [8, 14, 20][group]
    assert report.denoiser_calls == den.calls == [8, 14, 20][group] * math.ceil(m / 64)


def test_uniform_steps_option_changes_the_baseline():
    x0, y0 = latents(b=1)
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, uniform_steps=50)
    _, report = sampler.sample(oracle(sampler, 'sample'), y0, torch.ones(1, 1, 24, 32), cond=x0)
    assert report.nfe_uniform == 50 * report.num_patches
    assert report.nfe_ratio == 8 / 50


# ---------------------------------------------------------------- 4. conditioning
@pytest.mark.parametrize('batch_size', [4, 64])
def test_prepare_cond_runs_once_per_batch_and_is_what_every_step_sees(batch_size):
    x0, y0 = latents()
    conf = mixed_confidence()
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, batch_size=batch_size)
    prepared, seen, calls_per_prepared = [], [], Counter()

    def prepare(c):
        out = {'x0': c * 1.0, 'token': object()}  # a new object per batch
        prepared.append(out)
        return out

    def den(x_t, t, c):
        seen.append(c is prepared[-1] and c['x0'].shape == x_t.shape)
        calls_per_prepared[len(prepared) - 1] += 1
        return c['x0']

    out, report = sampler.sample(den, y0, conf, cond=x0, prepare_cond=prepare)
    counts = list(report.patches_per_group)
    batches = [math.ceil(n / batch_size) for n in counts]
    assert report.cond_calls == len(prepared) == sum(batches)
    assert all(seen) and len(seen) == report.denoiser_calls
    # each prepared cond serves exactly its batch's N_g steps
    assert sorted(calls_per_prepared.values()) == sorted(s for b, s in zip(batches, [8, 14, 20]) for _ in range(b))
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)


def test_no_prepare_cond_means_zero_cond_calls():
    x0, y0 = latents(b=1)
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE)
    _, report = sampler.sample(oracle(sampler, 'sample'), y0, mixed_confidence(b=1), cond=x0)
    assert report.cond_calls == 0


def test_per_patch_and_spatial_cond_are_sliced_by_patch_identity():
    _, y0 = latents(b=2, h=28, w=36)
    conf = mixed_confidence(b=2, h=28, w=36)
    seed = 11
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, batch_size=6)
    grid = PatchGrid.for_shape(28, 36, V, STRIDE)
    m = grid.num_patches
    y0_p = grid.patchify(y0).flatten(0, 1)
    noise_p = grid.patchify(torch.randn(y0.shape, generator=torch.Generator().manual_seed(seed))).flatten(0, 1)
    ids = torch.arange(2 * m).view(2, m)
    emb = torch.randn(2, m, 3, 5)
    groups_flat = assign_groups(conf, V, STRIDE)[0].flatten()
    checks, firsts = [], []
    alphas = sampler.scheduler.alphas_cumprod

    def prepare(c):
        return dict(c, first=[True])

    def den(x_t, t, c):
        idx = c['id']
        checks.append(idx.dtype == torch.long and idx.shape == (x_t.shape[0],))
        checks.append(torch.equal(c['y'], y0_p[idx]))  # spatial cond: the same grid as y0
        checks.append(torch.equal(c['emb'], emb.flatten(0, 1)[idx]))  # PerPatch: sliced with the same rows
        checks.append(c['scale'] == 2.5 and c['name'] == 'prompt' and c['none'] is None and c['list'] == [1, 2])
        g = groups_flat[idx]
        checks.append(bool((g == g[0]).all()))  # one group per batch
        if c['first'][0]:  # the batch's start: y_tau of Eq. 7 on these very patches
            c['first'][0] = False
            firsts.append(int(idx[0]))
            checks.append(int(t[0]) == sampler.timesteps[int(g[0])][0])
            a = float(alphas[int(t[0])])
            torch.testing.assert_close(x_t, a ** 0.5 * y0_p[idx] + (1 - a) ** 0.5 * noise_p[idx], atol=1e-6, rtol=0)
        return c['y']

    cond = {'y': y0, 'id': PerPatch(ids), 'emb': PerPatch(emb), 'scale': 2.5, 'name': 'prompt', 'none': None,
            'list': [1, 2]}
    out, report = sampler.sample(den, y0, conf, cond=cond, prepare_cond=prepare, seed=seed)
    assert checks and all(checks)
    assert len(firsts) == report.cond_calls == sum(math.ceil(n / 6) for n in report.patches_per_group)
    assert torch.equal(out, y0)  # the x0 'oracle' answers y0 itself; the last DDIM step returns it exactly


def test_plain_spatial_cond_is_the_y0_patch():
    _, y0 = latents(b=1)
    seed = 6
    grid = PatchGrid.for_shape(24, 32, V, STRIDE)
    y0_p = grid.patchify(y0).flatten(0, 1)
    noise_p = grid.patchify(torch.randn(y0.shape, generator=torch.Generator().manual_seed(seed))).flatten(0, 1)
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, batch_size=5)
    alphas = sampler.scheduler.alphas_cumprod
    started, checks = set(), []

    def den(x_t, t, c):
        # which patches these are: each cond row is one of y0's patches (all distinct)
        idx = [next(i for i in range(len(y0_p)) if torch.equal(row, y0_p[i])) for row in c]
        if tuple(idx) not in started:  # a batch's first step: x_t is y_tau of the same patches
            started.add(tuple(idx))
            a = float(alphas[int(t[0])])
            expected = a ** 0.5 * y0_p[idx] + (1 - a) ** 0.5 * noise_p[idx]
            checks.append(bool(torch.allclose(x_t, expected, atol=1e-6, rtol=0)))
        return c

    out, report = sampler.sample(den, y0, mixed_confidence(b=1), cond=y0, seed=seed)
    assert len(started) == sum(math.ceil(n / 5) for n in report.patches_per_group)
    assert sorted(i for batch in started for i in batch) == list(range(grid.num_patches))
    assert checks and all(checks)
    assert torch.equal(out, y0)


@pytest.mark.parametrize('cond', [
    lambda y0, m: y0[:, :, :-1], lambda y0, m: y0[:1], lambda y0, m: torch.zeros(2, 7),
    lambda y0, m: PerPatch(torch.zeros(2, m + 1, 3)), lambda y0, m: PerPatch(torch.zeros(1, m, 3)),
    lambda y0, m: {'ok': y0, 'bad': y0[..., :-1]}])
def test_bad_cond_shapes_are_input_errors(cond):
    x0, y0 = latents()
    m = PatchGrid.for_shape(24, 32, V, STRIDE).num_patches
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE)
    calls = []
    with pytest.raises(InputError):
        sampler.sample(lambda x, t, c: calls.append(1) or x, y0, mixed_confidence(), cond=cond(y0, m))
    assert not calls  # rejected before any denoiser call


# ---------------------------------------------------------------- 5. determinism, batch size, devices
def test_results_do_not_depend_on_batch_size():
    _, y0 = latents()
    conf = mixed_confidence()
    outs = []
    for bs in (1, 7, 64):
        sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, batch_size=bs)
        outs.append(sampler.sample(pixel_denoiser, y0, conf, cond=y0, seed=2)[0])
    assert (outs[0] - y0).abs().max() > 0.1
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=0)


def test_seed_determinism():
    _, y0 = latents()
    conf = mixed_confidence()
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE)
    a = sampler.sample(pixel_denoiser, y0, conf, cond=y0, seed=1)[0]
    b = sampler.sample(pixel_denoiser, y0, conf, cond=y0, seed=1)[0]
    c = sampler.sample(pixel_denoiser, y0, conf, cond=y0, seed=2)[0]
    d = PatchGroupSampler(patch_size=V, stride=STRIDE, seed=1).sample(pixel_denoiser, y0, conf, cond=y0)[0]
    e = sample(pixel_denoiser, y0, conf, cond=y0, patch_size=V, stride=STRIDE, seed=1)[0]
    assert torch.equal(a, b) and torch.equal(a, d) and torch.equal(a, e)
    assert (a - c).abs().max() > 1e-2


def _two_device_denoisers(kind):
    if kind == 'module':
        return PixelNet(), None
    nets = [CountingDenoiser(pixel_denoiser), CountingDenoiser(pixel_denoiser)]
    return nets, nets


@pytest.mark.parametrize('device_groups', [None, [[2], [0, 1]]])
@pytest.mark.parametrize('kind', ['module', 'list'])
def test_two_cpu_devices_equal_the_sequential_run(kind, device_groups):
    _, y0 = latents()
    conf = mixed_confidence()
    den, counters = _two_device_denoisers(kind)
    ref_den = den if kind == 'module' else pixel_denoiser
    seq = PatchGroupSampler(patch_size=V, stride=STRIDE, batch_size=8)
    par = PatchGroupSampler(patch_size=V, stride=STRIDE, batch_size=8, devices=['cpu', 'cpu'],
                            device_groups=device_groups)
    ref, ref_report = seq.sample(ref_den, y0, conf, cond=y0, seed=4)
    out, report = par.sample(den, y0, conf, cond=y0, seed=4)
    assert torch.equal(out, ref)
    assert report.denoiser_calls == ref_report.denoiser_calls
    assert report.nfe_total == ref_report.nfe_total
    if counters is not None:
        n = report.patches_per_group
        calls = [math.ceil(c / 8) * s for c, s in zip(n, [8, 14, 20])]
        assert counters[0].calls + counters[1].calls == sum(calls) == report.denoiser_calls
        assert counters[0].calls > 0 and counters[1].calls > 0
        if device_groups is not None:
            assert counters[0].calls == calls[2] and counters[1].calls == calls[0] + calls[1]


def test_an_error_in_one_device_thread_propagates():
    _, y0 = latents()

    def bad(x_t, t, c):
        raise RuntimeError('boom on device 1')

    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, devices=['cpu', 'cpu'], device_groups=[[2], [0, 1]])
    with pytest.raises(RuntimeError, match='boom on device 1'):
        sampler.sample([pixel_denoiser, bad], y0, mixed_confidence(), cond=y0)


def test_device_denoiser_list_length_and_plain_function_on_two_devices():
    _, y0 = latents(b=1)
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, devices=['cpu', 'cpu'])
    with pytest.raises(ConfigError):
        sampler.sample([pixel_denoiser], y0, mixed_confidence(b=1), cond=y0)
    two_kinds = PatchGroupSampler(patch_size=V, stride=STRIDE, devices=['cpu', 'meta'])
    with pytest.raises(ConfigError):
        two_kinds.sample(pixel_denoiser, y0, mixed_confidence(b=1), cond=y0)


# ---------------------------------------------------------------- 6. errors
@pytest.mark.parametrize('make', [
    lambda c: c.index_fill(3, torch.tensor([5]), float('nan')), lambda c: c + 0.5, lambda c: c - 0.5,
    lambda c: c[..., :-1], lambda c: c[:1], lambda c: c.repeat(1, 2, 1, 1)])
def test_bad_confidence_is_an_input_error(make):
    x0, y0 = latents()
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE)
    with pytest.raises(InputError):
        sampler.sample(oracle(sampler, 'sample'), y0, make(mixed_confidence()), cond=x0)


def test_several_groups_need_a_confidence_map():
    x0, y0 = latents()
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE)
    with pytest.raises(InputError):
        sampler.sample(oracle(sampler, 'sample'), y0, None, cond=x0)
    single = PatchGroupSampler(patch_size=V, stride=STRIDE, groups=[(1000, 20)])
    out, report = single.sample(oracle(single, 'sample'), y0, None, cond=x0)
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)
    assert (report.groups == 0).all() and (report.qmap == 1).all() and report.thresholds.shape == (2, 0)


@pytest.mark.parametrize('bad_out', [lambda x: x[:, :3], lambda x: x[:1], lambda x: x.flatten(1), lambda x: 1.0])
def test_denoiser_with_the_wrong_output_is_an_input_error(bad_out):
    _, y0 = latents()
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE)
    with pytest.raises(InputError):
        sampler.sample(lambda x, t, c: bad_out(x), y0, mixed_confidence())


@pytest.mark.parametrize('y0', [torch.zeros(4, 24, 32), torch.zeros(1, 4, 24, 32, dtype=torch.long), None])
def test_bad_y0_is_an_input_error(y0):
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, groups=[(1000, 20)])
    with pytest.raises(InputError):
        sampler.sample(pixel_denoiser, y0)


def test_groups_override():
    x0, y0 = latents()
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE)
    m = PatchGrid.for_shape(24, 32, V, STRIDE).num_patches
    groups = (torch.arange(2 * m) % 3).view(2, m)
    den = CountingDenoiser(oracle(sampler, 'sample'))
    out, report = sampler.sample(den, y0, None, cond=x0, groups=groups)
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)
    assert torch.equal(report.groups, groups)
    assert report.patches_per_group == tuple(int((groups == g).sum()) for g in range(3))
    assert torch.isnan(report.qmap).all() and report.qmap.shape == (2, m)
    assert den.nfe == report.nfe_total == int(torch.tensor([8, 14, 20])[groups].sum())


@pytest.mark.parametrize('bad', [
    lambda g: g[:, :-1], lambda g: g[:1], lambda g: g.flatten(), lambda g: g.index_fill(1, torch.tensor([0]), -1),
    lambda g: g.index_fill(1, torch.tensor([0]), 3)])
def test_bad_groups_override_is_an_input_error(bad):
    x0, y0 = latents()
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE)
    m = PatchGrid.for_shape(24, 32, V, STRIDE).num_patches
    with pytest.raises(InputError):
        sampler.sample(oracle(sampler, 'sample'), y0, None, cond=x0, groups=bad(torch.zeros(2, m, dtype=torch.long)))


@pytest.mark.parametrize('options', [
    dict(groups=[(1001, 20)]), dict(groups=[(400, 8), (700, 14), (1000, 1001)]), dict(groups=[(10, 11)]),
    dict(groups=[(0, 1)]), dict(groups=[(100, 0)]), dict(groups=[]), dict(groups=[{'tau': 400}]),
    dict(groups=[{'tau': 400, 'steps': 8, 'eta': 0}]), dict(groups=[(400, 8, 1)]),
    dict(scheduler=dict(type='NoSuchScheduler')), dict(scheduler=dict(type='DDIMScheduler', beta_schedul='linear')),
    dict(scheduler=dict(type='DDIMScheduler', thresholding=True)), dict(prediction_type='x0'),
    dict(devices=['cpu', 'cpu'], device_groups=[[0], [1]]), dict(devices=['cpu', 'cpu'], device_groups=[[0, 1, 2]]),
    dict(devices=['cpu', 'cpu'], device_groups=[[0, 1], [1, 2]]), dict(device_groups=[[0, 1]]),
    dict(device_groups=[[0], [1, 2]], device_split='paper'), dict(device_split='hard-first'),
    dict(devices=['cpu'] * 3, device_split='paper'),
    dict(batch_size=0), dict(patch_size=8, stride=9), dict(patch_size=8, stride=0),
    dict(grouping=dict(thresholds=[0.5, 0.9])), dict(grouping=dict(mode='share', shares=[0.5, 0.5]))])
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        PatchGroupSampler(**options)


@pytest.mark.parametrize('options', [dict(blend='hann'), dict(blend_sigma=0.0)])
def test_bad_blend_options_fail_at_construction(options):
    with pytest.raises(ConfigError):
        PatchGroupSampler(patch_size=V, stride=STRIDE, groups=[(1000, 20)], **options)


@pytest.mark.parametrize('path', SAMPLER_YMLS)
def test_build_sampler_from_the_yaml_files(path):
    sampler = build_sampler(path)
    assert isinstance(sampler, PatchGroupSampler)
    assert sampler.timesteps == PAPER_TIMESTEPS
    assert sampler.groups == [(400, 8), (700, 14), (1000, 20)]
    assert (sampler.patch_size, sampler.stride) == (16, 8)
    assert type(sampler.scheduler).__name__ == 'DDIMScheduler'
    if path.endswith('pgs_paper.yml'):
        assert sampler.assigner.mode == 'threshold' and sampler.assigner.values == [0.95, 0.75]
        assert sampler.prediction_type == 'sample'
    else:
        assert sampler.assigner.mode == 'share' and sampler.assigner.values == [0.4, 0.3, 0.3]
        assert sampler.prediction_type == 'epsilon'
        assert sampler.scheduler.config.beta_schedule == 'scaled_linear'
    # and it samples: a 32x32 latent with V=16 has 9 patches
    x0, y0 = latents(b=1, h=32, w=32)
    kind = sampler.prediction_type
    out, report = sampler.sample(oracle(sampler, kind), y0, mixed_confidence(b=1, h=32, w=32), cond=x0)
    assert report.num_patches == 9
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize('name', ['pgs_cosine.yml', 'pgs_demo.yml'])
def test_the_cpu_demo_sampler_files(name):
    """pgs_cosine.yml: the paper's groups and walk on the cosine schedule; pgs_demo.yml: the same groups, each
    walk ending at t = 0 (respaced), at temperature 0.3. Both keep the paper's τ / N / γ / V."""
    sampler = build_sampler(os.path.join(ROOT, 'options', 'samplers', name))
    assert sampler.groups == [(400, 8), (700, 14), (1000, 20)] and (sampler.patch_size, sampler.stride) == (16, 8)
    assert sampler.assigner.mode == 'threshold' and sampler.assigner.values == [0.95, 0.75]
    assert sampler.scheduler.config.beta_schedule == 'squaredcos_cap_v2' and sampler.eta == 0
    if name == 'pgs_cosine.yml':
        assert sampler.timesteps == PAPER_TIMESTEPS and sampler.temperature == 1
    else:
        assert [ts[0] for ts in sampler.timesteps] == [399, 699, 999] and {ts[-1] for ts in sampler.timesteps} == {0}
        assert [len(ts) for ts in sampler.timesteps] == [8, 14, 20] and sampler.temperature == 0.3
    x0, y0 = latents(b=1, h=32, w=32)  # an x0 oracle is still answered exactly, whatever the temperature
    out, _ = sampler.sample(oracle(sampler, 'sample'), y0, mixed_confidence(b=1, h=32, w=32), cond=x0)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize('opt,suggestion', [
    (dict(type='PatchGroupSampler', patch_sise=16), 'patch_size'),
    ({'sampler': dict(type='PatchGroupSampler', bach_size=4)}, 'batch_size')])
def test_build_sampler_unknown_key_suggests(opt, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean '{suggestion}'"):
        build_sampler(opt)


def test_build_sampler_unknown_type_is_a_config_error():
    with pytest.raises(ConfigError, match='did you mean'):
        build_sampler(dict(type='PatchGroupSamplr'))


# ---------------------------------------------------------------- 7. pluggable diffusers schedulers
def _scheduler_instance():
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type='sample')


@pytest.mark.parametrize('scheduler', [
    dict(type='DPMSolverMultistepScheduler', num_train_timesteps=1000, beta_schedule='linear'),
    dict(type='EulerDiscreteScheduler', num_train_timesteps=1000),
    dict(type='DDPMScheduler', num_train_timesteps=1000, clip_sample=False), 'instance'])
def test_pluggable_schedulers_with_the_x0_oracle(scheduler):
    x0, y0 = latents()
    scheduler = _scheduler_instance() if scheduler == 'instance' else scheduler
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, scheduler=scheduler)
    assert sampler.scheduler.config.prediction_type == 'sample' or type(sampler.scheduler).__name__ == 'DDPMScheduler'
    den = CountingDenoiser(lambda x_t, t, c: c)
    out, report = sampler.sample(den, y0, mixed_confidence(), cond=x0)
    assert all(report.patches_per_group)
    assert den.nfe == report.nfe_total == sum(n * s for n, s in zip(report.patches_per_group, [8, 14, 20]))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize('type_', ['DDIMScheduler', 'DDPMScheduler'])
def test_clip_sample_of_the_scheduler_config_clamps_the_x0_estimate(type_):
    x0, y0 = latents()
    x0 = x0 * 2  # well outside [-1, 1]
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, scheduler=dict(type=type_, clip_sample=True,
                                                                            clip_sample_range=1.5))
    out, _ = sampler.sample(lambda x_t, t, c: c, y0, mixed_confidence(), cond=x0)
    assert x0.abs().max() > 3
    torch.testing.assert_close(out, x0.clamp(-1.5, 1.5), atol=1e-6, rtol=0)


def test_scheduler_without_custom_timesteps_is_a_config_error():
    with pytest.raises(ConfigError, match='custom timesteps'):
        PatchGroupSampler(scheduler=dict(type='EulerAncestralDiscreteScheduler'))


# ---------------------------------------------------------------- 8. eta > 0
def test_eta_is_stochastic_but_seeded():
    _, y0 = latents()
    conf = mixed_confidence()
    det = PatchGroupSampler(patch_size=V, stride=STRIDE, eta=0.0)
    sto = PatchGroupSampler(patch_size=V, stride=STRIDE, eta=1.0)
    a = sto.sample(pixel_denoiser, y0, conf, cond=y0, seed=3)[0]
    b = sto.sample(pixel_denoiser, y0, conf, cond=y0, seed=3)[0]
    c = sto.sample(pixel_denoiser, y0, conf, cond=y0, seed=4)[0]
    d = det.sample(pixel_denoiser, y0, conf, cond=y0, seed=3)[0]
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2 and (a - d).abs().max() > 1e-2


def test_stochastic_steps_do_not_depend_on_the_batch_size():
    """η > 0: the step noise is one draw per latent pixel and timestep, read patch by patch, like ε."""
    _, y0 = latents()
    conf = mixed_confidence()
    outs = [PatchGroupSampler(patch_size=V, stride=STRIDE, eta=0.8, batch_size=bs).sample(
        pixel_denoiser, y0, conf, cond=y0, seed=5)[0] for bs in (1, 7, 64)]
    det = PatchGroupSampler(patch_size=V, stride=STRIDE).sample(pixel_denoiser, y0, conf, cond=y0, seed=5)[0]
    assert (outs[0] - det).abs().max() > 1e-2
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=0)


def test_eta_with_the_x0_oracle_still_returns_x0():
    x0, y0 = latents()
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, eta=1.0)
    out, _ = sampler.sample(oracle(sampler, 'sample'), y0, mixed_confidence(), cond=x0)
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- 8b. temperature
class FirstInput:
    """Records x_t of every call at each patch's first timestep (the start y_τ of Eq. 7)."""
    def __init__(self, fn):
        self.fn, self.first = fn, {}

    def __call__(self, x_t, t, cond):
        self.first.setdefault(int(t[0]), []).append(x_t.clone())
        return self.fn(x_t, t, cond)


def test_temperature_scales_the_start_noise_of_eq7_exactly():
    """y_τ = sqrt(ᾱ_τ)·y0 + temperature·sqrt(1 - ᾱ_τ)·ε, with the ε of temperature 1 (one group, one batch)."""
    _, y0 = latents(b=1)
    starts = {}
    for temp in (1.0, 0.3, 0.0):
        rec = FirstInput(pixel_denoiser)
        PatchGroupSampler(patch_size=V, stride=STRIDE, groups=[(400, 8)], temperature=temp, batch_size=1000).sample(
            rec, y0, None, cond=y0, seed=2)
        starts[temp] = torch.cat(rec.first[399])
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, groups=[(400, 8)])
    a = float(sampler.scheduler.alphas_cumprod[399])
    grid = PatchGrid.for_shape(24, 32, V, STRIDE)
    y0_patches = grid.gather(y0, torch.arange(grid.num_patches))
    torch.testing.assert_close(starts[0.0], math.sqrt(a) * y0_patches, atol=1e-6, rtol=0)
    noise_part = starts[1.0] - math.sqrt(a) * y0_patches
    assert noise_part.std() > 0.5  # really noisy at τ = 400
    torch.testing.assert_close(starts[0.3] - math.sqrt(a) * y0_patches, 0.3 * noise_part, atol=1e-5, rtol=0)


@pytest.mark.parametrize('walk', [dict(), dict(execution='per_step'), dict(fuse_overlaps=True)])
def test_temperature_scales_the_step_noise_in_every_walk(walk):
    """η > 0 on a per-pixel denoiser: the walk is affine in the noise, so temperature t gives
    out(t) = out(0) + t·(out(1) - out(0)), the start and every step's noise scaled alike."""
    _, y0 = latents()
    conf = mixed_confidence()
    out = {temp: PatchGroupSampler(patch_size=V, stride=STRIDE, eta=1.0, temperature=temp, **walk).sample(
        pixel_denoiser, y0, conf, cond=y0, seed=7)[0].double() for temp in (0.0, 0.5, 1.0)}
    assert (out[1.0] - out[0.0]).abs().max() > 1e-2
    torch.testing.assert_close(out[0.5], out[0.0] + 0.5 * (out[1.0] - out[0.0]), atol=1e-5, rtol=0)


def test_temperature_zero_with_eta_zero_is_deterministic_and_default_is_one():
    _, y0 = latents()
    conf = mixed_confidence()
    cold = PatchGroupSampler(patch_size=V, stride=STRIDE, temperature=0)
    a = cold.sample(pixel_denoiser, y0, conf, cond=y0, seed=1)[0]
    b = cold.sample(pixel_denoiser, y0, conf, cond=y0, seed=2)[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # no noise left: the seed does not matter
    assert PatchGroupSampler().temperature == 1.0
    default = PatchGroupSampler(patch_size=V, stride=STRIDE).sample(pixel_denoiser, y0, conf, cond=y0, seed=1)[0]
    one = PatchGroupSampler(patch_size=V, stride=STRIDE, temperature=1).sample(pixel_denoiser, y0, conf, cond=y0,
                                                                               seed=1)[0]
    assert torch.equal(default, one)


@pytest.mark.parametrize('bad', [-0.1, float('nan'), float('inf'), '0.3', True, None])
def test_bad_temperature_is_a_config_error(bad):
    with pytest.raises(ConfigError, match='temperature'):
        PatchGroupSampler(temperature=bad)


# ---------------------------------------------------------------- 9. the Qmap / groups picture
@pytest.mark.parametrize('gray', [False, True])
@pytest.mark.parametrize('override', [False, True])
def test_qmap_overlay(gray, override):
    x0, y0 = latents(b=1)
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE)
    m = PatchGrid.for_shape(24, 32, V, STRIDE).num_patches
    groups = (torch.arange(m) % 3).view(1, m) if override else None
    _, report = sampler.sample(oracle(sampler, 'sample'), y0, mixed_confidence(b=1), cond=x0, groups=groups)
    h, w = 8 * 24, 8 * 32
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w) if gray else (h, w, 3), dtype=np.uint8)
    strip = qmap_overlay(image, report.qmap[0], report.groups[0], report.grid, sampler.group_names)
    assert strip.dtype == np.uint8 and strip.ndim == 3 and strip.shape[2] == 3
    assert h <= strip.shape[0] < h + 64
    assert strip.shape[1] >= 3 * w
    colour = np.repeat(image[..., None], 3, 2) if gray else image
    assert np.array_equal(strip[-h:, :w], colour)  # the first panel is the image itself
    assert not np.array_equal(strip[-h:, -w:], colour)  # the groups panel is drawn over it


def test_ddim_from_a_dict_does_not_clamp_latents_unless_asked():
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, scheduler=dict(type='DDIMScheduler'))
    assert sampler.scheduler.config.clip_sample is False  # diffusers' default (True) clamps x0 to ±1


def test_float_group_override_is_an_input_error():
    y0 = torch.zeros(1, 4, V, V)
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE)
    with pytest.raises(InputError, match='integer'):
        sampler.sample(lambda x, t, c: x, y0, groups=torch.zeros(1, 1))


def test_prediction_type_comes_from_the_scheduler_and_a_contradiction_is_an_error():
    from diffusers import DDIMScheduler
    eps = DDIMScheduler(num_train_timesteps=1000, prediction_type='epsilon', clip_sample=False)
    assert PatchGroupSampler(patch_size=V, stride=STRIDE, scheduler=eps).prediction_type == 'epsilon'
    assert PatchGroupSampler(patch_size=V, stride=STRIDE).prediction_type == 'sample'  # Patch-DiT's default
    with pytest.raises(ConfigError, match='contradicts'):
        PatchGroupSampler(patch_size=V, stride=STRIDE, scheduler=eps, prediction_type='sample')


def test_nfe_counts_every_call_of_a_two_call_per_step_scheduler():
    x0, y0 = latents()
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, scheduler=dict(type='HeunDiscreteScheduler'))
    assert sampler.calls == [2 * 8 - 1, 2 * 14 - 1, 2 * 20 - 1]  # Heun: two evaluations per step but the last
    den = CountingDenoiser(lambda x_t, t, c: c)
    _, report = sampler.sample(den, y0, mixed_confidence(), cond=x0)
    assert den.nfe == report.nfe_total == sum(n * c for n, c in zip(report.patches_per_group, sampler.calls))
    assert report.nfe_uniform == 39 * report.num_patches


def test_stochastic_diffusers_scheduler_is_seeded():
    x0, y0 = latents()
    sde = dict(type='DPMSolverMultistepScheduler', algorithm_type='sde-dpmsolver++', prediction_type='sample')
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, scheduler=sde)
    den = pixel_denoiser
    a, _ = sampler.sample(den, y0, mixed_confidence(), cond=y0, seed=1)
    b, _ = sampler.sample(den, y0, mixed_confidence(), cond=y0, seed=1)
    c, _ = sampler.sample(den, y0, mixed_confidence(), cond=y0, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize('timesteps,dtype', [([999.5, 612.25, 301.75, 20.5], torch.float32),
                                              ([999, 612, 301, 20], torch.long)])
def test_the_denoiser_gets_the_schedulers_own_timesteps_fractional_or_not(timesteps, dtype):
    """Euler on custom float timesteps (a sigma schedule between the training steps): the denoiser sees them as
    they are, a float tensor, not truncated to 999, 612, ...; integral ones stay long."""
    from diffusers import EulerDiscreteScheduler
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, prediction_type='sample')
    seen = []

    def den(x_t, t, c):
        seen.append(t)
        return c
    _, y0 = latents(b=1, h=V, w=V)
    noise = torch.randn(y0.shape, generator=torch.Generator().manual_seed(0))
    out = denoise(den, y0, noise, y0, timesteps, sched, 'sample')
    assert [tuple(t.shape) for t in seen] == [(1,)] * 4 and all(t.dtype == dtype for t in seen)
    assert [float(t[0]) for t in seen] == timesteps
    torch.testing.assert_close(out, y0)


def test_eta_is_refused_for_schedulers_with_their_own_update():
    with pytest.raises(ConfigError, match='eta'):
        PatchGroupSampler(scheduler=dict(type='DPMSolverMultistepScheduler'), eta=0.5)


@pytest.mark.parametrize('devices', [None, ['cpu', 'cpu']])
def test_denoiser_sees_the_callers_grad_mode_and_autocast_in_every_thread(devices):
    x0, y0 = latents()
    seen = []

    def den(x_t, t, c):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled('cpu'), x_t.requires_grad))
        return c
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, devices=devices)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        sampler.sample(den, y0, mixed_confidence(), cond=x0)
    assert seen and all(s == (False, True, False) for s in seen)


@pytest.mark.parametrize('h,w', [(24, 32), (5, 32)])  # (5, 32): a side below V, padded
def test_pgs_streams_patches_instead_of_holding_them(monkeypatch, h, w):
    """Bounded memory on large latents: the sampler never makes the full patch set of y0, the noise or the
    conditioning (each 4x the latent at stride V/2); it reads each batch's patches and blends them in as they
    come, with the result of the patch-set way of doing it (patchify, denoise each, blend)."""
    _, y0 = latents(h=h, w=w)
    conf = mixed_confidence(h=h, w=w)
    sampler = PatchGroupSampler(patch_size=V, stride=STRIDE, batch_size=5)
    seen = []

    def denoiser(x_t, t, cond):
        seen.append(len(x_t))
        return pixel_denoiser(x_t, t, cond)
    with monkeypatch.context() as m:
        m.setattr(PatchGrid, 'patchify', lambda *a, **k: pytest.fail('PGS patchified a whole tensor'))
        m.setattr(PatchGrid, 'blend', lambda *a, **k: pytest.fail('PGS blended a full patch set'))
        out, report = sampler.sample(denoiser, y0, conf, cond=y0, seed=3)
    assert max(seen) <= 5 and report.denoiser_calls == len(seen)
    grid = report.grid
    # the same computation on the full patch set, one group at a time
    noise = torch.randn(*y0.shape[:2], *grid.padded_size, generator=torch.Generator().manual_seed(3))
    noise_p = PatchGrid.for_shape(*grid.padded_size, V, STRIDE).patchify(noise).flatten(0, 1)
    y0_p = grid.patchify(y0).flatten(0, 1)
    full = torch.empty_like(y0_p)
    for g in range(3):
        idx = torch.nonzero(report.groups.flatten() == g).flatten()
        full[idx] = denoise(pixel_denoiser, y0_p[idx], noise_p[idx], y0_p[idx], sampler.timesteps[g],
                            sampler.scheduler, sampler.prediction_type)
    expected = grid.blend(full.view(len(y0), grid.num_patches, *full.shape[1:]))
    assert (expected - y0).abs().max() > 0.1
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_temperature_zero_scales_the_step_noise_away_too():
    """η > 0 at temperature 0: no noise is left anywhere, so the seed does not matter (it would if only the start
    noise were scaled)."""
    _, y0 = latents()
    conf = mixed_confidence()
    for walk in (dict(), dict(execution='per_step'), dict(fuse_overlaps=True)):
        cold = PatchGroupSampler(patch_size=V, stride=STRIDE, eta=1.0, temperature=0, **walk)
        a = cold.sample(pixel_denoiser, y0, conf, cond=y0, seed=1)[0]
        b = cold.sample(pixel_denoiser, y0, conf, cond=y0, seed=2)[0]
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)

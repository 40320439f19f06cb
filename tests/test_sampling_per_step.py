"""Step-synchronous PGS (``execution: per_step``, patchscaler/sampling/stepwise.py): the same result as the per-group
walk with fewer denoiser calls; calls, chunking, conditioning, fusion, options."""
import math
import os
from collections import Counter

import pytest
import torch
import yaml

import patchscaler  # noqa: F401  (compat fixes before BasicSR)
from patchscaler.archs.patch_dit_arch import PatchDiT
from patchscaler.sampling import PAPER_GROUPS, PatchGrid, PatchGroupSampler, PerPatch, build_sampler
from patchscaler.sampling.stepwise import ActivePatches, Segment, count_calls, union_walk
from patchscaler.utils.errors import ConfigError, InputError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
V, STRIDE = 8, 4
SHARES = {'mode': 'share', 'shares': [0.4, 0.3, 0.3]}
CONFIGS = {
    'paper': dict(groups=PAPER_GROUPS, grouping=SHARES),
    'non_aligned': dict(groups=[(500, 7), (1000, 20)], grouping={'mode': 'share', 'shares': [0.5, 0.5]}),
    'G4': dict(groups=[(300, 6), (500, 7), (900, 13), (1000, 20)],
               grouping={'mode': 'share', 'shares': [0.3, 0.2, 0.2, 0.3]}),
}


def inputs(b=2, h=24, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, h, w, generator=g), torch.rand(b, 1, h, w, generator=g)


def make(execution, **options):
    return PatchGroupSampler(**{'patch_size': V, 'stride': STRIDE, **CONFIGS['paper'], **options,
                                'execution': execution})


def nonlinear(x_t, t, c):
    """Per patch (it mixes a patch's pixels, never two patches), nonlinear, t-dependent, reads spatial and
    PerPatch conditioning."""
    s = t.to(x_t.dtype).view(-1, 1, 1, 1) / 1000
    mean = x_t.mean((1, 2, 3), keepdim=True)
    return c['y0'] + 0.5 * (1 - s) * torch.tanh(x_t - c['y0']) + 0.1 * c['emb'].view(-1, 1, 1, 1) * mean


class Recorder:
    """Records each call's timestep and patch ids (the PerPatch ``id`` of the cond)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x_t, t, c):
        assert t.dtype == torch.long and (t == t[0]).all()
        self.calls.append((int(t[0]), c['id'].tolist()))
        return self.fn(x_t, t, c)


def cond_of(y0):
    b, m = y0.shape[0], PatchGrid.for_shape(*y0.shape[-2:], V, STRIDE).num_patches
    emb = torch.linspace(-1, 1, b * m).view(b, m)
    return {'y0': y0, 'emb': PerPatch(emb), 'id': PerPatch(torch.arange(b * m).view(b, m)), 'scale': 2.5}


# ---------------------------------------------------------------- the same result
def tiny_dit():
    net = PatchDiT(4, V, 2, hidden_size=32, depth=1, num_heads=2, prompt_dim=16).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the zero init, which returns y0 exactly whatever x_t, t and the prompt
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return net


@pytest.mark.parametrize('batch_size', [5, 1000])
def test_per_step_equals_per_group_with_a_tiny_patch_dit_and_a_prompt(batch_size):
    """In float64: in float32 this random DiT amplifies the rounding of differently blocked matrix products over
    20 steps to ~3e-5, with per_group alone at another batch size as much as against per_step."""
    y0, conf = inputs()
    y0 = y0.double()
    net, proj = tiny_dit().double(), torch.nn.Linear(4 * V * V, 2 * 16).double()
    prepared = []

    def prepare(c):
        prepared.append(len(c['y0']))
        return {**c, 'prompt': proj(c['y0'].flatten(1)).view(-1, 2, 16)}

    def den(x_t, t, c):
        return net(x_t, t, c['y0'], c['prompt']) + 0.1 * c['emb'].view(-1, 1, 1, 1)

    out = {}
    for execution in ('per_group', 'per_step'):
        prepared.clear()
        out[execution] = make(execution, batch_size=batch_size).sample(den, y0, conf, cond=cond_of(y0),
                                                                       prepare_cond=prepare)
        assert out[execution][1].cond_calls == len(prepared) and sum(prepared) == out[execution][1].num_patches
    (ref, rr), (x, r) = out['per_group'], out['per_step']
    assert (ref - y0).abs().max() > 0.05 and x.dtype == torch.float64  # the denoiser did something
    torch.testing.assert_close(x, ref, atol=1e-10, rtol=0)
    counts = rr.patches_per_group
    assert all(counts) and r.patches_per_group == counts and r.nfe_total == rr.nfe_total
    assert r.cond_calls == rr.cond_calls == sum(math.ceil(n / batch_size) for n in counts)
    assert (rr.execution, r.execution) == ('per_group', 'per_step')
    assert rr.denoiser_calls == sum(math.ceil(n / batch_size) * s for n, s in zip(counts, (8, 14, 20)))
    assert r.denoiser_calls == count_calls([list(ts) for ts in r.timesteps], counts, batch_size)
    assert r.denoiser_calls < rr.denoiser_calls


@pytest.mark.parametrize('eta', [0.0, 0.7])
@pytest.mark.parametrize('config', sorted(CONFIGS))
def test_per_step_equals_per_group_for_aligned_and_unaligned_schedules(config, eta):
    y0, conf = inputs()
    opts = dict(CONFIGS[config], batch_size=6, eta=eta)
    ref, rr = make('per_group', **opts).sample(nonlinear, y0, conf, cond=cond_of(y0), seed=3)
    x, r = make('per_step', **opts).sample(Recorder(nonlinear), y0, conf, cond=cond_of(y0), seed=3)
    assert r.aligned is (config == 'paper') and all(r.patches_per_group)
    assert (ref - y0).abs().max() > 0.05
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
    assert r.nfe_total == rr.nfe_total
    assert r.denoiser_calls == count_calls([list(ts) for ts in r.timesteps], r.patches_per_group, 6)
    assert r.denoiser_calls < rr.denoiser_calls if config != 'non_aligned' else r.denoiser_calls == rr.denoiser_calls


def test_every_patch_steps_once_at_each_timestep_of_its_group_whatever_the_union():
    y0, conf = inputs()
    s = make('per_step', **CONFIGS['non_aligned'], batch_size=7)
    den = Recorder(nonlinear)
    _, report = s.sample(den, y0, conf, cond=cond_of(y0))
    groups = report.groups.flatten()
    seen = Counter((i, t) for t, ids in den.calls for i in ids)
    expected = Counter((i, t) for i in range(len(groups)) for t in s.timesteps[int(groups[i])])
    assert seen == expected
    # the walk goes down the union once: 7 + 20 timesteps, 499 shared by both groups
    ts = [t for t, _ in den.calls]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == 26 == len(set(s.timesteps[0]) | set(s.timesteps[1]))


# ---------------------------------------------------------------- calls
def test_paper_groups_in_one_batch_take_exactly_20_calls():
    y0, conf = inputs()
    m = 2 * PatchGrid.for_shape(24, 32, V, STRIDE).num_patches
    den = Recorder(nonlinear)
    _, r = make('per_step', batch_size=m).sample(den, y0, conf, cond=cond_of(y0))
    _, rr = make('per_group', batch_size=m).sample(nonlinear, y0, conf, cond=cond_of(y0))
    n = r.patches_per_group
    assert r.denoiser_calls == len(den.calls) == 20 and rr.denoiser_calls == 8 + 14 + 20
    hard_entered = {999 - 50 * k: n[2] for k in range(6)} | {699 - 50 * k: n[1] + n[2] for k in range(6)}
    assert [(t, len(ids)) for t, ids in den.calls] == [(t, hard_entered.get(t, m)) for t in range(999, 48, -50)]
    assert r.mean_patches_per_call == r.nfe_total / 20 and isinstance(r.mean_patches_per_call, float)
    assert rr.mean_patches_per_call == rr.nfe_total / 42
    assert '20 denoiser calls' in r.summary() and 'per_step' in r.summary()


def test_the_active_set_is_cut_into_calls_of_batch_size_across_groups():
    y0, conf = inputs()
    den = Recorder(nonlinear)
    s = make('per_step', batch_size=7)
    _, r = s.sample(den, y0, conf, cond=cond_of(y0))
    groups = r.groups.flatten()
    active = Counter(t for i in range(len(groups)) for t in s.timesteps[int(groups[i])])
    assert max(len(ids) for _, ids in den.calls) == 7
    assert Counter(t for t, _ in den.calls) == {t: math.ceil(n / 7) for t, n in active.items()}
    assert any(len({int(groups[i]) for i in ids}) > 1 for _, ids in den.calls)  # calls mix groups


def test_active_patches_cuts_segments_into_calls():
    segs = [Segment(g, torch.arange(n), None) for g, n in ((2, 5), (2, 2), (1, 4))]
    active = ActivePatches(4)
    active.enter(segs)
    rows = [[(s.group, lo, hi) for s, lo, hi in call] for call in active.calls((1, 2))]
    assert rows == [[(2, 0, 4)], [(2, 4, 5), (2, 0, 2), (1, 0, 1)], [(1, 1, 4)]]
    assert [[(s.group, lo, hi) for s, lo, hi in c] for c in active.calls((1,))] == [[(1, 0, 4)]]
    per_group = ActivePatches(4, across_groups=False)
    per_group.enter(segs)
    assert [len(c[0][0]) for c in per_group.calls((1, 2))] == [5, 2, 4]
    assert active.leave((2,)) == segs[:2] and active.segments == segs[2:]


def test_union_walk():
    steps = union_walk([[499, 300], [], [999, 499, 49]])
    assert [s.t for s in steps] == [999, 499, 300, 49]
    assert [s.groups for s in steps] == [(2,), (0, 2), (0,), (2,)]
    assert steps[1].entering == (0,) and steps[1].prev == {0: 300, 2: 49}
    assert steps[2].leaving == (0,) and steps[2].prev == {0: -1} and steps[3].leaving == (2,)


@pytest.mark.parametrize('execution,fuse', [('per_group', False), ('per_step', False), ('per_step', True)])
def test_progress_bar_counts_every_call(monkeypatch, execution, fuse):
    import tqdm
    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True
    monkeypatch.setattr(tqdm, 'tqdm', Bar)
    y0, conf = inputs()
    _, r = make(execution, batch_size=9, progress=True, fuse_overlaps=fuse).sample(nonlinear, y0, conf,
                                                                                 cond=cond_of(y0))
    assert len(bars) == 1 and bars[0].total == bars[0].n == r.denoiser_calls and bars[0].closed


# ---------------------------------------------------------------- conditioning
def test_prepare_cond_runs_once_per_entry_batch_and_follows_its_patches_into_merged_calls():
    y0, conf = inputs()
    grid = PatchGrid.for_shape(24, 32, V, STRIDE)
    y0_p = grid.patchify(y0).flatten(0, 1)
    s = make('per_step', batch_size=6)
    entries, checks = [], []

    def prepare(c):
        entries.append((len(den_calls), c['id'].tolist()))
        return {**c, 'twice': 2 * c['y0']}

    den_calls = []

    def den(x_t, t, c):
        den_calls.append((int(t[0]), c['id'].tolist()))
        checks.append(torch.equal(c['y0'], y0_p[c['id']]) and torch.equal(c['twice'], 2 * c['y0']))
        checks.append(c['scale'] == 2.5)
        return nonlinear(x_t, t, c)

    _, r = s.sample(den, y0, conf, cond=cond_of(y0), prepare_cond=prepare)
    assert checks and all(checks)
    groups = r.groups.flatten()
    assert r.cond_calls == len(entries) == sum(math.ceil(n / 6) for n in r.patches_per_group)
    for before, ids in entries:  # prepared at the group's entry: the next call is at its first timestep
        g = int(groups[ids[0]])
        assert all(int(groups[i]) == g for i in ids)
        first = next(t for t, call in den_calls[before:] if set(ids) & set(call))
        assert first == s.timesteps[g][0] and all(t <= first for t, call in den_calls if set(ids) & set(call))


def test_conditioning_that_cannot_be_merged_is_an_input_error():
    y0, conf = inputs()
    s = make('per_step', batch_size=6)
    with pytest.raises(InputError, match='per_step'):
        s.sample(nonlinear, y0, conf, cond=cond_of(y0), prepare_cond=lambda c: {**c, 'token': object()})
    # the same object in every batch, or equal plain values, are passed through
    token = object()
    out, _ = s.sample(lambda x, t, c: nonlinear(x, t, c) if c['token'] is token and c['n'] == [1] else None, y0,
                      conf, cond=cond_of(y0), prepare_cond=lambda c: {**c, 'token': token, 'n': [1]})
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- overlap fusion
@pytest.mark.parametrize('config', ['paper', 'non_aligned'])
def test_fused_per_step_equals_the_fused_per_group_walk(config):
    y0, conf = inputs()
    opts = dict(CONFIGS[config], fuse_overlaps=True)
    m = 2 * PatchGrid.for_shape(24, 32, V, STRIDE).num_patches
    for batch_size in (5, m):
        ref, rr = make('per_group', batch_size=batch_size, **opts).sample(nonlinear, y0, conf, cond=cond_of(y0))
        x, r = make('per_step', batch_size=batch_size, **opts).sample(nonlinear, y0, conf, cond=cond_of(y0))
        plain = make('per_group', batch_size=batch_size, **CONFIGS[config]).sample(nonlinear, y0, conf,
                                                                                   cond=cond_of(y0))[0]
        assert not torch.allclose(ref, plain, atol=1e-4)  # fusion did fuse
        torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)
        assert r.nfe_total == rr.nfe_total and r.cond_calls == rr.cond_calls
        assert rr.denoiser_calls == sum(math.ceil(n / batch_size) * len(ts)
                                        for n, ts in zip(rr.patches_per_group, rr.timesteps))
        if config == 'paper' and batch_size == m:
            assert r.denoiser_calls == 20
        if config == 'non_aligned':  # one timeline per group: calls cannot be shared across groups
            assert r.denoiser_calls == rr.denoiser_calls


# ---------------------------------------------------------------- options
def test_bad_execution_and_what_per_step_refuses_are_config_errors():
    with pytest.raises(ConfigError, match='per_group'):
        make('per_patch')
    with pytest.raises(ConfigError, match='devices'):
        make('per_step', devices=['cpu', 'cpu'])
    with pytest.raises(ConfigError, match='DDIMScheduler'):
        make('per_step', scheduler={'type': 'DPMSolverMultistepScheduler'})
    assert make('per_step', devices=['cpu']).execution == 'per_step'  # one device is fine
    assert PatchGroupSampler().execution == 'per_group'


def test_execution_from_a_yaml_file(tmp_path):
    with open(os.path.join(ROOT, 'options', 'samplers', 'pgs_paper.yml')) as f:
        opt = yaml.safe_load(f)
    opt['sampler']['execution'] = 'per_step'
    path = tmp_path / 'pgs_per_step.yml'
    path.write_text(yaml.safe_dump(opt))
    s = build_sampler(str(path))
    assert s.execution == 'per_step' and s.groups == [(400, 8), (700, 14), (1000, 20)]
    y0, conf = inputs(b=1, h=32, w=32)
    _, r = s.sample(lambda x, t, c: c, y0, conf, cond=y0)
    assert r.execution == 'per_step' and r.denoiser_calls == 20  # 9 patches, batch 64
    opt['sampler']['execution'] = 'stepwise'
    with pytest.raises(ConfigError):
        build_sampler(opt)

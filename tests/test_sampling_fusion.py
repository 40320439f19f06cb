"""Overlap fusion at every step (patchscaler/sampling/fusion.py) and the Min-SNR loss weighting."""
import pytest
import torch

from patchscaler.sampling import build_sampler
from patchscaler.sampling.schedules import loss_weights
from patchscaler.utils.errors import ConfigError

PAPER_SHARES = {'mode': 'share', 'shares': [0.4, 0.3, 0.3]}


def _sampler(**kw):
    return build_sampler(dict({'type': 'PatchGroupSampler', 'patch_size': 8, 'batch_size': 5}, **kw))


def _shrink(sampler):
    """A pointwise x0 denoiser: y0 plus a shrunk noisy residual (what a Wiener filter of white detail does)."""
    def net(x_t, t, y0):
        a = float(sampler.scheduler.alphas_cumprod[int(t[0])])
        return y0 + a / (a + 4 * (1 - a)) * (x_t / a ** 0.5 - y0)
    return net


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 20, 28, generator=g), torch.rand(2, 1, 20, 28, generator=g)


def test_fused_equals_independent_patches_for_a_pointwise_denoiser_in_one_group():
    y0, _ = _inputs()
    one = dict(groups=[{'tau': 1000, 'steps': 10}], grouping=None)
    plain = _sampler(**one)
    fused = _sampler(**one, fuse_overlaps=True)
    a, ra = plain.sample(_shrink(plain), y0, cond=y0)
    b, rb = fused.sample(_shrink(fused), y0, cond=y0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # one noise draw: overlaps already agree
    assert (ra.nfe_total, ra.denoiser_calls) == (rb.nfe_total, rb.denoiser_calls)


def test_fused_pgs_keeps_nfe_and_returns_y0_for_a_denoiser_that_knows_it():
    y0, conf = _inputs()
    s = _sampler(grouping=PAPER_SHARES, fuse_overlaps=True)
    x, report = s.sample(lambda x_t, t, c: c, y0, conf, cond=y0)
    torch.testing.assert_close(x, y0)
    plain_report = _sampler(grouping=PAPER_SHARES).sample(lambda x_t, t, c: c, y0, conf, cond=y0)[1]
    assert report.nfe_total == plain_report.nfe_total and report.denoiser_calls == plain_report.denoiser_calls


def test_fusion_makes_overlapping_patches_agree():
    """A denoiser that answers differently per patch (its batch position) and follows x_t: fused, each pixel has
    one trajectory, so the result differs from the independent walk, and is deterministic."""
    y0, conf = _inputs()

    def per_patch(x_t, t, c):
        offset = 0.1 * torch.arange(len(x_t), dtype=x_t.dtype).view(-1, 1, 1, 1) / len(x_t)
        return c + offset + 0.5 * (x_t - c)
    s = _sampler(grouping=PAPER_SHARES, fuse_overlaps=True)
    a = s.sample(per_patch, y0, conf, cond=y0)[0]
    b = s.sample(per_patch, y0, conf, cond=y0)[0]
    plain = _sampler(grouping=PAPER_SHARES).sample(per_patch, y0, conf, cond=y0)[0]
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all() and not torch.allclose(a, plain, atol=1e-4)


def test_schedules_that_do_not_line_up_are_fused_per_group():
    y0, conf = _inputs()
    groups = [{'tau': 500, 'steps': 7}, {'tau': 1000, 'steps': 20}]
    s = _sampler(groups=groups, grouping={'mode': 'share', 'shares': [0.5, 0.5]}, fuse_overlaps=True)
    x, report = s.sample(lambda x_t, t, c: c, y0, conf, cond=y0)
    assert not report.aligned
    torch.testing.assert_close(x, y0)


def test_stochastic_fused_steps_are_seeded():
    y0, conf = _inputs()
    s = _sampler(grouping=PAPER_SHARES, fuse_overlaps=True, eta=1.0)
    a = s.sample(_shrink(s), y0, conf, cond=y0, seed=3)[0]
    b = s.sample(_shrink(s), y0, conf, cond=y0, seed=3)[0]
    c = s.sample(_shrink(s), y0, conf, cond=y0, seed=4)[0]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_fusion_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match='DDIMScheduler'):
        _sampler(fuse_overlaps=True, scheduler={'type': 'DPMSolverMultistepScheduler'})
    with pytest.raises(ConfigError, match='devices'):
        _sampler(fuse_overlaps=True, devices=['cpu', 'cpu'])


def test_min_snr_weights_are_the_papers_for_each_parameterisation():
    a_bar = torch.tensor([0.999, 0.9, 0.5, 0.01])
    snr = a_bar / (1 - a_bar)
    w = {'type': 'min_snr', 'gamma': 5}
    torch.testing.assert_close(loss_weights(a_bar, w), snr.clamp(max=5))
    torch.testing.assert_close(loss_weights(a_bar, w, 'epsilon'), snr.clamp(max=5) / snr)
    torch.testing.assert_close(loss_weights(a_bar, w, 'v_prediction'), snr.clamp(max=5) / (snr + 1))
    torch.testing.assert_close(loss_weights(a_bar, None), torch.ones(4))
    for bad in ({'type': 'p2'}, {'type': 'min_snr', 'gamma': 0}, {'type': 'min_snr', 'k': 1}):
        with pytest.raises(ConfigError):
            loss_weights(a_bar, bad)


@pytest.mark.parametrize('execution', ['per_group', 'per_step'])
def test_fused_walk_applies_the_schedulers_clip_sample(execution):
    y0, conf = _inputs()
    x0 = 2 * y0  # well outside [-1.5, 1.5]
    s = _sampler(grouping=PAPER_SHARES, fuse_overlaps=True, execution=execution,
                 scheduler={'type': 'DDIMScheduler', 'clip_sample': True, 'clip_sample_range': 1.5})
    x, _ = s.sample(lambda x_t, t, c: c, y0, conf, cond=x0)
    assert x0.abs().max() > 3
    torch.testing.assert_close(x, x0.clamp(-1.5, 1.5))

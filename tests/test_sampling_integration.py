"""PGS seen from outside: the wrap-your-own-model example, the benchmark tool, and the model's ``sampler`` option."""
import json
import os.path as osp
import sys

import pytest
import torch
from conftest import ROOT

from patchscaler.sampling import build_sampler, texture_confidence
from patchscaler.sampling.example_unet import ADAPTIVE_OPTIONS, build_example_unet, run_example
from patchscaler.utils.errors import ConfigError


class CountingUNet(torch.nn.Module):
    """The example's UNet with a record of what it was called with."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.inputs = unet, []

    def forward(self, x, t):
        self.inputs.append((tuple(x.shape), int(t[0])))
        return self.unet(x, t)


def test_example_drives_a_diffusers_unet_with_the_y0_patch_concatenated():
    y0 = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(3))
    unet = CountingUNet(build_example_unet(4, 16, width=8).eval())
    latent, report = run_example(y0, unet, batch_size=4)
    assert latent.shape == y0.shape and torch.isfinite(latent).all()
    m = report.num_patches
    assert m == 2 * 4  # rows start at 0, 8 (24 = 16 + 8); cols at 0, 8, 16, 24 (40 = 16 + 24)
    assert report.patches_per_group == (round(0.4 * m), round(0.7 * m) - round(0.4 * m), m - round(0.7 * m))
    assert all(shape[1] == 8 and shape[2:] == (16, 16) for shape, _ in unet.inputs)  # concat(y0, x_t)
    assert sum(shape[0] for shape, _ in unet.inputs) == report.nfe_total
    assert {t for _, t in unet.inputs} <= set(range(999, 0, -50))  # the trailing schedule's steps


def test_texture_confidence_ranks_flat_above_busy():
    flat = torch.zeros(1, 4, 16, 16)
    busy = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    c = texture_confidence(torch.cat([flat, busy], 3))
    assert c.shape == (1, 1, 16, 32) and (c > 0).all() and (c <= 1).all()
    assert c[..., 2:-2, 2:14].mean() > 0.99 > c[..., 2:-2, 18:30].mean()


def test_adaptive_options_file_builds_the_documented_sampler():
    s = build_sampler(ADAPTIVE_OPTIONS)
    assert s.assigner.mode == 'share' and s.assigner.values == [0.4, 0.3, 0.3]
    assert s.prediction_type == 'epsilon' and s.scheduler.config.beta_schedule == 'scaled_linear'


def test_benchmark_writes_json_and_markdown_with_exact_nfe_ratios(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(osp.join(ROOT, 'tools'))
    sys.modules.pop('benchmark', None)
    import benchmark
    out = tmp_path / 'bench'
    benchmark.main(['--lr-size', '40', '--ae-factor', '4', '--patch-size', '8', '--repeats', '1', '--warmup', '0',
                    '--shares', '1/0/0', '0.5/0.25/0.25', '0/0/1', '--out-size', '160', '--rtm-size', '50',
                    '--parts', 'pgs', 'retrieval', '--model', 'tiny', '--out', str(out)])
    result = json.loads((out / 'benchmark.json').read_text())
    rows = result['pgs']
    assert [r['scenario'] for r in rows][0].startswith('uniform')
    m = sum(rows[0]['patches_per_group'])
    assert m == 9 * 9  # 40 px latent, V=8, stride 4
    assert rows[1]['nfe_ratio'] == pytest.approx(8 / 20) and rows[3]['nfe_ratio'] == 1.0
    g = rows[2]['patches_per_group']
    assert rows[2]['nfe'] == 8 * g[0] + 14 * g[1] + 20 * g[2]
    assert all(r['wall_s'] > 0 and r['overhead_s'] > 0 for r in rows)
    table = (out / 'benchmark.md').read_text()
    assert '| pgs shares 1/0/0 |' in table and '0.40' in table
    retrieval = result['retrieval']
    assert retrieval['queries'] == 9 * 9 and retrieval['same_indices']  # 160 px / d 4 = 40 px latent
    assert {'texture keys', 'search (torch)'} <= {r['step'] for r in retrieval['rows']}
    assert all(r['queries_per_s'] > 0 for r in retrieval['rows'])
    assert '| search (torch) |' in table


def test_benchmark_compares_the_executions(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(osp.join(ROOT, 'tools'))
    sys.modules.pop('benchmark', None)
    import benchmark
    out = tmp_path / 'bench'
    benchmark.main(['--lr-size', '40', '--ae-factor', '4', '--patch-size', '8', '--repeats', '1', '--warmup', '0',
                    '--shares', '0.4/0.3/0.3', '--executions', 'per_group', 'per_step', '--parts', 'pgs',
                    '--model', 'tiny', '--out', str(out)])
    rows = json.loads((out / 'benchmark.json').read_text())['pgs']
    assert [r['execution'] for r in rows] == ['per_group', 'per_group', 'per_step']
    group, step = rows[1], rows[2]
    assert group['nfe'] == step['nfe'] and group['patches_per_group'] == step['patches_per_group']
    n = group['patches_per_group']  # 81 patches, batch 64: every group in one batch, all three in two
    assert max(n) <= 64 and group['denoiser_calls'] == 8 + 14 + 20
    assert step['denoiser_calls'] == 6 + 6 + 8 * 2
    assert '| pgs shares 0.4/0.3/0.3 per_step |' in (out / 'benchmark.md').read_text()


def test_benchmark_stablesr_vs_pgs_same_unet(tmp_path, monkeypatch):
    """StableSR and StableSR+PGS from the demo options on one image: uniform does 20 evaluations per patch,
    PGS with the same UNet its groups' (8/14/20 per patch), and the ratios are written."""
    monkeypatch.syspath_prepend(osp.join(ROOT, 'tools'))
    sys.modules.pop('benchmark', None)
    import benchmark
    out = tmp_path / 'bench'
    benchmark.main(['--parts', 'stablesr', '--stablesr-lr', '32', '--repeats', '1', '--warmup', '0',
                    '--out', str(out)])
    s = json.loads((out / 'benchmark.json').read_text())['stablesr']
    uni, pgs = s['rows']
    assert s['lr_size'] == 32 and s['patch_size'] == 16
    assert len(uni['patches_per_group']) == 1 and uni['nfe'] == 20 * uni['patches_per_group'][0]
    assert sum(pgs['patches_per_group']) == uni['patches_per_group'][0]  # the same 9 patches (32·4/4 = 32 latent)
    assert pgs['nfe'] == sum(n * c for n, c in zip((8, 14, 20), pgs['patches_per_group']))
    assert pgs['nfe_ratio'] == pytest.approx(pgs['nfe'] / uni['nfe']) and pgs['stages_s']['grm'] > 0
    assert '| StableSR+PGS |' in (out / 'benchmark.md').read_text()


def test_benchmark_retrieval_only(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(osp.join(ROOT, 'tools'))
    sys.modules.pop('benchmark', None)
    import benchmark
    benchmark.main(['--parts', 'retrieval', '--out-size', '128', '--ae-factor', '8', '--rtm-size', '20', '--top-k', '2',
                    '--repeats', '1', '--warmup', '0', '--out', str(tmp_path)])
    result = json.loads((tmp_path / 'benchmark.json').read_text())
    assert 'pgs' not in result and result['retrieval']['queries'] == 1 and result['retrieval']['top_k'] == 2
    assert (tmp_path / 'benchmark.md').read_text().startswith('RTM retrieval on')


def test_benchmark_patch_dit_and_end_to_end(tmp_path, monkeypatch, tiny_patchscaler):
    import yaml
    monkeypatch.syspath_prepend(osp.join(ROOT, 'tools'))
    sys.modules.pop('benchmark', None)
    import benchmark
    opt, _ = tiny_patchscaler
    (tmp_path / 'tiny.yml').write_text(yaml.safe_dump(opt))
    import benchmark_networks
    tiny = dict(type='RRDBNet', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1, num_grow_ch=4)
    monkeypatch.setattr(benchmark_networks, 'BASELINES', {'tiny RRDBNet': tiny})
    benchmark.main(['--parts', 'dit', 'e2e', 'baselines', '--dit-presets', 'tiny', '--dit-batch', '2',
                    '--patch-size', '8',
                    '--e2e-opt', str(tmp_path / 'tiny.yml'), '--e2e-ckpt', '', '--e2e-lr', '16', '--repeats', '1',
                    '--warmup', '0', '--devices', 'cpu,cpu', '--out', str(tmp_path)])
    result = json.loads((tmp_path / 'benchmark.json').read_text())
    row = result['dit']['rows'][0]
    # one V=8, p=2 patch (16 tokens, width 192, 4 blocks) costs at least its linear layers' 2·params·tokens FLOPs
    assert row['preset'] == 'tiny' and row['gflops_per_call'] > 2 * 0.5 * row['params_m'] * 1e6 * 16 / 1e9
    assert row['ms_per_patch'] > 0  # the encoder's transformer layers are counted too (not their fused eval path)
    tokens = result['dit']['prompt_tokens']
    assert row['encoder_gflops_per_patch'] > 2 * 0.5 * row['encoder_params_m'] * 1e6 * tokens / 1e9
    e2e = result['e2e']
    assert e2e['weights'].startswith('random init') and set(e2e['stages_s']) == {'encode', 'grm', 'pgs', 'decode',
                                                                                 'color_fix'}
    assert sum(e2e['stage_share'].values()) == pytest.approx(1.0) and e2e['nfe'] <= e2e['nfe_uniform']
    # uniform, PGS and PGS on two devices: the same networks; group-parallel does the same work
    uniform, pgs, two = e2e['rows']
    assert uniform['nfe_ratio'] == 1 and pgs['nfe'] == two['nfe'] == e2e['nfe'] and two['variant'] == 'PGS on cpu,cpu'
    assert all(r['megapixels_per_s'] > 0 for r in e2e['rows'])
    table = (tmp_path / 'benchmark.md').read_text()
    assert '| tiny |' in table and 'End to end' in table and '| tiny RRDBNet |' in table
    assert result['baselines']['rows'][0]['wall_s'] > 0 and result['baselines']['lr_size'] == 16


def test_model_options_sampler_is_checked(demo_opt):
    from patchscaler.utils.options_check import check_options
    opt = dict(demo_opt, sampler={'type': 'PatchGroupSampler', 'patch_size': 16, 'grouping': {'mode': 'quantil'}})
    opt['datasets'] = {'val': opt['datasets']['val']}
    opt['datasets']['val'] = dict(opt['datasets']['val'], dataroot_lq=ROOT, dataroot_gt=ROOT)
    with pytest.raises(ConfigError, match="grouping mode 'quantil'"):
        check_options(opt)
    opt['sampler'] = 'options/samplers/no_such_file.yml'
    with pytest.raises(ConfigError, match='sampler: path does not exist'):
        check_options(opt)


@pytest.mark.slow
def test_benchmark_end_to_end_at_paper_scale(tmp_path, monkeypatch):
    """--e2e-size paper: the networks of options/test_patchscaler.yml (GRM, Patch-DiT B, texture encoder) and the SD
    VAE architecture at random init with a random RTM; no weight file is read."""
    monkeypatch.syspath_prepend(osp.join(ROOT, 'tools'))
    sys.modules.pop('benchmark', None)
    import benchmark
    benchmark.main(['--parts', 'e2e', '--e2e-size', 'paper', '--e2e-lr', '16', '--repeats', '1', '--warmup', '0',
                    '--out', str(tmp_path)])
    e2e = json.loads((tmp_path / 'benchmark.json').read_text())['e2e']
    assert e2e['opt'] == 'options/test_patchscaler.yml' and e2e['weights'].startswith('paper-scale networks')
    uniform, pgs = e2e['rows']
    assert uniform['nfe'] == 20 and pgs['nfe'] < uniform['nfe']  # one 16² latent patch, graded by share
    assert 'End to end, options/test_patchscaler.yml' in (tmp_path / 'benchmark.md').read_text()

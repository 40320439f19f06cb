"""Speed, measured in one run: PGS vs uniform sampling with the same denoiser, input and seed; RTM retrieval;
the networks' cost.

    python tools/benchmark.py                     # CPU: LR 128 -> ×4 -> 64×64 SD-size latent, V = 16
    python tools/benchmark.py --device cuda --lr-size 512 --model S
    python tools/benchmark.py --parts retrieval   # only the texture retrieval

The denoiser is a random-init Patch-DiT (concat(y0, x_t), p = 2, x0 output, no prompt) of the size chosen by
``--model``: timing needs its cost per call, not trained weights. Scenarios:

- ``uniform``: every patch 20 DDIM steps from τ = 1000 (the paper's "unified" sampling, on patches);
- ``pgs shares a/b/c``: the paper's groups (τ = 400/700/1000, N = 8/14/20) with the given share of
  patches in each group (grouping mode ``share``), from all-simple to all-hard;
- ``overhead``: the same runs with an identity denoiser: the cost of patching, grouping, DDIM updates and
  blending alone;
- ``--executions per_group per_step``: the PGS scenarios once per sampler ``execution`` (per_step: the patches
  active at a timestep share calls across groups); the tables give the denoiser calls of each.

For each: median wall time over ``--repeats`` (after ``--warmup``; scenarios timed round-robin), NFE
(patch evaluations), both as ratios to ``uniform``. PGS's saving is real when the wall ratio tracks the NFE
ratio.

Retrieval (``--parts retrieval``): Algorithm 1 for every PGS patch of an ``--out-size``² output (V = 16,
stride 8, SD factor 8: 961 patches at 2048²) against an RTM of ``--rtm-size`` random latent patches: texture
keys, top-K search with each back end (faiss when installed, torch), and the whole query (keys + search +
gathering the priors), as queries per second; the back ends' indices are compared.

Network cost (``--parts dit e2e baselines stablesr``, in ``tools/benchmark_networks.py``): Patch-DiT per preset,
the pipeline end to end per stage, the baselines' generators on the same input, and StableSR vs StableSR+PGS
with the same UNet on the same image (the paper's Table 3 ratio).

Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md`` (the tables in docs/pgs.md and docs/gpu.md).
"""
import argparse
import json
import os
import os.path as osp
import platform
import sys
from functools import partial

REPO = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from benchmark_networks import (  # noqa: E402  (tools/ is on sys.path when a tool runs)
    MODELS,
    markdown_baselines,
    markdown_dit,
    markdown_e2e,
    markdown_stablesr,
    run_baselines,
    run_dit,
    run_e2e,
    run_stablesr,
)

from patchscaler.archs.patch_dit_arch import PatchDiT  # noqa: E402
from patchscaler.sampling import build_sampler  # noqa: E402
from patchscaler.utils.device import enable_tf32  # noqa: E402
from patchscaler.utils.timing import measure_interleaved  # noqa: E402

SHARES = ([1.0, 0.0, 0.0], [0.4, 0.3, 0.3], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0])


def pgs_scenarios(args):
    """[(name, sampler options)] sharing one base configuration (options/samplers/pgs_paper.yml)."""
    import yaml
    with open(osp.join(REPO, 'options', 'samplers', 'pgs_paper.yml')) as f:
        base = yaml.safe_load(f)['sampler']
    base.update(patch_size=args.patch_size, stride=args.patch_size // 2, batch_size=args.batch_size)
    uniform = dict(base, groups=[{'tau': 1000, 'steps': 20}], grouping=None)
    out = [('uniform (20 steps, τ=1000)', uniform)]
    for execution in args.executions:
        for shares in args.shares:
            name = 'pgs shares ' + '/'.join(f'{s:g}' for s in shares) + ('' if execution == 'per_group' else
                                                                         f' {execution}')
            out.append((name, dict(base, grouping={'mode': 'share', 'shares': shares}, execution=execution)))
    return out


def common_fields(args):
    device = torch.device(args.device)
    return {'device': str(device), 'device_name': (torch.cuda.get_device_name(device) if device.type == 'cuda'
                                                   else platform.processor() or platform.machine()),
            'threads': torch.get_num_threads(), 'torch': torch.__version__,
            'input': {'patch_size': args.patch_size}}


def run(args):
    device = torch.device(args.device)
    torch.manual_seed(0)
    side = args.lr_size * args.scale // args.ae_factor
    y0 = torch.randn(1, args.latent_channels, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    confidence = torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    net = PatchDiT(args.latent_channels, args.patch_size, 2, **MODELS[args.model]).to(device).eval()
    params = sum(p.numel() for p in net.parameters())
    dtype = torch.bfloat16 if args.bf16 else None

    def denoiser(x_t, t, y0_patch):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return net(x_t, t, y0_patch)

    def identity(x_t, t, y0_patch):
        return x_t

    scenarios = [(name, build_sampler(dict(opts, progress=False))) for name, opts in pgs_scenarios(args)]
    # round-robin over the scenarios, so machine drift does not favour one of them
    timed = measure_interleaved([partial(s.sample, denoiser, y0, confidence, cond=y0) for _, s in scenarios],
                                device, args.repeats, args.warmup)
    bare = measure_interleaved([partial(s.sample, identity, y0, confidence, cond=y0) for _, s in scenarios],
                               device, args.repeats, 1)
    rows = []
    for (name, _), t, o in zip(scenarios, timed, bare):
        report = t['result'][1]
        rows.append({'scenario': name, 'patches_per_group': list(report.patches_per_group),
                     'nfe': report.nfe_total, 'denoiser_calls': report.denoiser_calls,
                     'execution': report.execution,
                     'wall_s': t['median_s'], 'wall_times_s': t['times_s'],
                     'overhead_s': o['median_s'], 'peak_mem_mb': t['peak_mem_mb']})
        print(f"{name:40s} NFE {report.nfe_total:6d}  calls {report.denoiser_calls:4d}  wall {t['median_s']:.3f} s  "
              f"(sampler overhead {o['median_s']:.3f} s)", flush=True)
    ref = rows[0]
    for r in rows:
        r['nfe_ratio'] = r['nfe'] / ref['nfe']
        r['wall_ratio'] = r['wall_s'] / ref['wall_s']
    return {
        **common_fields(args), 'what': 'PGS vs uniform sampling, same denoiser/input/seed, one run',
        'input': {'lr_size': args.lr_size, 'scale': args.scale, 'latent': list(y0.shape),
                  'patch_size': args.patch_size,
                  'patches': rows[0]['patches_per_group'][0]},
        'denoiser': {'model': args.model, 'params_m': params / 1e6, 'bf16': bool(args.bf16),
                     'batch_size': args.batch_size},
        'repeats': args.repeats, 'warmup': args.warmup, 'pgs': rows}


def run_retrieval(args):
    """Queries per second of Algorithm 1 for all patches of one output image, per back end."""
    from patchscaler.retrieval import KeyIndex, ReferenceTextureMemory, faiss_available
    from patchscaler.sampling import PatchGrid
    device = torch.device(args.device)
    side = args.out_size // args.ae_factor
    m = PatchGrid.for_shape(side, side, args.patch_size).num_patches
    g = torch.Generator().manual_seed(0)
    shape = (args.latent_channels, args.patch_size, args.patch_size)
    rtm = ReferenceTextureMemory.build(torch.randn(args.rtm_size, *shape, generator=g), None, args.rtm_size,
                                       fps='keys', top_k=args.top_k).to(device)
    queries = torch.randn(m, *shape, generator=g).to(device)
    keys = rtm.query_keys(queries)
    backends = ['torch'] + (['faiss'] if faiss_available() else [])
    indexes = {b: KeyIndex(rtm.keys, b) for b in backends}
    if device.type == 'cuda' and 'faiss' in backends:  # faiss-cpu searches a CPU index with the queries copied
        label = 'faiss GPU index' if faiss_available(gpu=True) else 'faiss CPU index'
        indexes = {(label if b == 'faiss' else b): i for b, i in indexes.items()}
        backends = list(indexes)

    def query(index):
        sims, idx = index.search(rtm.query_keys(queries), args.top_k)
        return rtm.values[idx], sims

    fns = [('texture keys', partial(rtm.query_keys, queries))]
    fns += [(f'search ({b})', partial(indexes[b].search, keys, args.top_k)) for b in backends]
    fns += [(f'query: keys + search ({b}) + priors', partial(query, indexes[b])) for b in backends]
    timed = measure_interleaved([f for _, f in fns], device, args.repeats, args.warmup)
    rows = [{'step': name, 'median_s': t['median_s'], 'queries_per_s': m / t['median_s']}
            for (name, _), t in zip(fns, timed)]
    for (name, _), t, row in zip(fns, timed, rows):
        print(f"{name:40s} {t['median_s'] * 1e3:8.2f} ms  {row['queries_per_s']:10.0f} queries/s", flush=True)
    found = {b: indexes[b].search(keys, args.top_k)[1].cpu() for b in backends}  # torch first
    return {'output_size': args.out_size, 'queries': m, 'rtm_size': args.rtm_size, 'top_k': args.top_k,
            'key_dim': int(rtm.keys.shape[1]), 'texture_classifier': rtm.meta['texture_classifier']['type'],
            'backends': backends, 'same_indices': all(torch.equal(found['torch'], v) for v in found.values()),
            'rows': rows}


def markdown_retrieval(result):
    r = result['retrieval']
    v = result['input']['patch_size']
    lines = [f"RTM retrieval on {result['device_name']} ({result['device']}): all {r['queries']} PGS patches of a "
             f"{r['output_size']}² output (V = {v}, stride {v // 2}) against {r['rtm_size']} memory patches, "
             f"top-{r['top_k']}, {r['key_dim']}-d keys ({r['texture_classifier']}); back ends return the same "
             f"indices: {'yes' if r['same_indices'] else 'NO'}.",
             '', '| step | time (ms) | queries/s |', '| --- | ---: | ---: |']
    lines += [f"| {row['step']} | {row['median_s'] * 1e3:.2f} | {row['queries_per_s']:,.0f} |" for row in r['rows']]
    return '\n'.join(lines) + '\n'


def markdown(result):
    tables = (('pgs', markdown_pgs), ('retrieval', markdown_retrieval), ('dit', markdown_dit), ('e2e', markdown_e2e),
              ('baselines', markdown_baselines), ('stablesr', markdown_stablesr))
    return '\n'.join(fn(result) for part, fn in tables if part in result)


def markdown_pgs(result):
    inp, den = result['input'], result['denoiser']
    lines = [f"PGS vs uniform on {result['device_name']} ({result['device']}, {result['threads']} threads, "
             f"torch {result['torch']}): LR {inp['lr_size']}² ×{inp['scale']} → latent "
             f"{'×'.join(map(str, inp['latent'][1:]))}, {inp['patches']} patches of {inp['patch_size']}², "
             f"denoiser {den['model']} ({den['params_m']:.1f} M params, random init"
             f"{', bf16' if den['bf16'] else ''}), batch {den['batch_size']}, median of {result['repeats']}.",
             '',
             '| scenario | patches simple/medium/hard | NFE | NFE ratio | calls | wall (s) | wall ratio | '
             'overhead (s) |',
             '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in result['pgs']:
        groups = '/'.join(map(str, r['patches_per_group'])) if len(r['patches_per_group']) > 1 else \
            f"{r['patches_per_group'][0]} (one group)"
        lines.append(f"| {r['scenario']} | {groups} | {r['nfe']} | {r['nfe_ratio']:.2f} | {r['denoiser_calls']} | "
                     f"{r['wall_s']:.2f} | "
                     f"{r['wall_ratio']:.2f} | {r['overhead_s']:.3f} |")
    return '\n'.join(lines) + '\n'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--lr-size', type=int, default=128, help='LR side in pixels (square input)')
    p.add_argument('--scale', type=int, default=4)
    p.add_argument('--ae-factor', type=int, default=8, help='autoencoder downscale d (SD VAE: 8)')
    p.add_argument('--latent-channels', type=int, default=4)
    p.add_argument('--patch-size', type=int, default=16)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--model', choices=sorted(MODELS), default='tiny')
    p.add_argument('--bf16', action='store_true', help='bf16 autocast for the denoiser')
    p.add_argument('--shares', type=lambda s: [float(v) for v in s.split('/')], nargs='+', default=list(SHARES),
                   help='PGS group shares to time, e.g. 0.4/0.3/0.3')
    p.add_argument('--executions', nargs='+', choices=['per_group', 'per_step'], default=['per_group'],
                   help='pgs and e2e: sampler executions to time, e.g. per_group per_step')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--parts', nargs='+', choices=['pgs', 'retrieval', 'dit', 'e2e', 'baselines', 'stablesr'],
                   default=['pgs', 'retrieval', 'dit', 'e2e', 'baselines'],
                   help='stablesr (minutes on a CPU) runs only when named')
    p.add_argument('--dit-presets', nargs='+', choices=sorted(MODELS), default=['S', 'B', 'L'])
    p.add_argument('--dit-batch', type=int, default=8, help='dit: patches per timed Patch-DiT call')
    p.add_argument('--e2e-size', choices=['demo', 'paper'], default='demo',
                   help='e2e: the demo model (trained if present) or the paper-scale networks at random init')
    p.add_argument('--e2e-opt', default=None, help='e2e: model options (default: the demo test file, or '
                   'options/test_patchscaler.yml with --e2e-size paper)')
    p.add_argument('--devices', default=None, type=lambda s: [d.strip() for d in s.split(',') if d.strip()],
                   help='e2e: also time PGS group-parallel on these devices, e.g. cuda:0,cuda:1')
    p.add_argument('--e2e-ckpt', default='experiments/demo_patchscaler_x4', help='e2e: trained run (else random)')
    p.add_argument('--e2e-lr', type=int, default=128, help='e2e: LR side')
    p.add_argument('--stablesr-opt', default='options/stablesr/demo/test_stablesr_pgs_demo.yml',
                   help='stablesr: StableSR+PGS options (UNet, GRM, PGS sampler, weights)')
    p.add_argument('--stablesr-lr', type=int, default=None, help='stablesr: LR side (default 128 demo, 512 sd21)')
    p.add_argument('--stablesr-size', choices=['demo', 'sd21'], default='demo',
                   help='stablesr: the demo networks (trained if present) or random-init SD-2.1 sizes (GPU)')
    p.add_argument('--out-size', type=int, default=2048, help='retrieval: output side whose patches query the RTM')
    p.add_argument('--rtm-size', type=int, default=2000, help='retrieval: memory size (paper: 2,000)')
    p.add_argument('--top-k', type=int, default=4)
    p.add_argument('--out', default='results/benchmark')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    enable_tf32()  # CUDA float32 matmuls in TF32 (patchscaler.utils.device)
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        sys.exit('error: --device cuda but this torch sees no GPU')
    result = run(args) if 'pgs' in args.parts else common_fields(args)
    if 'retrieval' in args.parts:
        result['retrieval'] = run_retrieval(args)
    if 'dit' in args.parts:
        result['dit'] = run_dit(args)
    if 'e2e' in args.parts:
        result['e2e'] = run_e2e(args)
    if 'baselines' in args.parts:
        result['baselines'] = run_baselines(args)
    if 'stablesr' in args.parts:
        result['stablesr'] = run_stablesr(args)
    result['repeats'] = args.repeats
    os.makedirs(args.out, exist_ok=True)
    with open(osp.join(args.out, 'benchmark.json'), 'w') as f:
        json.dump(result, f, indent=2)
    table = markdown(result)
    with open(osp.join(args.out, 'benchmark.md'), 'w') as f:
        f.write(table)
    print('\n' + table + f"\nwritten: {osp.join(args.out, 'benchmark.json')}, {osp.join(args.out, 'benchmark.md')}")


if __name__ == '__main__':
    main()

"""Speed, measured in one run: PGS vs uniform sampling with the same denoiser, input and seed; RTM retrieval.

    python tools/benchmark.py                     # CPU: LR 128 -> ×4 -> 64×64 SD-size latent, V = 16
    python tools/benchmark.py --device cuda --lr-size 512 --model S
    python tools/benchmark.py --parts retrieval   # only the texture retrieval

The denoiser is a random-init Patch-DiT (concat(y0, x_t), p = 2, x0 output, no prompt) of the size chosen by
``--model``: timing needs its cost per call, not trained weights. Scenarios:

- ``uniform``: every patch 20 DDIM steps from τ = 1000 (the paper's "unified" sampling, on patches);
- ``pgs shares a/b/c``: the paper's groups (τ = 400/700/1000, N = 8/14/20) with the given share of
  patches in each group (grouping mode ``share``), from all-simple to all-hard;
- ``overhead``: the same runs with an identity denoiser: the cost of patching, grouping, DDIM updates and
  blending alone.

For each: median wall time over ``--repeats`` (after ``--warmup``; scenarios timed round-robin), NFE
(patch evaluations), both as ratios to ``uniform``. PGS's saving is real when the wall ratio tracks the NFE
ratio.

Retrieval (``--parts retrieval``): Algorithm 1 for every PGS patch of an ``--out-size``² output (V = 16,
stride 8, SD factor 8: 961 patches at 2048²) against an RTM of ``--rtm-size`` random latent patches: texture
keys, top-K search with each back end (faiss when installed, torch), and the whole query (keys + search +
gathering the priors), as queries per second; the back ends' indices are compared.

Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md`` (the tables in the README).
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

from patchscaler.archs.patch_dit_arch import PatchDiT  # noqa: E402
from patchscaler.sampling import build_sampler  # noqa: E402
from patchscaler.utils.timing import measure_interleaved  # noqa: E402

MODELS = {'tiny': dict(hidden_size=192, depth=4, num_heads=3), 'S': dict(preset='S'), 'B': dict(preset='B'),
          'L': dict(preset='L')}  # Patch-DiT sizes: the presets of patchscaler/archs/patch_dit_arch.py
SHARES = ([1.0, 0.0, 0.0], [0.4, 0.3, 0.3], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0])


def pgs_scenarios(args):
    """[(name, sampler options)] sharing one base configuration (options/samplers/pgs_paper.yml)."""
    import yaml
    with open(osp.join(REPO, 'options', 'samplers', 'pgs_paper.yml')) as f:
        base = yaml.safe_load(f)['sampler']
    base.update(patch_size=args.patch_size, stride=args.patch_size // 2, batch_size=args.batch_size)
    uniform = dict(base, groups=[{'tau': 1000, 'steps': 20}], grouping=None)
    out = [('uniform (20 steps, τ=1000)', uniform)]
    for shares in args.shares:
        name = 'pgs shares ' + '/'.join(f'{s:g}' for s in shares)
        out.append((name, dict(base, grouping={'mode': 'share', 'shares': shares})))
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
                     'wall_s': t['median_s'], 'wall_times_s': t['times_s'],
                     'overhead_s': o['median_s'], 'peak_mem_mb': t['peak_mem_mb']})
        print(f"{name:32s} NFE {report.nfe_total:6d}  wall {t['median_s']:.3f} s  "
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


def _dit_row(name, args, device):
    from torch.utils.flop_counter import FlopCounterMode

    from patchscaler.archs.texture_encoder_arch import TextureEncoder
    from patchscaler.models.pipeline import PromptedPatchDiT
    v, c, k = args.patch_size, args.latent_channels, args.top_k
    torch.manual_seed(0)
    net = PromptedPatchDiT(PatchDiT(c, v, 2, prompt_dim=384, **MODELS[name]),
                           TextureEncoder(c, v, 4, dim=384, depth=2, num_heads=6)).to(device).eval()
    g = torch.Generator().manual_seed(0)

    def priors(n):
        return torch.randn(n, k, c, v, v, generator=g).to(device), torch.rand(n, k, generator=g).to(device)

    def inputs(n):
        y0, x_t = (torch.randn(n, c, v, v, generator=g).to(device) for _ in range(2))
        return x_t, torch.full((n,), 500, device=device), {'y0': y0, **net.encode_prompt(*priors(n))}

    with torch.no_grad():
        one = inputs(1)
        with FlopCounterMode(display=False) as counter:
            net(*one)
        net.texture_encoder.train()  # eval mode takes nn.TransformerEncoderLayer's fused path, which the counter misses
        with FlopCounterMode(display=False) as enc_counter:
            net.encode_prompt(*priors(1))
        net.texture_encoder.eval()
        batch = inputs(args.dit_batch)
    dtype = torch.bfloat16 if args.bf16 else None

    def call():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return net(*batch)
    t = measure_interleaved([call], device, args.repeats, args.warmup)[0]
    return {'preset': name, 'params_m': sum(p.numel() for p in net.dit.parameters()) / 1e6,
            'encoder_params_m': sum(p.numel() for p in net.texture_encoder.parameters()) / 1e6,
            'gflops_per_call': counter.get_total_flops() / 1e9,
            'encoder_gflops_per_patch': enc_counter.get_total_flops() / 1e9, 'batch': args.dit_batch,
            'forward_s': t['median_s'], 'ms_per_patch': 1e3 * t['median_s'] / args.dit_batch,
            'peak_mem_mb': t['peak_mem_mb']}


def run_dit(args):
    """Patch-DiT per preset: parameters, GFLOPs per call of one patch (torch's FLOP counter: matmuls and
    attention, a multiply-add counted as 2), and forward time of a batch, with a K=4 texture prompt."""
    device, rows = torch.device(args.device), []
    for name in args.dit_presets:
        r = _dit_row(name, args, device)
        rows.append(r)
        print(f"Patch-DiT {name}: {r['params_m']:.1f} M params, {r['gflops_per_call']:.2f} GFLOPs per patch call, "
              f"{r['ms_per_patch']:.1f} ms per patch (batch {r['batch']})", flush=True)
    return {'patch_size': args.patch_size, 'token_patch': 2, 'latent_channels': args.latent_channels,
            'top_k': args.top_k, 'prompt_tokens': args.top_k * (args.patch_size // 4) ** 2, 'bf16': bool(args.bf16),
            'rows': rows}


def run_e2e(args):
    """The demo model end to end, LR --e2e-lr² -> ×4 on one image, split by pipeline stage. Weights: the trained
    demo run when it exists (realistic PGS groups), else random init (same cost, arbitrary groups)."""
    from patchscaler.inference import checkpoint_files, load_pipeline
    from patchscaler.utils.cli import load_option_file
    from patchscaler.utils.timing import measure
    opt = load_option_file(osp.join(REPO, args.e2e_opt))
    ckpt = osp.join(REPO, args.e2e_ckpt) if args.e2e_ckpt else ''
    trained = bool(ckpt and osp.isdir(ckpt) and len(checkpoint_files(ckpt)) == 3)
    if not trained:
        from basicsr.archs import build_network
        tmp = osp.join(args.out, 'random_init')
        os.makedirs(tmp, exist_ok=True)
        for name in ('grm', 'dit', 'texture'):
            torch.manual_seed(0)
            torch.save({'params': build_network(dict(opt[f'network_{name}'])).state_dict()},
                       osp.join(tmp, f'net_{name}_latest.pth'))
    if opt.get('rtm') and not osp.isabs(opt['rtm']['path']):
        opt['rtm']['path'] = osp.join(REPO, opt['rtm']['path'])
    pipe = load_pipeline(opt, args.device, ckpt if trained else tmp)
    from skimage import data
    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    lq = torch.nn.functional.interpolate(img, size=(args.e2e_lr, args.e2e_lr), mode='area')
    t = measure(lambda: pipe(lq, return_grm=False), args.device, args.repeats, args.warmup)
    out = t['result']
    stages = dict(out.seconds)
    total = sum(stages.values())
    print(f"end to end {args.e2e_lr}->{args.e2e_lr * pipe.scale}: {t['median_s']:.2f} s (" +
          ', '.join(f'{k} {v:.2f} s' for k, v in stages.items()) + ')', flush=True)
    return {'opt': args.e2e_opt, 'weights': 'trained demo run' if trained else 'random init', 'lr_size': args.e2e_lr,
            'scale': pipe.scale, 'wall_s': t['median_s'], 'peak_mem_mb': t['peak_mem_mb'],
            'stages_s': stages, 'stage_share': {k: v / total for k, v in stages.items()},
            'nfe': out.report.nfe_total, 'nfe_uniform': out.report.nfe_uniform,
            'patches_per_group': list(out.report.patches_per_group)}


BASELINES = {  # the paper-scale generators of options/baselines/
    'Real-ESRGAN (RRDBNet, 23 blocks)': dict(type='RRDBNet', num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23,
                                             num_grow_ch=32),
    'SwinIR-M (real-world, nearest+conv)': dict(type='SwinIR', upscale=4, in_chans=3, img_size=64, window_size=8,
                                                img_range=1.0, depths=[6] * 6, embed_dim=180, num_heads=[6] * 6,
                                                mlp_ratio=2, upsampler='nearest+conv', resi_connection='1conv'),
}


def run_baselines(args):
    """Real-ESRGAN's and SwinIR's generators at paper size, random init, on the same --e2e-lr² input as e2e."""
    from basicsr.archs import build_network
    device, rows = torch.device(args.device), []
    lq = torch.rand(1, 3, args.e2e_lr, args.e2e_lr, generator=torch.Generator().manual_seed(0)).to(device)
    for name, net_opt in BASELINES.items():
        net = build_network(dict(net_opt)).to(device).eval()

        def call(net=net):
            with torch.no_grad():
                return net(lq)
        t = measure_interleaved([call], device, args.repeats, args.warmup)[0]
        rows.append({'model': name, 'params_m': sum(p.numel() for p in net.parameters()) / 1e6,
                     'wall_s': t['median_s'], 'peak_mem_mb': t['peak_mem_mb']})
        print(f"{name}: {t['median_s']:.2f} s for {args.e2e_lr}->{4 * args.e2e_lr}", flush=True)
    return {'lr_size': args.e2e_lr, 'rows': rows}


def markdown_baselines(result):
    b = result['baselines']
    lines = [f"Baseline generators, random init, LR {b['lr_size']}² → ×4 on {result['device_name']} "
             f"({result['device']}, {result['threads']} threads), median of {result['repeats']}:", '',
             '| model | params (M) | wall (s) |', '| --- | ---: | ---: |']
    lines += [f"| {r['model']} | {r['params_m']:.1f} | {r['wall_s']:.2f} |" for r in b['rows']]
    return '\n'.join(lines) + '\n'


def markdown_dit(result):
    d = result['dit']
    tokens = (d['patch_size'] // d['token_patch']) ** 2
    lines = [f"Patch-DiT per call of one V={d['patch_size']} patch (p={d['token_patch']}: {tokens} tokens; texture "
             f"prompt K={d['top_k']}: {d['prompt_tokens']} tokens of width 384) on {result['device_name']} "
             f"({result['device']}, {result['threads']} threads"
             f"{', bf16' if d['bf16'] else ''}), median of {result['repeats']}:", '',
             '| preset | params (M) | GFLOPs per call | ms per patch (batch) | texture encoder: params (M), GFLOPs '
             'per patch |',
             '| --- | ---: | ---: | ---: | --- |']
    for r in d['rows']:
        lines.append(f"| {r['preset']} | {r['params_m']:.1f} | {r['gflops_per_call']:.2f} | {r['ms_per_patch']:.1f} "
                     f"({r['batch']}) | {r['encoder_params_m']:.1f}, {r['encoder_gflops_per_patch']:.3f} "
                     "(once per patch) |")
    return '\n'.join(lines) + '\n'


def markdown_e2e(result):
    e = result['e2e']
    stages = ' | '.join(f"{v:.2f} s ({100 * e['stage_share'][k]:.0f}%)" for k, v in e['stages_s'].items())
    return '\n'.join([
        f"End to end, {e['opt']} ({e['weights']}), LR {e['lr_size']}² → ×{e['scale']} on {result['device_name']} "
        f"({result['device']}, {result['threads']} threads), median of {result['repeats']}: "
        f"PGS did {e['nfe']} patch evaluations vs {e['nfe_uniform']} uniform "
        f"(groups {'/'.join(map(str, e['patches_per_group']))}).", '',
        '| total | ' + ' | '.join(e['stages_s']) + ' |', '| ---: |' + ' ---: |' * len(e['stages_s']),
        f"| {e['wall_s']:.2f} s | {stages} |"]) + '\n'


def markdown(result):
    parts = []
    if 'pgs' in result:
        parts.append(markdown_pgs(result))
    if 'retrieval' in result:
        parts.append(markdown_retrieval(result))
    if 'dit' in result:
        parts.append(markdown_dit(result))
    if 'e2e' in result:
        parts.append(markdown_e2e(result))
    if 'baselines' in result:
        parts.append(markdown_baselines(result))
    return '\n'.join(parts)


def markdown_pgs(result):
    inp, den = result['input'], result['denoiser']
    lines = [f"PGS vs uniform on {result['device_name']} ({result['device']}, {result['threads']} threads, "
             f"torch {result['torch']}): LR {inp['lr_size']}² ×{inp['scale']} → latent "
             f"{'×'.join(map(str, inp['latent'][1:]))}, {inp['patches']} patches of {inp['patch_size']}², "
             f"denoiser {den['model']} ({den['params_m']:.1f} M params, random init"
             f"{', bf16' if den['bf16'] else ''}), batch {den['batch_size']}, median of {result['repeats']}.",
             '',
             '| scenario | patches simple/medium/hard | NFE | NFE ratio | wall (s) | wall ratio | overhead (s) |',
             '| --- | --- | ---: | ---: | ---: | ---: | ---: |']
    for r in result['pgs']:
        groups = '/'.join(map(str, r['patches_per_group'])) if len(r['patches_per_group']) > 1 else \
            f"{r['patches_per_group'][0]} (one group)"
        lines.append(f"| {r['scenario']} | {groups} | {r['nfe']} | {r['nfe_ratio']:.2f} | {r['wall_s']:.2f} | "
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
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--parts', nargs='+', choices=['pgs', 'retrieval', 'dit', 'e2e', 'baselines'],
                   default=['pgs', 'retrieval', 'dit', 'e2e', 'baselines'])
    p.add_argument('--dit-presets', nargs='+', choices=sorted(MODELS), default=['S', 'B', 'L'])
    p.add_argument('--dit-batch', type=int, default=8, help='dit: patches per timed Patch-DiT call')
    p.add_argument('--e2e-opt', default='options/demo/test_patchscaler_demo.yml', help='e2e: model options')
    p.add_argument('--e2e-ckpt', default='experiments/demo_patchscaler_x4', help='e2e: trained run (else random)')
    p.add_argument('--e2e-lr', type=int, default=128, help='e2e: LR side')
    p.add_argument('--out-size', type=int, default=2048, help='retrieval: output side whose patches query the RTM')
    p.add_argument('--rtm-size', type=int, default=2000, help='retrieval: memory size (paper: 2,000)')
    p.add_argument('--top-k', type=int, default=4)
    p.add_argument('--out', default='results/benchmark')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
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

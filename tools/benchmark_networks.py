"""The cost of the networks, for ``tools/benchmark.py --parts dit e2e baselines`` (the CLI and the other parts
live there):

- ``dit``: Patch-DiT per preset: parameters, GFLOPs per call of one patch (torch's FLOP counter), ms per patch,
  with a K=4 texture prompt, and the texture encoder's cost (once per patch);
- ``e2e``: a PatchScaler option file end to end on one image, split by pipeline stage (encode, GRM, PGS,
  decode, color fix); the trained demo run's weights when present, else random init;
- ``baselines``: Real-ESRGAN's and SwinIR's generators at paper size on the same input;
- ``stablesr``: StableSR (its 20-step sampler on every tile, no GRM) vs StableSR+PGS (GRM + the paper's groups) with
  the same UNet weights on the same image, end to end; the demo's trained runs when present, else random init;
  ``--stablesr-size sd21`` uses a random-init SD-2.1-size UNet (77-token prompt) and SD VAE instead (V = 64,
  LR 512, GPU-sized). An untrained GRM grades every patch hard, so random-init runs group by fixed shares.
"""
import os
import os.path as osp

import torch

from patchscaler.archs.patch_dit_arch import PatchDiT
from patchscaler.utils.timing import measure_interleaved

REPO = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
MODELS = {'tiny': dict(hidden_size=192, depth=4, num_heads=3), 'S': dict(preset='S'), 'B': dict(preset='B'),
          'L': dict(preset='L')}  # Patch-DiT sizes: the presets of patchscaler/archs/patch_dit_arch.py


def _dit_row(name, args, device):
    from torch.utils.flop_counter import FlopCounterMode

    from patchscaler.archs.texture_encoder_arch import TextureEncoder
    from patchscaler.models.prompted_dit import PromptedPatchDiT
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


def _paper_pipeline(args, opt):
    """The networks of ``opt`` (options/test_patchscaler.yml: GRM, Patch-DiT B, texture encoder) at random init,
    the SD VAE's architecture at random init and a random 2,000-patch RTM: the paper-scale cost, no files."""
    from basicsr.archs import build_network

    from patchscaler.archs.autoencoder_arch import build_autoencoder
    from patchscaler.models.pipeline import PatchScalerPipeline
    from patchscaler.models.pipeline_options import build_sampler_for, speed_options
    from patchscaler.models.prompted_dit import PromptedPatchDiT
    from patchscaler.retrieval import ReferenceTextureMemory
    torch.manual_seed(0)
    device = torch.device(args.device)
    ae = build_autoencoder({'type': 'DiffusersAutoencoderKL', 'config': SD_VAE, 'scaling_factor': 0.18215})
    grm = build_network(dict(opt['network_grm']))
    denoiser = PromptedPatchDiT(build_network(dict(opt['network_dit'])), build_network(dict(opt['network_texture'])))
    v = denoiser.patch_size
    rtm = ReferenceTextureMemory.build(torch.randn(2000, 4, v, v, generator=torch.Generator().manual_seed(0)), None,
                                       2000, fps='keys', top_k=opt['rtm'].get('top_k', 4)).to(device)
    sampler = build_sampler_for(opt, denoiser)
    sampler.batch_size = args.batch_size
    return PatchScalerPipeline(ae.to(device), grm.to(device).eval(), opt['scale'], denoiser.to(device).eval(), sampler,
                               rtm, color_fix=True, tile=opt.get('tile'), tile_overlap=opt.get('tile_overlap'),
                               **speed_options(opt))


def _variant(pipe, sampler_opt, devices=None):
    """``pipe`` with another sampler (same networks, RTM and options) and optionally group-parallel devices."""
    from patchscaler.models.pipeline import PatchScalerPipeline
    from patchscaler.sampling import build_sampler
    return PatchScalerPipeline(pipe.autoencoder, pipe.grm, pipe.scale, pipe.denoiser, build_sampler(sampler_opt),
                               pipe.rtm, pipe.top_k, pipe.color_fix, pipe.tile, pipe.tile_overlap, pipe.autocast,
                               pipe.autoencoder_autocast, devices=devices)


def run_e2e(args):
    """A PatchScaler option file end to end on one image (LR --e2e-lr² -> ×4), split by pipeline stage: PGS and
    uniform sampling (one group, τ = 1000, 20 steps) with the same networks, and with --devices PGS's groups on
    several devices; timed round-robin. Weights: ``--e2e-size demo``: the trained demo run when it exists
    (realistic groups), else random init; ``paper``: the paper-scale networks of --e2e-opt (default
    options/test_patchscaler.yml) at random init with the SD VAE architecture, grouped by fixed shares."""
    import yaml

    from patchscaler.inference import checkpoint_files, load_pipeline
    from patchscaler.utils.cli import load_option_file
    from patchscaler.utils.timing import measure_interleaved
    opt_file = args.e2e_opt or ('options/test_patchscaler.yml' if args.e2e_size == 'paper' else
                                'options/demo/test_patchscaler_demo.yml')
    opt = load_option_file(osp.join(REPO, opt_file))
    if args.bf16:
        opt['autocast'] = 'bf16'
    if opt.get('compile') and args.devices:
        raise SystemExit('error: compile and --devices together are not supported (torch.compile is not thread-safe)')
    if isinstance(opt.get('sampler'), str):
        with open(osp.join(REPO, opt['sampler'])) as f:
            opt['sampler'] = yaml.safe_load(f)['sampler']
    trained = False
    if args.e2e_size == 'paper':
        pipe, weights = _paper_pipeline(args, opt), 'paper-scale networks, random init'
    else:
        ckpt = osp.join(REPO, args.e2e_ckpt) if args.e2e_ckpt else ''
        trained = bool(ckpt and osp.isdir(ckpt) and len(checkpoint_files(ckpt)) == 3)
        if not trained:
            from basicsr.archs import build_network
            ckpt = osp.join(args.out, 'random_init')
            os.makedirs(ckpt, exist_ok=True)
            for name in ('grm', 'dit', 'texture'):
                torch.manual_seed(0)
                torch.save({'params': build_network(dict(opt[f'network_{name}'])).state_dict()},
                           osp.join(ckpt, f'net_{name}_latest.pth'))
        if opt.get('rtm') and not osp.isabs(opt['rtm']['path']):
            opt['rtm']['path'] = osp.join(REPO, opt['rtm']['path'])
        pipe = load_pipeline(opt, args.device, ckpt)
        weights = 'trained demo run' if trained else 'random init'
    pgs_opt = dict(opt['sampler'], batch_size=args.batch_size)
    if not trained:  # an untrained GRM grades (nearly) every patch hard: grade by fixed shares instead
        pgs_opt['grouping'] = {'mode': 'share', 'shares': list(RANDOM_INIT_SHARES)}
        weights += f', groups by share {"/".join(map(str, RANDOM_INIT_SHARES))}'
    uniform_opt = dict(pgs_opt, groups=[{'tau': 1000, 'steps': 20}], grouping=None)
    variants = [('uniform (20 steps, τ=1000)', _variant(pipe, uniform_opt)), ('PGS', _variant(pipe, pgs_opt))]
    if 'per_step' in getattr(args, 'executions', ()):  # step-synchronous PGS: the same patches, fewer calls
        variants.append(('PGS per_step', _variant(pipe, dict(pgs_opt, execution='per_step'))))
    if args.devices:
        variants.append((f"PGS on {','.join(args.devices)}", _variant(pipe, pgs_opt, args.devices)))
    from skimage import data
    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    lq = torch.nn.functional.interpolate(img, size=(args.e2e_lr, args.e2e_lr), mode='area')
    timed = measure_interleaved([lambda p=p: p(lq, return_grm=False) for _, p in variants], args.device,
                                args.repeats, args.warmup)
    out_mp = (args.e2e_lr * pipe.scale) ** 2 / 1e6
    rows = []
    for (name, _), t in zip(variants, timed):
        out = t['result']
        stages = dict(out.seconds)
        total = sum(stages.values())
        rows.append({'variant': name, 'wall_s': t['median_s'], 'peak_mem_mb': t['peak_mem_mb'],
                     'megapixels_per_s': out_mp / t['median_s'], 'stages_s': stages,
                     'stage_share': {k: v / total for k, v in stages.items()}, 'nfe': out.report.nfe_total,
                     'denoiser_calls': out.report.denoiser_calls,
                     'patches_per_group': list(out.report.patches_per_group)})
    for r in rows:
        r['wall_ratio'], r['nfe_ratio'] = r['wall_s'] / rows[0]['wall_s'], r['nfe'] / rows[0]['nfe']
        print(f"end to end {args.e2e_lr}->{args.e2e_lr * pipe.scale}, {r['variant']}: {r['wall_s']:.2f} s "
              f"({r['wall_ratio']:.2f}x uniform, NFE {r['nfe_ratio']:.2f}x; " +
              ', '.join(f'{k} {v:.2f} s' for k, v in r['stages_s'].items()) + ')', flush=True)
    pgs = rows[1]
    return {'opt': opt_file, 'size': args.e2e_size, 'weights': weights, 'lr_size': args.e2e_lr, 'scale': pipe.scale,
            'autocast': opt.get('autocast'), 'rows': rows,
            # the PGS row's figures at the top level, as earlier versions of this file wrote them
            'wall_s': pgs['wall_s'], 'peak_mem_mb': pgs['peak_mem_mb'], 'stages_s': pgs['stages_s'],
            'stage_share': pgs['stage_share'], 'nfe': pgs['nfe'], 'nfe_uniform': rows[0]['nfe'],
            'patches_per_group': pgs['patches_per_group']}


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


SD21_UNET = dict(  # stable-diffusion-2-1-base's UNet2DConditionModel configuration
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'], up_block_types=['UpBlock2D'] +
    ['CrossAttnUpBlock2D'] * 3, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
              block_out_channels=[128, 256, 512, 512], down_block_types=['DownEncoderBlock2D'] * 4,
              up_block_types=['UpDecoderBlock2D'] * 4)


RANDOM_INIT_SHARES = (0.4, 0.3, 0.3)  # simple/medium/hard shares when the GRM is untrained (a choice)


def _stablesr_pipelines(args, device):
    """(StableSR pipeline, StableSR+PGS pipeline, weights note): one UNet object shared by both."""
    from basicsr.archs import build_network

    from patchscaler.archs.autoencoder_arch import build_autoencoder
    from patchscaler.models.pipeline import PatchScalerPipeline
    from patchscaler.models.stablesr_model import STABLESR_SCHEDULER
    from patchscaler.sampling import build_sampler
    from patchscaler.utils.checkpoint import load_weights
    from patchscaler.utils.cli import load_option_file
    opt = load_option_file(osp.join(REPO, args.stablesr_opt))
    torch.manual_seed(0)
    trained = False
    if args.stablesr_size == 'sd21':
        ae = build_autoencoder({'type': 'DiffusersAutoencoderKL', 'config': SD_VAE, 'scaling_factor': 0.18215})
        unet = build_network({'type': 'StableSRUNet', 'unet': SD21_UNET, 'patch_size': 64, 'prompt_tokens': 77})
        grm = build_network(dict(opt['network_grm'], in_channels=4))
        pgs_opt = dict(opt['sampler'], patch_size=64, stride=32, scheduler=dict(STABLESR_SCHEDULER),
                       prediction_type='epsilon')
        weights = 'random init, SD-2.1-base UNet + SD VAE sizes'
    else:
        ae = build_autoencoder(opt['autoencoder'])
        unet, grm, pgs_opt = build_network(dict(opt['network_g'])), build_network(dict(opt['network_grm'])), \
            dict(opt['sampler'])
        files = {'g': opt['path'].get('pretrain_network_g'), 'grm': opt['path'].get('pretrain_network_grm')}
        trained = all(f and osp.isfile(osp.join(REPO, f)) for f in files.values())
        if trained:
            load_weights(unet, osp.join(REPO, files['g']), 'params_ema')
            load_weights(grm, osp.join(REPO, files['grm']), 'params')
        weights = 'trained demo runs' if trained else 'random init'
    if not trained:  # a random GRM's confidence is ~0.5 everywhere (all hard): grade by fixed shares instead
        pgs_opt['grouping'] = {'mode': 'share', 'shares': list(RANDOM_INIT_SHARES)}
        weights += f', groups by share {"/".join(map(str, RANDOM_INIT_SHARES))}'
    pgs_opt['batch_size'] = args.batch_size
    uniform_opt = dict(pgs_opt, groups=[{'tau': 1000, 'steps': 20}])
    uniform_opt.pop('grouping', None)
    ae, unet, grm = ae.to(device), unet.to(device).eval(), grm.to(device).eval()
    dtype = 'bf16' if args.bf16 else None
    uniform = PatchScalerPipeline(ae, None, 4, unet, build_sampler(uniform_opt), autocast=dtype)
    pgs = PatchScalerPipeline(ae, grm, 4, unet, build_sampler(pgs_opt), autocast=dtype)
    return uniform, pgs, weights


def run_stablesr(args):
    """StableSR vs StableSR+PGS end to end on the same image (LR --stablesr-lr², default 128 for the demo networks
    and 512 for sd21, the paper's 512 -> 2048), the same UNet weights, timed round-robin."""
    from skimage import data
    device = torch.device(args.device)
    uniform, pgs, weights = _stablesr_pipelines(args, device)
    size = args.stablesr_lr or (512 if args.stablesr_size == 'sd21' else 128)
    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    lq = torch.nn.functional.interpolate(img, size=(size, size), mode='area').to(device)
    runs = [lambda: uniform(lq, return_grm=False), lambda: pgs(lq, return_grm=False)]
    times = measure_interleaved(runs, device, args.repeats, args.warmup)
    rows = []
    for name, t in zip(('StableSR', 'StableSR+PGS'), times):
        out = t['result']
        rows.append({'model': name, 'wall_s': t['median_s'], 'peak_mem_mb': t['peak_mem_mb'],
                     'nfe': out.report.nfe_total, 'patches_per_group': list(out.report.patches_per_group),
                     'stages_s': dict(out.seconds)})
    for r in rows:
        r['wall_ratio'] = r['wall_s'] / rows[0]['wall_s']
        r['nfe_ratio'] = r['nfe'] / rows[0]['nfe']
    print(f"StableSR {rows[0]['wall_s']:.2f} s, StableSR+PGS {rows[1]['wall_s']:.2f} s = {rows[1]['wall_ratio']:.2f}x "
          f"(NFE {rows[1]['nfe_ratio']:.2f}x; paper, SD-2.1 on an A100: 0.24x)", flush=True)
    return {'size': args.stablesr_size, 'weights': weights, 'lr_size': size,
            'patch_size': pgs.sampler.patch_size, 'rows': rows}


def markdown_stablesr(result):
    s = result['stablesr']
    lines = [f"StableSR vs StableSR+PGS, the same UNet ({s['weights']}), LR {s['lr_size']}² → ×4, V = "
             f"{s['patch_size']}, on {result['device_name']} ({result['device']}, {result['threads']} threads), "
             f"median of {result['repeats']}; the paper's Table 3: 0.24× on an A100 (SD-2.1, 512 → 2048):", '',
             '| model | patches per group | NFE | NFE ratio | wall (s) | wall ratio | GRM (s) | sampling (s) |',
             '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in s['rows']:
        st = r['stages_s']
        lines.append(f"| {r['model']} | {'/'.join(map(str, r['patches_per_group']))} | {r['nfe']} | "
                     f"{r['nfe_ratio']:.2f} | {r['wall_s']:.2f} | {r['wall_ratio']:.2f} | "
                     f"{st.get('grm', 0.0):.2f} | {st.get('pgs', 0.0):.2f} |")
    return '\n'.join(lines) + '\n'


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
    mem = any(r['peak_mem_mb'] is not None for r in e['rows'])
    stages = list(e['rows'][0]['stages_s'])
    lines = [f"End to end, {e['opt']} ({e['weights']}{', bf16 autocast' if e.get('autocast') else ''}), LR "
             f"{e['lr_size']}² → ×{e['scale']} on {result['device_name']} ({result['device']}, {result['threads']} "
             f"threads), median of {result['repeats']}, variants timed round-robin:", '',
             '| variant | patches per group | NFE | NFE ratio | calls | wall (s) | wall ratio | output MP/s | '
             + ('peak GPU memory (MiB) | ' if mem else '') + ' | '.join(stages) + ' |',
             '| --- | --- |' + ' ---: |' * (6 + mem + len(stages))]
    for r in e['rows']:
        share = ' | '.join(f"{r['stages_s'][k]:.2f} s ({100 * r['stage_share'][k]:.0f}%)" for k in stages)
        groups = '/'.join(map(str, r['patches_per_group']))
        lines.append(f"| {r['variant']} | {groups} | {r['nfe']} | {r['nfe_ratio']:.2f} | "
                     f"{r.get('denoiser_calls', '')} | {r['wall_s']:.2f} | {r['wall_ratio']:.2f} | "
                     f"{r['megapixels_per_s']:.3f} | " + (f"{r['peak_mem_mb']:.0f} | " if mem else '') + share + ' |')
    return '\n'.join(lines) + '\n'

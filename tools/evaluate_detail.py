"""Does the diffusion stage restore detail, or add grain? One evaluation of bicubic, the GRM, PatchScaler with PGS,
PatchScaler with uniform sampling (same weights, same seed) and, given a second test file, PatchScaler without the
texture prompt, on the datasets of a test option file (see patchscaler/compare/detail.py for every measure).

    python tools/evaluate_detail.py -opt options/demo/test_patchscaler_demo.yml
    python tools/evaluate_detail.py -opt options/texture_task/test_patchscaler_texture.yml \\
        --no-prompt-opt options/texture_task/test_patchscaler_texture_noprompt.yml

Writes <out>/detail.md (also printed), detail.json and strip_<set>.png (default out: results/<name>_detail).
Several runs (e.g. one per training seed) as mean ± std: --aggregate OUT1 OUT2 ... -o OUT (detail.md, detail.json).
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), osp.pardir)))

from patchscaler.utils.cli import load_option_file, one_line  # noqa: E402  (importing patchscaler applies the fixes)
from patchscaler.utils.device import enable_tf32  # noqa: E402
from patchscaler.utils.errors import PatchScalerError  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('-opt', '--opt', help='PatchScaler test option file (networks, weights, sampler, datasets)')
    p.add_argument('--aggregate', nargs='+', metavar='OUT', help='output folders of earlier runs: their detail.json '
                   'as mean ± std (no evaluation)')
    p.add_argument('--ckpt', default=None, help='a training run (experiments/NAME): its latest networks replace the '
                   'file\'s weights')
    p.add_argument('--no-prompt-opt', default=None, help='test file of a model trained without the texture prompt')
    p.add_argument('--no-prompt-ckpt', default=None, help='its training run, as --ckpt')
    p.add_argument('-o', '--out', default=None, help='output folder (default results/<name>_detail)')
    p.add_argument('--device', default=None, help='cpu, cuda, cuda:1 (default: cuda when available)')
    p.add_argument('--seed', type=int, default=0, help='seed of the sampling noise (the same for every output)')
    p.add_argument('--crop-border', type=int, default=4)
    p.add_argument('--margin', type=int, default=8, help='pixels taken off each class region\'s border')
    p.add_argument('--max-images', type=int, default=None, help='per set')
    p.add_argument('--uniform-steps', type=int, default=None, help='steps of the uniform sampler (default: the '
                   'hardest group\'s)')
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    enable_tf32()  # CUDA float32 matmuls in TF32 (patchscaler.utils.device)
    if args.aggregate:
        return aggregate(args.aggregate, args.out or 'results/detail_aggregate')
    if not args.opt:
        p.error('-opt is required (or --aggregate)')
    try:
        from patchscaler.compare.detail import detail_markdown, evaluate_detail
        opt = load_option_file(args.opt)
        no_prompt = load_option_file(args.no_prompt_opt) if args.no_prompt_opt else None
        out = args.out or osp.join('results', f"{opt.get('name', 'patchscaler')}_detail")
        result = evaluate_detail(opt, no_prompt, args.device, args.ckpt, args.no_prompt_ckpt, args.seed,
                                 args.crop_border, args.margin, args.max_images, out_dir=out,
                                 uniform_steps=args.uniform_steps, progress=not args.no_progress)
    except PatchScalerError as e:
        print(f'error: {one_line(e)}', file=sys.stderr)
        sys.exit(2)
    print(detail_markdown(result))
    print(f'written to {out}/ (detail.md, detail.json, strip_<set>.png)')


def aggregate(folders, out):
    import json

    from patchscaler.compare.detail import aggregate_detail, detail_markdown, write_detail
    results = []
    for folder in folders:
        path = osp.join(folder, 'detail.json')
        if not osp.isfile(path):
            print(f'error: {path} not found (an output folder of tools/evaluate_detail.py?)', file=sys.stderr)
            sys.exit(2)
        with open(path) as f:
            results.append(json.load(f))
    result = aggregate_detail(results)
    write_detail(result, {}, out)
    print(detail_markdown(result))
    print(f'written to {out}/ (detail.md, detail.json)')

if __name__ == '__main__':
    main()

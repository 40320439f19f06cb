"""Compare SR models side by side on one dataset: ``python tools/compare.py -opt options/compare_x4.yml``.

Each model (a test option file + its weights) runs in its own process on the same images with the same
metrics; ``results/<name>/`` gets metrics.csv / .json / .md, runtime_quality.png and report.html (offline).
A model that fails is a "failed: <reason>" row and the rest of the report is still written (exit status 1).
"""
import argparse
import os
import os.path as osp
import sys

REPO = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
sys.path.insert(0, REPO)

from patchscaler.compare import run_comparison  # noqa: E402  (importing patchscaler applies the fixes)
from patchscaler.utils.cli import load_option_file, one_line  # noqa: E402
from patchscaler.utils.device import enable_tf32  # noqa: E402
from patchscaler.utils.errors import PatchScalerError  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('-opt', '--opt', required=True, help='comparison options (options/compare_x4.yml)')
    p.add_argument('--device', default=None, help='cpu, cuda, cuda:1 (default: the options\' device, else cuda '
                   'when available)')
    p.add_argument('--max-images', type=int, default=None, help='only the first N images')
    args = p.parse_args(argv)
    enable_tf32()  # CUDA float32 matmuls in TF32 (patchscaler.utils.device)
    try:
        opt = dict(load_option_file(args.opt))
        if args.max_images:
            opt['max_images'] = args.max_images
        rows, folder = run_comparison(opt, os.getcwd(), args.device)
    except PatchScalerError as e:
        print(f'error: {one_line(e)}', file=sys.stderr)
        sys.exit(2)
    with open(osp.join(folder, 'metrics.md')) as f:
        print(f.read())
    print(f'report: {osp.join(folder, "report.html")}')
    failed = [r for r in rows if r['status'] != 'ok']
    for r in failed:
        print(f"failed: {r['model']}: {r['reason']}", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == '__main__':
    main()

"""Build the Reference Texture Memory: ``python tools/build_rtm.py -opt options/build_rtm.yml``.

Reads the HR images of ``sources`` (folders or BasicSR LMDBs), encodes V×V latent patches with the
configured frozen autoencoder, computes texture keys, keeps ``size`` of them by farthest point sampling and
writes ``<output>.safetensors`` (+ ``.json`` metadata, + ``_preview.png``). The demo:
``python tools/build_rtm.py -opt options/demo/build_rtm_demo.yml`` (seconds on a CPU).
"""
import argparse
import os.path as osp
import sys

REPO = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
sys.path.insert(0, REPO)

from patchscaler.retrieval import build_rtm_from_options  # noqa: E402  (importing patchscaler applies the fixes)
from patchscaler.utils.cli import load_option_file, one_line  # noqa: E402
from patchscaler.utils.errors import PatchScalerError  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('-opt', '--opt', required=True, help='RTM option file (options/build_rtm.yml)')
    p.add_argument('--device', default=None, help="cpu, cuda, cuda:1 (default: the file's device, else auto)")
    p.add_argument('--output', default=None, help="overrides the file's output path")
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    try:
        build_rtm_from_options(load_option_file(args.opt), device=args.device, output=args.output,
                               progress=not args.no_progress)
    except PatchScalerError as e:
        print(f'error: {one_line(e)}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()

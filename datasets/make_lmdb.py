"""Build a BasicSR LMDB (+ meta_info.txt) from a folder of images. See datasets/README.md for each dataset.

    python datasets/make_lmdb.py SRC_FOLDER datasets/NAME/NAME_HR.lmdb [--crop 480 --step 240]
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), osp.pardir)))

import patchscaler  # noqa: E402,F401
from patchscaler.data.lmdb_builder import build_lmdb  # noqa: E402
from patchscaler.utils.errors import PatchScalerError  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', help='folder of HR images (searched recursively)')
    p.add_argument('lmdb', help='output path ending in .lmdb')
    p.add_argument('--crop', type=int, default=None, help='cut into sub-images of this size (e.g. 480)')
    p.add_argument('--step', type=int, default=None, help='sub-image step (default: crop size)')
    p.add_argument('--thresh', type=int, default=0, help='keep a border crop when the rest exceeds this')
    p.add_argument('--overwrite', action='store_true')
    args = p.parse_args(argv)
    try:
        n, skipped = build_lmdb(args.src, args.lmdb, args.crop, args.step, args.thresh, args.overwrite)
    except PatchScalerError as e:
        sys.exit(f'error: {e}')
    print(f'wrote {n} images to {args.lmdb}')
    for s in skipped:
        print(f'skipped: {s}')


if __name__ == '__main__':
    main()

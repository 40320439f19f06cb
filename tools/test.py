"""Test with BasicSR's loop: ``python tools/test.py -opt options/demo/test_grm_demo.yml``.

Results (images, confidence maps, side-by-side strips, log with metrics) go to ``results/<name>/``.
"""
import os.path as osp
import sys

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
sys.path.insert(0, ROOT)

import patchscaler  # noqa: E402,F401  (compat fixes + registration, before BasicSR runs)
from basicsr.test import test_pipeline  # noqa: E402

from patchscaler.utils.cli import run_pipeline  # noqa: E402

if __name__ == '__main__':
    run_pipeline(test_pipeline, ROOT)

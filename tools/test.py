"""Test with BasicSR's loop: ``python tools/test.py -opt options/demo/test_grm_demo.yml``.

Results (images, confidence maps, side-by-side strips, log with metrics) go to ``results/<name>/``.
"""
import os
import os.path as osp
import sys

REPO = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
sys.path.insert(0, REPO)  # run from a checkout without installing, too

from patchscaler.utils.cli import run_pipeline  # noqa: E402  (importing patchscaler applies BasicSR's fixes)

if __name__ == '__main__':
    # outputs (experiments/, results/, tb_logger/) land in the working directory, where the option
    # files' relative data paths are resolved too
    run_pipeline('test', os.getcwd())

"""Train with BasicSR's loop: ``python tools/train.py -opt options/train_patchscaler.yml [--auto_resume]``.

Multi-GPU: ``torchrun --nproc_per_node N tools/train.py -opt ... --launcher pytorch`` (gloo on CPU).
Outputs go to ``experiments/<name>/`` (models, training_states, visualization, log) and ``tb_logger/``.
"""
import os.path as osp
import sys

ROOT = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
sys.path.insert(0, ROOT)  # run from a checkout without installing, too

import patchscaler  # noqa: E402,F401  (compat fixes + registration, before BasicSR runs)
from basicsr.train import train_pipeline  # noqa: E402

from patchscaler.utils.cli import run_pipeline  # noqa: E402

if __name__ == '__main__':
    run_pipeline(train_pipeline, ROOT)

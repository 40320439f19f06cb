"""Train with BasicSR's loop: ``python tools/train.py -opt options/train_patchscaler.yml [--auto_resume]``.

Multi-GPU: ``torchrun --nproc_per_node N tools/train.py -opt ... --launcher pytorch`` (gloo on CPU).
Outputs go to ``experiments/<name>/`` (models, training_states, visualization, log) and ``tb_logger/``.
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
    run_pipeline('train', os.getcwd())

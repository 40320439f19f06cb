"""Metrics (BasicSR ``METRIC_REGISTRY``): the paper's ManIQA / CLIPIQA / MUSIQ and LPIPS through pyiqa from local
weights (:mod:`.iqa`), next to BasicSR's own PSNR, SSIM and NIQE; :class:`MetricTable` scores a test set."""
from .iqa import WEIGHT_FILES, MetricUnavailable, build_metric, missing_files, weights_dir  # noqa: F401
from .table import MetricTable, better, needs_reference  # noqa: F401

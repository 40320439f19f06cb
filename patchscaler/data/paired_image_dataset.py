"""LR/HR pairs (or LR alone) for validation and testing, matched by file name.

Compared with BasicSR's ``PairedImageDataset`` (whose option names it keeps): no ``filename_tmpl`` to get
right, a missing GT folder is allowed (real LR test sets: images are written, reference metrics skipped;
no-reference metrics come with the metrics issue), a GT whose size is
not exactly ``scale`` × LR is cropped to it, and an unreadable file does not stop the run: the item comes
back with an ``error`` entry, the model skips it and lists it at the end.

``dataroot_labels`` (optional): a folder of class maps, one single-channel uint8 PNG per HR image with the
same name (the known-answer task's, ``datasets/make_texture_task.py``); items then carry ``labels``, a (H, W)
uint8 tensor cropped like the GT, which ``tools/evaluate_detail.py`` scores per class.
"""
import os

import numpy as np
import torch
from basicsr.utils import img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from patchscaler.data.image_io import ImageSource, read_image_raw
from patchscaler.utils.errors import DataError


def _stem(key):
    return os.path.splitext(os.path.basename(key))[0]


@DATASET_REGISTRY.register()
class PairedSRDataset(data.Dataset):
    """Options: dataroot_lq (folder or .lmdb), dataroot_gt (optional), scale, meta_info (optional, LR side)."""

    OPTION_KEYS = {'name', 'type', 'phase', 'scale', 'dataroot_lq', 'dataroot_gt', 'dataroot_labels', 'meta_info',
                   'io_backend', 'num_worker_per_gpu', 'batch_size_per_gpu', 'filename_tmpl', 'prefetch_mode',
                   'pin_memory'}

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.scale = int(opt['scale'])
        self.lq = ImageSource(opt['dataroot_lq'], opt.get('meta_info'))
        self.gt = ImageSource(opt['dataroot_gt']) if opt.get('dataroot_gt') else None
        self.gt_index = {}
        if self.gt is not None:
            self.gt_index = {_stem(k): i for i, k in enumerate(self.gt.keys)}
            missing = [k for k in self.lq.keys if _stem(k) not in self.gt_index]
            if missing:
                raise DataError(f'{len(missing)} LR image(s) have no GT of the same name in {opt["dataroot_gt"]}, '
                                f'e.g. {missing[0]}')
        self.labels = opt.get('dataroot_labels')
        if self.labels is not None and not os.path.isdir(self.labels):
            raise DataError(f'dataroot_labels: folder not found: {self.labels}')
        if self.labels is not None and self.gt is None:
            raise DataError('dataroot_labels needs dataroot_gt: the class maps label the HR pixels')

    def __len__(self):
        return len(self.lq)

    def __getitem__(self, index):
        name = self.lq.name(index)
        item = {'lq_path': name}
        try:
            lq = self.lq.read(index)
            item['lq'] = img2tensor([lq], bgr2rgb=True, float32=True)[0]
            if self.gt is not None:
                gt = self.gt.read(self.gt_index[_stem(name)])
                h, w = lq.shape[0] * self.scale, lq.shape[1] * self.scale
                if not (h <= gt.shape[0] < h + self.scale and w <= gt.shape[1] < w + self.scale):
                    # an HR up to scale - 1 px larger is cropped (an LR made by flooring); anything else is another
                    # scale or another image: scored as valid, it would be a silently wrong PSNR
                    raise DataError(f'pair {name}: the GT is {gt.shape[1]}x{gt.shape[0]} but scale {self.scale} x the '
                                    f'LR {lq.shape[1]}x{lq.shape[0]} is {w}x{h}: wrong scale, or not a pair')
                item['gt'] = img2tensor([gt[:h, :w]], bgr2rgb=True, float32=True)[0]
                if self.labels is not None:
                    item['labels'] = torch.from_numpy(self._read_labels(name, (h, w)))
        except DataError as e:
            item = {'lq_path': name, 'error': str(e)}
        return item

    def _read_labels(self, name, size):
        path = os.path.join(self.labels, _stem(name) + '.png')
        labels = read_image_raw(path) if os.path.isfile(path) else None
        if labels is None or labels.ndim != 2:
            raise DataError(f'{path}: no single-channel class map for {name}')
        if labels.shape[0] < size[0] or labels.shape[1] < size[1]:
            raise DataError(f'{path}: class map {labels.shape[1]}x{labels.shape[0]} is smaller than the GT '
                            f'{size[1]}x{size[0]}')
        return np.ascontiguousarray(labels[:size[0], :size[1]])

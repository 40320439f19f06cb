"""The known-answer texture task (datasets/make_texture_task.py): classes, class maps, the LR leaves no detail."""
import json
import os
import sys

import cv2
import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'datasets'))
import make_texture_task as task  # noqa: E402


def _images(n=6):
    return [task.make_image(np.random.default_rng([7, i])) for i in range(n)]


def test_images_stay_in_range_and_label_every_pixel():
    for img, labels in _images():
        assert img.min() >= 0 and img.max() <= 1
        values = set(np.unique(labels).tolist())
        assert values <= {*range(len(task.CLASSES)), task.BORDER}
        assert task.BORDER in values  # at least one split: region boundaries are marked


def test_flat_regions_are_constant_and_textures_have_their_frequency():
    for img, labels in _images():
        y = img.mean(2)
        for k, spec in enumerate(task.CLASSES):
            mask = labels == k
            if not mask.any():
                continue
            if spec['name'] == 'flat':
                # one flat region may touch another of another gray: each 4-connected region is one constant
                n, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
                for c in range(1, n):
                    assert np.ptp(img[comp == c], axis=0).max() == 0
                continue
            _, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4)
            rows, cols = np.where(comp == 1)
            top, left = rows.min(), cols.min()
            patch = y[top:top + 64, left:left + 64]
            if patch.shape != (64, 64) or not (comp[top:top + 64, left:left + 64] == 1).all():
                continue
            power = np.abs(np.fft.fft2(patch - patch.mean())) ** 2
            f = np.hypot(*np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64), indexing='ij'))
            share_above = power[f > 0.2].sum() / power.sum()
            assert share_above > 0.9, spec['name']  # the detail lies far above the LR's Nyquist (0.125)


def test_the_lr_carries_no_texture_above_the_noise():
    """After the fixed degradation a textured region's LR varies no more than a flat one's (noise and JPEG)."""
    hp = {'flat': [], 'texture': []}
    for i, (img, labels) in enumerate(_images(8)):
        lr = task.degrade_fixed(task.to_bgr_uint8(img), seed=i).astype(np.float64).mean(2)
        lab = labels[2::4, 2::4]
        resid = lr - cv2.blur(lr, (5, 5))
        for k, spec in enumerate(task.CLASSES):
            inner = cv2.erode((lab == k).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
            if inner.sum() > 50:
                hp['flat' if spec['name'] == 'flat' else 'texture'].append(resid[inner].std())
    assert hp['flat'] and hp['texture']
    assert np.mean(hp['texture']) <= np.mean(hp['flat']) * 1.2


def test_make_texture_task_writes_pairs_class_maps_and_classes(tmp_path):
    out = str(tmp_path / 'task')
    task.make_texture_task(out, train=3, val=2)
    for side in ('HR', 'LR_x4', 'labels'):
        assert len(os.listdir(os.path.join(out, 'val', side))) == 2
    with open(os.path.join(out, 'classes.json')) as f:
        meta = json.load(f)
    assert [c['name'] for c in meta['classes']] == ['flat', 'grating_v', 'grating_d', 'field']
    assert meta['border'] == task.BORDER
    with open(os.path.join(out, 'train_HR.lmdb', 'meta_info.txt')) as f:
        assert len(f.read().split('\n')) >= 3


def test_an_interrupted_build_leaves_no_set_behind(tmp_path, monkeypatch):
    out = str(tmp_path / 'task')

    def fail(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(task, 'build_lmdb', fail)
    with pytest.raises(KeyboardInterrupt):
        task.make_texture_task(out, train=2, val=1)
    assert not os.path.exists(out)  # a later run builds it again instead of saying "exists; nothing to do"

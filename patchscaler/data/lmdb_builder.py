"""Folder of images -> BasicSR LMDB (``data.mdb`` + ``meta_info.txt``), with BasicSR's ``make_lmdb_from_imgs``.

Optionally the images are first cut into overlapping sub-images (BasicSR's DIV2K recipe: 480 crops every
240 px), which makes random training crops cheap to read. Unreadable files are skipped with a warning and
listed; keys are ASCII, without extension and dots-safe (:func:`patchscaler.data.image_io.lmdb_key`).
"""
import os
import shutil
import tempfile

import numpy as np
from basicsr.utils.lmdb_util import make_lmdb_from_imgs
from tqdm import tqdm

from patchscaler.data.image_io import is_image_name, lmdb_key, read_image, write_image
from patchscaler.utils.errors import DataError


def _sub_images(img, crop_size, step, thresh_size):
    """Crops of ``crop_size`` every ``step`` px; a last crop flush with each border if the rest > thresh_size."""
    h, w = img.shape[:2]
    if crop_size is None or (h <= crop_size and w <= crop_size):
        yield 0, img
        return

    def starts(n):
        s = list(range(0, max(1, n - crop_size + 1), step))
        if n - (s[-1] + crop_size) > thresh_size:
            s.append(n - crop_size)
        return s

    for i, (y, x) in enumerate((y, x) for y in starts(h) for x in starts(w)):
        yield i, img[y:y + crop_size, x:x + crop_size]


def build_lmdb(src_folder, lmdb_path, crop_size=None, step=None, thresh_size=0, overwrite=False, images=None):
    """Write ``lmdb_path`` from the images under ``src_folder`` (recursively). Returns (n_written, skipped).

    Args:
        crop_size, step, thresh_size: cut into sub-images first (None: whole images).
        images (list | None): explicit list of ``(key, BGR uint8/uint16 array)`` instead of a folder.
    """
    if not lmdb_path.endswith('.lmdb'):
        raise DataError(f"the LMDB path must end with '.lmdb': {lmdb_path}")
    if os.path.exists(lmdb_path):
        if not overwrite:
            raise DataError(f'{lmdb_path} exists; pass --overwrite to rebuild it')
        shutil.rmtree(lmdb_path)
    skipped = []
    if images is None:
        if not os.path.isdir(src_folder):
            raise DataError(f'image folder not found: {src_folder}')
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src_folder) for f in fs
                       if is_image_name(f) and os.path.isfile(os.path.join(d, f)))  # no FIFO, no temporary
        images = []
        for path in tqdm(files, desc='reading', unit='img'):
            try:
                img = read_image(path)
            except DataError as e:
                skipped.append(str(e))
                continue
            images.append((lmdb_key(os.path.relpath(path, src_folder).replace(os.sep, '_')),
                           np.round(img * 255).astype(np.uint8)))
    with tempfile.TemporaryDirectory() as tmp:
        names, keys, seen = [], [], set()
        for key, img in tqdm(images, desc='cropping', unit='img'):
            for i, crop in _sub_images(img, crop_size, step or crop_size, thresh_size):
                k = f'{key}_s{i:03d}' if crop_size else key
                while k in seen:
                    k += '_'
                seen.add(k)
                write_image(os.path.join(tmp, f'{k}.png'), crop)
                names.append(f'{k}.png')
                keys.append(k)
        if not names:
            raise DataError(f'no readable images in {src_folder}')
        # BasicSR estimates the map size from the first image only; size it from all of them
        map_size = 3 * sum(os.path.getsize(os.path.join(tmp, n)) for n in names) + (64 << 20)
        make_lmdb_from_imgs(tmp, lmdb_path, names, keys, map_size=map_size)
    return len(names), skipped

"""Reading images the way users' data actually comes: any bit depth, gray/RGBA/palette, folders or LMDBs.

:func:`decode_image` turns file bytes into float32 BGR (H, W, 3) in [0, 1] (BasicSR's convention):
gray -> 3 channels, RGBA -> alpha dropped (datasets) or returned (``with_alpha``), 16-bit -> /65535,
EXIF orientation applied. A file that does not decode raises :class:`DataError` naming it.

:class:`ImageSource` lists and reads images from a folder (recursively, image extensions only, optionally
restricted by a meta_info file) or from a BasicSR LMDB (keys from its ``meta_info.txt``).
"""
import os

import cv2
import numpy as np

from patchscaler.utils.errors import DataError

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


def decode_image(buf, name='<bytes>', with_alpha=False):
    """Bytes -> float32 BGR (H, W, 3) in [0, 1] (and alpha (H, W) in [0, 1] or None with ``with_alpha``)."""
    if buf is None or len(buf) == 0:
        raise DataError(f'{name}: empty or missing image data')
    arr = np.frombuffer(buf, np.uint8)
    # ANYDEPTH keeps 16 bit, ANYCOLOR keeps the channel count; orientation is applied unless IGNORE is set
    img = cv2.imdecode(arr, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR | (cv2.IMREAD_UNCHANGED if with_alpha else 0))
    if img is None or img.size == 0:
        raise DataError(f'{name}: cannot decode image (corrupt, truncated or not an image)')
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    elif img.dtype == np.uint16:
        img = img.astype(np.float32) / 65535.0
    else:
        img = np.clip(img.astype(np.float32), 0, 1)
    if img.ndim == 2:
        img = img[..., None]
    alpha = None
    if img.shape[2] == 4:
        alpha, img = img[..., 3], img[..., :3]
    elif img.shape[2] == 2:  # gray + alpha
        alpha, img = img[..., 1], img[..., :1]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    img = np.ascontiguousarray(img)
    return (img, alpha) if with_alpha else img


def read_image(path, with_alpha=False):
    """Read a file from disk with :func:`decode_image`."""
    try:
        with open(path, 'rb') as f:
            buf = f.read()
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e.strerror})') from None
    return decode_image(buf, path, with_alpha)


def lmdb_key(name):
    """The LMDB key for a file name: the base name without its extension (BasicSR's rule), ASCII-safe."""
    stem = os.path.splitext(os.path.basename(name))[0]
    return stem.encode('ascii', 'replace').decode('ascii').replace('?', '_').replace(' ', '_')


class ImageSource:
    """Images of a folder or a BasicSR LMDB, addressed by key (folder: relative path; LMDB: key).

    Args:
        root (str): a folder, or a folder ending in ``.lmdb`` with ``data.mdb`` and ``meta_info.txt``.
        meta_info (str | None): a text file whose lines start with relative paths (folder) or file
            names (LMDB, default ``<root>/meta_info.txt``): only those are used, in that order.
    """

    def __init__(self, root, meta_info=None):
        self.root = root
        self.is_lmdb = root.endswith('.lmdb')
        self._env = None
        if self.is_lmdb:
            if not os.path.isfile(os.path.join(root, 'data.mdb')):
                raise DataError(f'LMDB not found: {root} (no data.mdb); build it with datasets/make_lmdb.py')
            meta_info = meta_info or os.path.join(root, 'meta_info.txt')
            self.keys = [lmdb_key(n) for n in self._read_meta(meta_info)]
        else:
            if not os.path.isdir(root):
                raise DataError(f'image folder not found: {root}')
            if meta_info:
                self.keys = self._read_meta(meta_info)
            else:
                self.keys = sorted(
                    os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files
                    if f.lower().endswith(IMG_EXTENSIONS))
        if not self.keys:
            raise DataError(f'no images in {root}' + (f' (meta_info {meta_info})' if meta_info else ''))

    @staticmethod
    def _read_meta(meta_info):
        if not os.path.isfile(meta_info):
            raise DataError(f'meta_info file not found: {meta_info}')
        with open(meta_info) as f:
            return [line.split(' ')[0].strip() for line in f if line.strip()]

    def __len__(self):
        return len(self.keys)

    def name(self, index):
        """A printable name of image ``index`` (relative path or LMDB key)."""
        return self.keys[index]

    def get_bytes(self, index):
        key = self.keys[index]
        if not self.is_lmdb:
            try:
                with open(os.path.join(self.root, key), 'rb') as f:
                    return f.read()
            except OSError as e:
                raise DataError(f'{os.path.join(self.root, key)}: cannot read ({e.strerror})') from None
        if self._env is None:  # opened lazily: one environment per dataloader worker
            import lmdb
            self._env = lmdb.open(self.root, readonly=True, lock=False, readahead=False, meminit=False)
        with self._env.begin(write=False) as txn:
            buf = txn.get(key.encode('ascii'))
        if buf is None:
            raise DataError(f'key {key!r} listed in the meta_info of {self.root} is missing from the LMDB')
        return buf

    def read(self, index):
        """Image ``index`` as float32 BGR (H, W, 3) in [0, 1]; :class:`DataError` if unreadable."""
        return decode_image(self.get_bytes(index), f'{self.root}/{self.keys[index]}')

    def __getstate__(self):  # LMDB environments do not pickle; workers reopen their own
        state = self.__dict__.copy()
        state['_env'] = None
        return state

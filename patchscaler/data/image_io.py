"""Reading images the way users' data actually comes: any bit depth, gray/RGBA/palette, folders or LMDBs.

:func:`decode_image` turns file bytes into float32 BGR (H, W, 3) in [0, 1] (BasicSR's convention):
gray -> 3 channels, RGBA -> alpha dropped (datasets) or returned (``with_alpha``), 16-bit -> /65535,
EXIF orientation applied. A float image (32/64-bit TIFF, PFM) is read as it is when its values lie in [0, 1];
any other float image (0..255 stored as float, HDR radiance above 1, NaN) is refused with one line saying so,
never clipped (a float TIFF of 0..255 would come out almost white). A file that does not decode raises
:class:`DataError` naming it.

:class:`ImageSource` lists and reads images from a folder (recursively, image extensions only, optionally
restricted by a meta_info file) or from a BasicSR LMDB (keys from its ``meta_info.txt``).

:func:`write_image` is the one way the project writes an image file: encoded in memory (``cv2.imencode``) and
written with Python's own file API through a temporary file that is renamed into place
(:func:`~patchscaler.utils.checkpoint.atomic_write`). ``cv2.imwrite``/``cv2.imread`` take the path themselves and
crash (a segmentation fault) or fail on a name that is not valid UTF-8 (``caf\xe9.png`` from a zip or a network
share), and ``cv2.imwrite`` leaves a partial file on Ctrl-C; :func:`write_image` and :func:`read_image_raw` take any
path the OS allows. Temporary files (:func:`~patchscaler.utils.checkpoint.is_temporary`) are never listed as inputs.
"""
import io
import os

import cv2
import numpy as np

from patchscaler.utils.checkpoint import atomic_write, is_temporary
from patchscaler.utils.errors import DataError

IMG_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


_ORIENT = {  # EXIF orientation -> how to turn the stored pixels upright
    2: lambda x: cv2.flip(x, 1), 3: lambda x: cv2.rotate(x, cv2.ROTATE_180), 4: lambda x: cv2.flip(x, 0),
    5: lambda x: cv2.flip(cv2.rotate(x, cv2.ROTATE_90_CLOCKWISE), 1),
    6: lambda x: cv2.rotate(x, cv2.ROTATE_90_CLOCKWISE),
    7: lambda x: cv2.flip(cv2.rotate(x, cv2.ROTATE_90_COUNTERCLOCKWISE), 1),
    8: lambda x: cv2.rotate(x, cv2.ROTATE_90_COUNTERCLOCKWISE)}


def _pil_header(buf):
    """(PIL's mode, EXIF orientation) from the file's header, one PIL open; (None, 1) for a format PIL does not
    read (stored orientation)."""
    try:
        from PIL import Image
        with Image.open(io.BytesIO(buf)) as im:
            mode = im.mode
            try:
                return mode, int(im.getexif().get(0x0112, 1))
            except Exception:  # noqa: BLE001 - unreadable EXIF: stored orientation
                return mode, 1
    except Exception:  # noqa: BLE001
        return None, 1


def decode_image(buf, name='<bytes>', with_alpha=False, with_stored=False):
    """Bytes -> float32 BGR (H, W, 3) in [0, 1] (and alpha (H, W) in [0, 1] or None with ``with_alpha``; and with
    ``with_stored`` what the file stores, ``{'channels': 1 | 3, 'bits': 8 | 16 | 32}``: an RGB file whose three
    channels happen to be equal is still 3 channels, so its output is too)."""
    if buf is None or len(buf) == 0:
        raise DataError(f'{name}: empty or missing image data')
    # UNCHANGED keeps 16 bit and alpha but skips EXIF orientation, which is applied below for every format
    try:
        img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:  # e.g. a header above OpenCV's pixel limit (a > 1 GP panorama, or a forged one)
        if 'CV_IO_MAX_IMAGE_PIXELS' in str(e):
            raise DataError(f'{name}: more pixels than OpenCV decodes (2^30 by default): split the image, or raise '
                            f'the limit with the environment variable OPENCV_IO_MAX_IMAGE_PIXELS') from None
        raise DataError(f'{name}: cannot decode image ({str(e).strip().splitlines()[-1]})') from None
    if img is None or img.size == 0:
        raise DataError(f'{name}: cannot decode image (corrupt, truncated or not an image)')
    mode, orientation = _pil_header(buf)
    gray = img.ndim == 2 or img.shape[2] in (1, 2) or (img.shape[2] == 4 and mode in ('LA', 'La', 'PA'))
    stored = {'channels': 1 if gray else 3,  # OpenCV decodes a gray+alpha PNG as BGRA: the header says gray
              'bits': 16 if img.dtype == np.uint16 else 8 if img.dtype == np.uint8 else 32}
    if orientation in _ORIENT:
        img = _ORIENT[orientation](img)
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    elif img.dtype == np.uint16:
        img = img.astype(np.float32) / 65535.0
    elif not np.issubdtype(img.dtype, np.floating):
        raise DataError(f'{name}: {img.dtype} pixels are not read (8- or 16-bit integer, or float in [0, 1]); '
                        f'convert the image')
    else:  # float: [0, 1] as it is; anything else has no one right reading, so it is refused, not clipped
        img = img.astype(np.float32)
        if not np.isfinite(img).all():
            raise DataError(f'{name}: the float image holds NaN/inf values')
        lo, hi = float(img.min()), float(img.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise DataError(f'{name}: a float image with values in [{lo:.4g}, {hi:.4g}]; float images are read as '
                            f'[0, 1] (convert it to 8- or 16-bit, or scale it to [0, 1]: HDR needs tone mapping)')
        img = np.clip(img, 0, 1)
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
    out = (img, alpha) if with_alpha else (img,)
    out += (stored,) if with_stored else ()
    return out if len(out) > 1 else out[0]


def read_bytes(path):
    """The file's bytes; :class:`DataError` naming it if it cannot be read."""
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise DataError(f'{path}: cannot read ({e.strerror})') from None


def read_image(path, with_alpha=False, with_stored=False):
    """Read a file from disk with :func:`decode_image`."""
    return decode_image(read_bytes(path), path, with_alpha, with_stored)


def read_image_raw(path, flags=cv2.IMREAD_UNCHANGED):
    """The file's pixels as OpenCV decodes them (no conversion), or None if it is missing or does not decode:
    ``cv2.imread`` for any path (it reads with Python's file API)."""
    try:
        buf = read_bytes(path)
    except DataError:
        return None
    try:
        return cv2.imdecode(np.frombuffer(buf, np.uint8), flags) if buf else None
    except cv2.error:  # above OpenCV's pixel limit, or a codec's own refusal
        return None


def encode_image(array, ext='.png', name='<image>'):
    """``array`` (uint8/uint16 BGR, BGRA or gray) encoded as ``ext`` -> bytes; :class:`DataError` if it cannot be."""
    try:
        ok, buf = cv2.imencode(ext, np.ascontiguousarray(array))
    except cv2.error as e:
        raise DataError(f'{name}: cannot encode as {ext} ({str(e).strip().splitlines()[-1]})') from None
    if not ok:
        raise DataError(f'{name}: cannot encode as {ext}')
    return buf.tobytes()


def write_image(path, array):
    """Write ``array`` to ``path`` in the format its extension names (PNG without one), atomically: any path the
    OS allows, never a partial file (see the module docstring). Folders are made as needed."""
    path = os.fspath(path)
    data = encode_image(array, os.path.splitext(path)[1] or '.png', path)

    def save(tmp):
        with open(tmp, 'wb') as f:
            f.write(data)
    atomic_write(path, save)


def is_image_name(name):
    """An image extension, and not one of :func:`~patchscaler.utils.checkpoint.atomic_write`'s temporaries."""
    return name.lower().endswith(IMG_EXTENSIONS) and not is_temporary(name)


def lmdb_key(name):
    """The LMDB key for a file name: the base name without its extension (BasicSR's rule), ASCII-safe."""
    stem = os.path.splitext(os.path.basename(name))[0]
    return stem.encode('ascii', 'replace').decode('ascii').replace('?', '_').replace(' ', '_')


_ENVS = {}


def _lmdb_env(path):
    """One read-only environment per LMDB and process: lmdb refuses a second open of the same file in a
    process, and an environment must not cross a fork (each dataloader worker opens its own)."""
    key = (os.path.realpath(path), os.getpid())
    if key not in _ENVS:
        import lmdb
        _ENVS[key] = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False)
    return _ENVS[key]


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
                    if is_image_name(f) and os.path.isfile(os.path.join(d, f)))  # no FIFO: its read blocks
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
            return read_bytes(os.path.join(self.root, key))
        with _lmdb_env(self.root).begin(write=False) as txn:
            buf = txn.get(key.encode('ascii'))
        if buf is None:
            raise DataError(f'key {key!r} listed in the meta_info of {self.root} is missing from the LMDB')
        return buf

    def read(self, index):
        """Image ``index`` as float32 BGR (H, W, 3) in [0, 1]; :class:`DataError` if unreadable."""
        return decode_image(self.get_bytes(index), f'{self.root}/{self.keys[index]}')


"""Image reading, ImageSource (folder / LMDB), the LMDB builder, both datasets and the Real-ESRGAN degradation."""
import io
import os
import pickle
import random

import cv2
import numpy as np
import pytest
import torch
from conftest import random_bgr, write_png
from PIL import Image

import patchscaler  # noqa: F401  (registration; conftest.py imports it before BasicSR)
from patchscaler.data.degradation import RealESRGANDegradation, SeparableUSMSharp
from patchscaler.data.image_io import ImageSource, decode_image, lmdb_key, read_image
from patchscaler.data.lmdb_builder import build_lmdb
from patchscaler.data.paired_image_dataset import PairedSRDataset
from patchscaler.data.realesrgan_hr_dataset import RealESRGANHRDataset
from patchscaler.utils.errors import ConfigError, DataError


def _seed(s=0):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _corrupt_png(path, good=None):
    """A PNG cut in the middle of its image data."""
    buf = cv2.imencode('.png', good if good is not None else random_bgr(32, 32, seed=9))[1].tobytes()
    path.write_bytes(buf[:len(buf) // 2])
    return path


# ----------------------------------------------------------------------------- decode_image / read_image
def test_read_rgb_png_is_bgr_float(tmp_path):
    img = random_bgr(5, 7)
    path = write_png(str(tmp_path / 'rgb.png'), img)
    out = read_image(path)
    assert out.dtype == np.float32 and out.shape == (5, 7, 3)
    assert out.flags['C_CONTIGUOUS']
    np.testing.assert_allclose(out, img.astype(np.float32) / 255, atol=1e-7)


def test_read_grayscale_png(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    path = write_png(str(tmp_path / 'gray.png'), gray)
    out = read_image(path)
    assert out.dtype == np.float32 and out.shape == (3, 4, 3)
    assert out.min() >= 0 and out.max() <= 1
    for c in range(3):
        np.testing.assert_allclose(out[..., c], gray / 255.0, atol=1e-7)


def test_read_rgba_png(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[..., 2] = 40
    rgba[..., 3] = 128
    rgba[0, 0, 3] = 0
    path = tmp_path / 'rgba.png'
    Image.fromarray(rgba, 'RGBA').save(path)
    out = read_image(str(path))
    assert out.shape == (4, 6, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[1, 1], [40 / 255, 0, 1], atol=1e-6)  # BGR
    img, alpha = read_image(str(path), with_alpha=True)
    assert img.shape == (4, 6, 3)
    np.testing.assert_allclose(img[2, 3], [40 / 255, 0, 1], atol=1e-6)
    assert alpha.shape == (4, 6) and alpha.dtype == np.float32
    assert alpha[0, 0] == 0
    assert alpha[1, 1] == pytest.approx(128 / 255)


def test_read_gray_alpha_png(tmp_path):
    la = np.stack([np.full((3, 3), 100, np.uint8), np.full((3, 3), 255, np.uint8)], axis=-1)
    path = tmp_path / 'la.png'
    Image.fromarray(la, 'LA').save(path)
    img, alpha = read_image(str(path), with_alpha=True)
    assert img.shape == (3, 3, 3)
    np.testing.assert_allclose(img, 100 / 255, atol=1e-6)
    np.testing.assert_allclose(alpha, 1.0)
    assert read_image(str(path)).shape == (3, 3, 3)


def test_with_alpha_on_opaque_image_returns_none(tmp_path):
    path = write_png(str(tmp_path / 'rgb.png'), random_bgr(4, 4))
    img, alpha = read_image(path, with_alpha=True)
    assert img.shape == (4, 4, 3) and alpha is None


@pytest.mark.parametrize('channels', [1, 3])
def test_read_16bit_png(tmp_path, channels):
    shape = (4, 5) if channels == 1 else (4, 5, 3)
    img = np.random.default_rng(0).integers(0, 65536, size=shape, dtype=np.uint16)
    img[1, 2] = 40000
    path = write_png(str(tmp_path / 'deep.png'), img)
    out = read_image(path)
    assert out.dtype == np.float32 and out.shape == (4, 5, 3)
    # 16-bit values are scaled by 65535, not 255, and keep their precision
    assert out[1, 2, 0] == pytest.approx(40000 / 65535, abs=1e-7)
    ref = img.astype(np.float32) / 65535
    np.testing.assert_allclose(out, ref[..., None].repeat(3, -1) if channels == 1 else ref, atol=1e-7)
    assert out.max() <= 1.0


def test_read_palette_png(tmp_path):
    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    im = Image.fromarray(idx, 'L').convert('P')
    im = Image.fromarray(idx, 'P')
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    path = tmp_path / 'pal.png'
    im.save(path)
    assert Image.open(path).mode == 'P'
    out = read_image(str(path))
    assert out.shape == (2, 3, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], [0, 0, 1])  # red in BGR
    np.testing.assert_allclose(out[0, 1], [0, 1, 0])
    np.testing.assert_allclose(out[0, 2], [1, 0, 0])  # blue


def test_read_jpeg(tmp_path):
    path = tmp_path / 'x.jpg'
    cv2.imwrite(str(path), np.full((8, 8, 3), 128, np.uint8))
    out = read_image(str(path))
    assert out.shape == (8, 8, 3)
    np.testing.assert_allclose(out, 128 / 255, atol=3 / 255)


def test_truncated_png_raises_data_error(tmp_path):
    path = _corrupt_png(tmp_path / 'broken_image.png')
    with pytest.raises(DataError, match='broken_image.png'):
        read_image(str(path))


@pytest.mark.parametrize('ext', ['.png', '.jpg'])
@pytest.mark.parametrize('keep', [0.3, 0.9, 0.99])
def test_truncated_files_raise(ext, keep):
    buf = cv2.imencode(ext, random_bgr(32, 32))[1].tobytes()
    with pytest.raises(DataError, match=f'cut{ext}'):
        decode_image(buf[:int(len(buf) * keep)], name=f'cut{ext}')


def _exif_rotated(fmt):
    """A 10x20 image with a white left band, tagged EXIF orientation 6 (display rotated 90 degrees CW)."""
    import io
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :5] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(arr).save(out, fmt, exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_exif_orientation_applied(fmt):
    img = decode_image(_exif_rotated(fmt))
    assert img.shape == (20, 10, 3)
    assert img[:5].mean() > 0.9 and img[-5:].mean() < 0.1  # the left band is now at the top


def test_exif_orientation_applied_with_alpha():
    img, _ = decode_image(_exif_rotated('PNG'), with_alpha=True)
    assert img.shape == (20, 10, 3)


def test_text_file_with_png_extension(tmp_path):
    path = tmp_path / 'notes_really.png'
    path.write_text('this is not an image\n' * 10)
    with pytest.raises(DataError) as info:
        read_image(str(path))
    assert 'notes_really.png' in str(info.value)
    assert 'cannot decode' in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match='nope.png'):
        read_image(str(tmp_path / 'nope.png'))
    (tmp_path / 'empty.png').write_bytes(b'')
    with pytest.raises(DataError, match='empty.png'):
        read_image(str(tmp_path / 'empty.png'))
    with pytest.raises(DataError, match='mybuf'):
        decode_image(b'', name='mybuf')


def test_data_error_is_oserror():
    # DataError keeps working with code that catches OSError
    assert issubclass(DataError, OSError)


@pytest.mark.parametrize('name,key', [('a.b.png', 'a.b'), ('dir/x y.png', 'x_y'), ('0001.jpg', '0001'),
                                      ('caf\u00e9.png', 'caf_')])
def test_lmdb_key(name, key):
    assert lmdb_key(name) == key


# ----------------------------------------------------------------------------- ImageSource
def test_image_source_folder(image_folder):
    src = ImageSource(str(image_folder))
    assert not src.is_lmdb
    assert src.keys == ['a.png', 'b.png', os.path.join('sub', 'c.png')]  # recursive, sorted, no .txt
    assert len(src) == 3
    assert src.name(2) == os.path.join('sub', 'c.png')
    np.testing.assert_allclose(src.read(0), random_bgr(40, 48, seed=1) / 255.0, atol=1e-7)
    assert src.read(2).shape == (24, 30, 3)


def test_image_source_folder_meta_info(image_folder, tmp_path):
    meta = tmp_path / 'meta.txt'
    meta.write_text('b.png (32,36,3) 1\n\nsub/c.png\n')
    src = ImageSource(str(image_folder), str(meta))
    assert src.keys == ['b.png', 'sub/c.png']
    assert src.read(1).shape == (24, 30, 3)


def test_image_source_empty_and_missing(tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'readme.txt').write_text('x')
    with pytest.raises(DataError, match='no images in'):
        ImageSource(str(tmp_path / 'empty'))
    with pytest.raises(DataError, match='image folder not found'):
        ImageSource(str(tmp_path / 'missing'))
    with pytest.raises(DataError, match='LMDB not found'):
        ImageSource(str(tmp_path / 'missing.lmdb'))
    with pytest.raises(DataError, match='meta_info file not found'):
        ImageSource(str(tmp_path / 'empty'), str(tmp_path / 'nometa.txt'))


def test_image_source_file_removed_after_listing(image_folder):
    src = ImageSource(str(image_folder))
    os.remove(image_folder / 'b.png')
    with pytest.raises(DataError, match='b.png'):
        src.read(1)


# ----------------------------------------------------------------------------- LMDB builder
def test_build_lmdb_round_trip_with_corrupt_image(image_folder, tmp_path):
    _corrupt_png(image_folder / 'bad.png')
    write_png(str(image_folder / 'a.b.png'), random_bgr(10, 12, seed=4))
    lmdb_path = str(tmp_path / 'train.lmdb')
    n, skipped = build_lmdb(str(image_folder), lmdb_path)
    assert n == 4
    assert len(skipped) == 1 and 'bad.png' in skipped[0]
    assert os.path.isfile(os.path.join(lmdb_path, 'data.mdb'))
    assert os.path.isfile(os.path.join(lmdb_path, 'meta_info.txt'))

    src = ImageSource(lmdb_path)
    assert src.is_lmdb
    assert sorted(src.keys) == ['a', 'a.b', 'b', 'sub_c']
    originals = {'a': image_folder / 'a.png', 'a.b': image_folder / 'a.b.png', 'b': image_folder / 'b.png',
                 'sub_c': image_folder / 'sub' / 'c.png'}
    for i, key in enumerate(src.keys):
        assert src.name(i) == key
        np.testing.assert_array_equal(src.read(i), read_image(str(originals[key])))
    # the source pickles (dataloader workers) after its environment was opened; the copy reads the same
    first = src.read(0)
    clone = pickle.loads(pickle.dumps(src))
    assert clone.keys == src.keys
    np.testing.assert_array_equal(clone.read(0), first)


def test_two_sources_on_one_lmdb(image_folder, tmp_path):
    lmdb_path = str(tmp_path / 'shared.lmdb')
    build_lmdb(str(image_folder), lmdb_path)
    a, b = ImageSource(lmdb_path), ImageSource(lmdb_path)  # e.g. train and val datasets on one LMDB
    np.testing.assert_array_equal(a.read(0), b.read(0))


def test_build_lmdb_refuses_existing_and_bad_paths(image_folder, tmp_path):
    lmdb_path = str(tmp_path / 'x.lmdb')
    build_lmdb(str(image_folder), lmdb_path)
    with pytest.raises(DataError, match='exists'):
        build_lmdb(str(image_folder), lmdb_path)
    n, _ = build_lmdb(str(image_folder), lmdb_path, overwrite=True)
    assert n == 3
    with pytest.raises(DataError, match=".lmdb"):
        build_lmdb(str(image_folder), str(tmp_path / 'x.db'))
    with pytest.raises(DataError, match='image folder not found'):
        build_lmdb(str(tmp_path / 'missing'), str(tmp_path / 'y.lmdb'))
    bad_only = tmp_path / 'bad_only'
    bad_only.mkdir()
    _corrupt_png(bad_only / 'bad.png')
    with pytest.raises(DataError, match='no readable images'):
        build_lmdb(str(bad_only), str(tmp_path / 'z.lmdb'))


def test_lmdb_key_missing_from_database(image_folder, tmp_path):
    lmdb_path = tmp_path / 'm.lmdb'
    build_lmdb(str(image_folder), str(lmdb_path))
    with open(lmdb_path / 'meta_info.txt', 'a') as f:
        f.write('ghost_image.png (10,10,3) 1\n')
    src = ImageSource(str(lmdb_path))
    assert src.keys[-1] == 'ghost_image'
    src.read(0)
    with pytest.raises(DataError) as info:
        src.read(len(src) - 1)
    assert "'ghost_image'" in str(info.value)
    assert 'missing from the LMDB' in str(info.value)


def _starts(n, crop, step, thresh):
    """BasicSR's extract_subimages rule, written independently."""
    if n <= crop:
        return [0]
    s = list(np.arange(0, n - crop + 1, step))
    if n - (s[-1] + crop) > thresh:
        s.append(n - crop)
    return s


@pytest.mark.parametrize('crop,step,thresh,expected', [(16, 16, 0, 19), (16, 16, 10, 12), (16, 8, 0, 38),
                                                       (64, 32, 0, 3)])
def test_build_lmdb_sub_images(image_folder, tmp_path, crop, step, thresh, expected):
    # a: 40x48, b: 32x36, sub/c: 24x30; hand count for (16, 16, 0): 3*3 + 2*3 + 2*2 = 19
    sizes = {'a': (40, 48), 'b': (32, 36), 'sub_c': (24, 30)}
    count = 0
    for h, w in sizes.values():
        if h <= crop and w <= crop:
            count += 1
        else:
            count += len(_starts(h, crop, step, thresh)) * len(_starts(w, crop, step, thresh))
    assert count == expected
    lmdb_path = str(tmp_path / 'sub.lmdb')
    n, skipped = build_lmdb(str(image_folder), lmdb_path, crop_size=crop, step=step, thresh_size=thresh)
    assert n == expected and skipped == []
    src = ImageSource(lmdb_path)
    assert len(src) == expected
    if crop == 16:
        # every crop is crop x crop; the first/last crops of 'a' are where the rule puts them
        assert all(src.read(i).shape == (16, 16, 3) for i in range(len(src)))
        a = read_image(str(image_folder / 'a.png'))
        a_keys = [i for i, k in enumerate(src.keys) if k.startswith('a_s')]
        np.testing.assert_array_equal(src.read(a_keys[0]), a[:16, :16])
        y, x = _starts(40, crop, step, thresh)[-1], _starts(48, crop, step, thresh)[-1]
        np.testing.assert_array_equal(src.read(a_keys[-1]), a[y:y + 16, x:x + 16])
        assert src.keys[a_keys[0]] == 'a_s000'
    else:  # whole images when they fit in one crop
        assert sorted(src.keys) == ['a_s000', 'b_s000', 'sub_c_s000']
        assert sorted(src.read(i).shape[:2] for i in range(3)) == sorted(sizes.values())


# ----------------------------------------------------------------------------- RealESRGANHRDataset
def _train_opt(demo_opt, root, **kw):
    opt = dict(demo_opt['datasets']['train'])
    opt.update(dataroot_gt=str(root), crop_pad_size=64, phase='train', scale=4, **kw)
    return opt


def _check_hr_item(item):
    assert item['gt'].shape == (3, 64, 64) and item['gt'].dtype == torch.float32
    assert 0 <= item['gt'].min() and item['gt'].max() <= 1
    for k in ('kernel1', 'kernel2', 'sinc_kernel'):
        assert item[k].shape == (21, 21)
        assert item[k].sum() == pytest.approx(1.0, abs=1e-3)
    assert isinstance(item['gt_path'], str)


def test_hr_dataset_from_lmdb(demo_opt, image_folder, tmp_path):
    lmdb_path = tmp_path / 'hr.lmdb'
    build_lmdb(str(image_folder), str(lmdb_path))
    _seed(0)
    ds = RealESRGANHRDataset(_train_opt(demo_opt, lmdb_path))
    assert len(ds) == 3
    for i in range(len(ds)):
        _check_hr_item(ds[i])


def test_hr_dataset_crops_large_images(demo_opt, tmp_path):
    big = random_bgr(80, 100, seed=5)
    write_png(str(tmp_path / 'big' / 'x.png'), big)
    _seed(1)
    ds = RealESRGANHRDataset(_train_opt(demo_opt, tmp_path / 'big', use_hflip=False, use_rot=False))
    gt = ds[0]['gt'].numpy().transpose(1, 2, 0)[..., ::-1]  # RGB CHW -> BGR HWC
    ref = big.astype(np.float32) / 255
    # the 64x64 crop is a window of the image
    found = any(np.array_equal(gt, ref[y:y + 64, x:x + 64]) for y in range(17) for x in range(37))
    assert found


def test_hr_dataset_skips_corrupt_image(demo_opt, image_folder):
    import logging
    _corrupt_png(image_folder / 'b_bad.png')
    _seed(2)
    ds = RealESRGANHRDataset(_train_opt(demo_opt, image_folder, use_hflip=False, use_rot=False))
    assert len(ds) == 4
    bad_index = ImageSource(str(image_folder)).keys.index('b_bad.png')
    good = {k: read_image(str(image_folder / k)) for k in ('a.png', 'b.png', os.path.join('sub', 'c.png'))}
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger('basicsr')  # BasicSR's root logger, which does not propagate
    logger.addHandler(handler)
    try:
        items = [ds[i] for i in range(len(ds))]
    finally:
        logger.removeHandler(handler)
    for item in items:
        _check_hr_item(item)
    assert len([m for m in messages if 'b_bad.png' in m]) == 1  # one warning per bad image
    # the item served for the bad index is (a 64x64 crop/pad of) a good image, and named after it
    item = items[bad_index]
    assert item['gt_path'] != 'b_bad.png' and item['gt_path'] in good
    img = good[item['gt_path']]
    gt = item['gt'].numpy().transpose(1, 2, 0)[..., ::-1]  # RGB CHW -> BGR HWC
    assert np.array_equal(gt[:img.shape[0], :img.shape[1]], img)


def test_hr_dataset_all_corrupt_stops(demo_opt, tmp_path):
    folder = tmp_path / 'bad'
    folder.mkdir()
    _corrupt_png(folder / 'x.png')
    _corrupt_png(folder / 'y.png')
    ds = RealESRGANHRDataset(_train_opt(demo_opt, folder, max_skips=3))
    with pytest.raises(DataError, match='3 unreadable images in a row'):
        ds[0]


# ----------------------------------------------------------------------------- PairedSRDataset
@pytest.fixture
def paired(tmp_path):
    lr, hr = tmp_path / 'LR', tmp_path / 'HR'
    imgs = {}
    for name, (h, w) in (('p1', (6, 5)), ('p2', (4, 4)), ('p3', (3, 7))):
        imgs[name] = random_bgr(h * 4 + 3, w * 4 + 1, seed=len(imgs))  # GT a bit larger than 4x LR
        write_png(str(lr / f'{name}.png'), cv2.resize(imgs[name], (w, h), interpolation=cv2.INTER_AREA))
    write_png(str(hr / 'p1.png'), imgs['p1'])
    cv2.imwrite(str(hr / 'p2.bmp'), imgs['p2'])  # other extension, same stem
    write_png(str(hr / 'nested' / 'p3.png'), imgs['p3'])
    write_png(str(hr / 'unused.png'), random_bgr(8, 8))
    return lr, hr, imgs


def test_paired_dataset_pairs_by_name_and_crops(paired):
    lr, hr, imgs = paired
    ds = PairedSRDataset(dict(dataroot_lq=str(lr), dataroot_gt=str(hr), scale=4))
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        name = os.path.splitext(item['lq_path'])[0]
        assert 'error' not in item
        _, h, w = item['lq'].shape
        assert item['gt'].shape == (3, 4 * h, 4 * w)
        expected = imgs[name][:4 * h, :4 * w, ::-1].astype(np.float32) / 255  # top-left crop, RGB
        np.testing.assert_allclose(item['gt'].numpy().transpose(1, 2, 0), expected, atol=1e-7)


def test_paired_dataset_without_gt(paired):
    lr, _, _ = paired
    ds = PairedSRDataset(dict(dataroot_lq=str(lr), scale=4))
    item = ds[0]
    assert set(item) == {'lq_path', 'lq'} and item['lq'].shape == (3, 6, 5)


def test_paired_dataset_corrupt_lr_gives_error_item(paired):
    lr, hr, _ = paired
    _corrupt_png(lr / 'p2.png')
    ds = PairedSRDataset(dict(dataroot_lq=str(lr), dataroot_gt=str(hr), scale=4))
    item = ds[1]
    assert item['lq_path'] == 'p2.png'
    assert set(item) == {'lq_path', 'error'}
    assert 'p2.png' in item['error']
    assert 'error' not in ds[0] and 'error' not in ds[2]


@pytest.mark.parametrize('gt_size, scale', [((10, 10), 4), ((6 * 8, 5 * 8), 4), ((6 * 4, 5 * 4), 2)])
def test_paired_dataset_gt_that_does_not_match_the_scale(paired, gt_size, scale):
    """Too small, ×8 pairs read as ×4, ×4 pairs read as ×2: the pair named, never cropped and scored as valid
    (an HR up to scale - 1 px larger than scale × LR is cropped: the fixture's pairs)."""
    lr, hr, _ = paired
    write_png(str(hr / 'p1.png'), random_bgr(*gt_size))
    ds = PairedSRDataset(dict(dataroot_lq=str(lr), dataroot_gt=str(hr), scale=scale))
    assert f'pair p1.png: the GT is {gt_size[1]}x{gt_size[0]} but scale {scale} x the LR 5x6' in ds[0]['error']
    assert ('error' in ds[1]) == (scale != 4)  # p2 is a true ×4 pair


def test_paired_dataset_lr_without_gt(paired):
    lr, hr, _ = paired
    write_png(str(lr / 'orphan.png'), random_bgr(4, 4))
    with pytest.raises(DataError) as info:
        PairedSRDataset(dict(dataroot_lq=str(lr), dataroot_gt=str(hr), scale=4))
    assert 'orphan.png' in str(info.value) and 'no GT' in str(info.value)


# ----------------------------------------------------------------------------- degradation
def test_degradation_on_dataset_batch(demo_opt, image_folder):
    _seed(3)
    ds = RealESRGANHRDataset(_train_opt(demo_opt, image_folder))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False, num_workers=0)
    batch = next(iter(loader))
    degrade = RealESRGANDegradation(demo_opt['degradation'], device='cpu')
    for gt_size in (64, 32):
        for seed in range(2):  # several draws of the random branches
            _seed(seed)
            lq, gt = degrade(batch, 4, gt_size)
            assert lq.shape == (2, 3, gt_size // 4, gt_size // 4)
            assert gt.shape == (2, 3, gt_size, gt_size)
            for t in (lq, gt):
                assert t.device.type == 'cpu' and torch.isfinite(t).all()
                assert t.min() >= 0 and t.max() <= 1
            # lq is quantised to 8 bit
            assert torch.allclose(lq * 255, (lq * 255).round(), atol=1e-4)
    # gt_usm off: gt at full crop size is the dataset image itself
    _, gt = degrade(batch, 4, None)
    assert torch.equal(gt, batch['gt'])


def test_degradation_gt_usm_pairs_from_one_gt(monkeypatch):
    """gt_usm on: the target is the sharpened GT and the LR is degraded from that same sharpened GT."""
    import patchscaler.data.degradation as degradation
    monkeypatch.setattr(degradation.random, 'choice', lambda seq: 'area')  # the resize modes
    opts = {'resize_prob': [0, 0, 1], 'resize_prob2': [0, 0, 1], 'noise_range': [0, 0], 'noise_range2': [0, 0],
            'gaussian_noise_prob': 1, 'gaussian_noise_prob2': 1}
    delta = torch.zeros(2, 21, 21)
    delta[:, 10, 10] = 1  # identity blur
    _seed(0)
    batch = {'gt': torch.rand(2, 3, 64, 64), 'kernel1': delta, 'kernel2': delta, 'sinc_kernel': delta}
    for usm in (False, True):
        degrade = RealESRGANDegradation({**opts, 'gt_usm': usm})
        degrade._jpeg = lambda x, quality_range: x.clamp(0, 1)  # JPEG's chroma subsampling would blur the check
        lq, gt = degrade(batch, 4, None)
        expected = SeparableUSMSharp()(batch['gt']) if usm else batch['gt']
        assert torch.allclose(gt, expected, atol=1e-6)
        area = torch.nn.functional.interpolate(gt, scale_factor=0.25, mode='area')
        assert (lq - area).abs().max() <= 0.5 / 255 + 1e-6  # the LR comes from this very GT, 8-bit rounded
    with pytest.raises(ConfigError, match='jpeg_range2'):
        RealESRGANDegradation({'jpeg_range2': [90, 100]})  # DiffJPEG gives NaN at quality 100


def test_degradation_options():
    with pytest.raises(ConfigError, match='noise_rnage'):
        RealESRGANDegradation({'noise_rnage': [1, 2]})
    d = RealESRGANDegradation({'jpeg_range': [90, 95]})
    assert d.opt['jpeg_range'] == [90, 95]
    assert d.opt['noise_range2'] == [1, 25]  # default kept


def test_degradation_small_crops_with_default_ranges():
    """Real-ESRGAN's ranges shrink a 64 crop to ~10 px: the 21x21 blurs must still work (they used to raise)."""
    deg = RealESRGANDegradation(None)
    for seed in range(40):
        _seed(seed)
        batch = {'gt': torch.rand(2, 3, 64, 64), 'kernel1': torch.ones(2, 21, 21) / 441,
                 'kernel2': torch.ones(2, 21, 21) / 441, 'sinc_kernel': torch.ones(2, 21, 21) / 441}
        lq, gt = deg(batch, 4, 64)
        assert lq.shape == (2, 3, 16, 16) and gt.shape == (2, 3, 64, 64)
        assert torch.isfinite(lq).all() and 0 <= lq.min() and lq.max() <= 1


def test_degradation_crop_not_a_multiple_of_scale():
    """A crop_pad_size like 194 at x4: the GT is cut to 192 so LR and HR tile exactly (it used to raise)."""
    _seed(0)
    delta = torch.zeros(1, 21, 21)
    delta[:, 10, 10] = 1
    batch = {'gt': torch.rand(1, 3, 194, 197), 'kernel1': delta, 'kernel2': delta, 'sinc_kernel': delta}
    lq, gt = RealESRGANDegradation(None)(batch, 4, None)
    assert lq.shape == (1, 3, 48, 49) and gt.shape == (1, 3, 192, 196)
    lq, gt = RealESRGANDegradation(None)(batch, 4, 128)
    assert lq.shape == (1, 3, 32, 32) and gt.shape == (1, 3, 128, 128)


def test_degradation_gt_size_too_large(demo_opt):
    batch = {'gt': torch.rand(1, 3, 32, 32), 'kernel1': torch.ones(1, 21, 21) / 441,
             'kernel2': torch.ones(1, 21, 21) / 441, 'sinc_kernel': torch.ones(1, 21, 21) / 441}
    _seed(0)
    with pytest.raises(ConfigError, match='gt_size 64'):
        RealESRGANDegradation(demo_opt['degradation'])(batch, 4, 64)


def test_separable_usm_matches_basicsr():
    from basicsr.utils import USMSharp
    torch.manual_seed(0)
    img = torch.rand(2, 3, 64, 64)
    ref = USMSharp()(img)
    ours = SeparableUSMSharp()(img)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, img, atol=1e-3)  # it does sharpen


def test_kernel_size_ranges_follow_the_options():
    """kernel_range / kernel_range2 / final_sinc_range bound each stage's kernel support (ResShift's test degradation:
    3..11 and 3..5); Real-ESRGAN's 7..21 by default; every kernel still comes padded to 21×21."""
    import random

    from patchscaler.data.realesrgan_hr_dataset import RealESRGANKernels
    from patchscaler.utils.errors import ConfigError
    gauss = ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso']
    base = dict(kernel_list=gauss, kernel_prob=[0.6, 0.4, 0, 0, 0, 0], sinc_prob=0.5, blur_sigma=[2.0, 3.0],
                betag_range=[1, 1.5], betap_range=[1, 1.2], final_sinc_prob=1.0)
    base.update({k + '2': v for k, v in base.items() if k != 'final_sinc_prob'})

    def support(k):
        rows = (k.abs() > 0).any(1).nonzero()
        return int(rows.max() - rows.min() + 1)
    random.seed(0)
    np.random.seed(0)
    small = RealESRGANKernels(dict(base, kernel_range=[3, 11], kernel_range2=[3, 5], final_sinc_range=[3, 5]))
    default = RealESRGANKernels(base)
    draws = [small.sample() for _ in range(40)]
    assert all(d['kernel1'].shape == (21, 21) for d in draws)
    assert max(support(d['kernel1']) for d in draws) <= 11 and max(support(d['kernel2']) for d in draws) <= 5
    assert max(support(d['sinc_kernel']) for d in draws) <= 5
    assert max(support(default.sample()['kernel1']) for _ in range(40)) > 11
    for bad in ([4, 11], [3, 23], [11, 3], 'big'):
        with pytest.raises(ConfigError, match='kernel_range'):
            RealESRGANKernels(dict(base, kernel_range=bad))


# ---------------------------------------------------------------- writing, and file names that are not UTF-8
NOT_UTF8 = os.fsdecode(b'caf\xe9')  # a Latin-1 name from a zip or a network share: surrogate-escaped in Python


def test_write_image_takes_any_file_name_and_leaves_no_temporary(tmp_path):
    """cv2.imwrite crashes the process on such a path; write_image encodes in memory and writes with open()."""
    from patchscaler.data.image_io import read_image_raw, write_image
    img = random_bgr(6, 5, seed=1)
    path = os.path.join(str(tmp_path), 'sub', NOT_UTF8 + '.png')
    write_image(path, img)
    assert np.array_equal(read_image_raw(path), img)
    assert np.array_equal((read_image(path) * 255).round().astype(np.uint8), img)
    assert os.listdir(os.path.dirname(path)) == [NOT_UTF8 + '.png']  # only the file: no temporary left
    write_image(os.path.join(str(tmp_path), 'deep16.png'), img.astype(np.uint16) * 257)
    assert read_image_raw(os.path.join(str(tmp_path), 'deep16.png')).dtype == np.uint16
    assert read_image_raw(os.path.join(str(tmp_path), 'missing.png')) is None


def test_write_image_interrupted_leaves_neither_file_nor_temporary(tmp_path, monkeypatch):
    """Ctrl-C in the middle of a write: no partial image, and no hidden temporary a later run would read."""
    import builtins

    from patchscaler.data.image_io import write_image
    real_open = builtins.open

    def interrupted(file, mode='r', *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if 'w' in mode:
            f.write(b'\x89PNG partial')
            f.close()
            raise KeyboardInterrupt
        return f
    monkeypatch.setattr(builtins, 'open', interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_image(str(tmp_path / 'a.png'), random_bgr(4, 4))
    monkeypatch.undo()
    assert os.listdir(str(tmp_path)) == []


def test_a_bad_array_is_one_data_error(tmp_path):
    from patchscaler.data.image_io import write_image
    with pytest.raises(DataError, match='cannot encode'):
        write_image(str(tmp_path / 'a.png'), np.zeros((4, 4, 7), np.uint8))
    assert os.listdir(str(tmp_path)) == []


def test_temporaries_are_never_inputs(tmp_path):
    """Neither atomic_write's temporaries nor the .tmp.png an older version left on Ctrl-C is listed."""
    from patchscaler.inference import list_images
    write_png(tmp_path / 'a.png', random_bgr(4, 4))
    write_png(tmp_path / '.a.png.k3j2ab_9.tmp.png', random_bgr(4, 4))
    (tmp_path / '.b.png.x9x9x9x9.tmp').write_bytes(b'')
    write_png(tmp_path / '.hidden.png', random_bgr(4, 4))  # a hidden image is still an image
    assert [rel for _, rel in list_images([str(tmp_path)])] == ['.hidden.png', 'a.png']
    assert ImageSource(str(tmp_path)).keys == ['.hidden.png', 'a.png']


def _forged_png(width, height):
    """A PNG whose header claims width x height (8-bit RGB) with almost no data: what a > 1 GP panorama or a
    forged header looks like to the decoder."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'\x00' * 100)) + chunk(b'IEND', b''))


def test_an_image_above_the_pixel_limit_is_one_data_error_and_a_skipped_pair(tmp_path):
    """One reader, one behaviour: infer already skipped it; a validation/test set now skips the pair with the
    reason instead of the process dying on OpenCV's assertion."""
    with pytest.raises(DataError, match='more pixels than OpenCV decodes.*OPENCV_IO_MAX_IMAGE_PIXELS'):
        decode_image(_forged_png(40000, 40000), 'huge.png')
    for folder in ('lq', 'gt'):
        (tmp_path / folder).mkdir()
        write_png(tmp_path / folder / 'ok.png', random_bgr(8 if folder == 'lq' else 32, 8 if folder == 'lq' else 32))
    (tmp_path / 'lq' / 'huge.png').write_bytes(_forged_png(40000, 40000))
    write_png(tmp_path / 'gt' / 'huge.png', random_bgr(32, 32))
    ds = PairedSRDataset({'dataroot_lq': str(tmp_path / 'lq'), 'dataroot_gt': str(tmp_path / 'gt'), 'scale': 4,
                          'phase': 'test', 'name': 'v'})
    items = {os.path.basename(ds[i]['lq_path']): ds[i] for i in range(len(ds))}
    assert 'more pixels than OpenCV decodes' in items['huge.png']['error'] and 'lq' in items['ok.png']


def test_gray_alpha_is_one_stored_channel_and_int32_is_refused(tmp_path):
    la = np.stack([random_bgr(6, 6, seed=1)[..., 0], np.full((6, 6), 200, np.uint8)], 2)
    buf = io.BytesIO()
    Image.fromarray(la, mode='LA').save(buf, 'PNG')
    img, alpha, stored = decode_image(buf.getvalue(), 'la.png', with_alpha=True, with_stored=True)
    assert stored == {'channels': 1, 'bits': 8} and alpha is not None and img.shape == (6, 6, 3)
    ok, tif = cv2.imencode('.tiff', np.arange(36, dtype=np.int32).reshape(6, 6))
    with pytest.raises(DataError, match='int32 pixels are not read'):
        decode_image(tif.tobytes(), 'deep.tiff')

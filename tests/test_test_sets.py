"""datasets/prepare_test_sets.py on tiny fake copies of LSDIR, RealSR (V3), DRealSR and a RealSet folder, and the
four test option files: they parse, pass the options check, and their datasets build from what the script wrote."""
import contextlib
import importlib.util
import io
import os

import cv2
import numpy as np
import pytest
from conftest import ROOT, random_bgr, write_png

import patchscaler  # noqa: F401  (registration; conftest.py imports it before BasicSR)


def _load_script():
    spec = importlib.util.spec_from_file_location('prepare_test_sets',
                                                  os.path.join(ROOT, 'datasets', 'prepare_test_sets.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


P = _load_script()


def _run(*argv):
    """main(argv) -> its stdout (progress bars go to stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        P.main([str(a) for a in argv])
    return out.getvalue()


def _error(*argv):
    """main(argv) must stop with one 'error: ...' line (no traceback); returns it."""
    with pytest.raises(SystemExit) as info:
        _run(*argv)
    msg = str(info.value.code)
    assert msg.startswith('error: ') and '\n' not in msg, msg
    return msg


def _broken(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n truncated')
    return str(path)


def _read(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def _meta(folder):
    return (folder / 'meta_info.txt').read_text().splitlines()


def _make_sources(src):
    """Fake LSDIR / RealSR / DRealSR / RealSet copies under ``src``."""
    from skimage import data
    photos = [np.ascontiguousarray(getattr(data, n)()[..., ::-1]) for n in ('astronaut', 'coffee')]
    write_png(src / 'lsdir' / '0000001.png', cv2.resize(photos[0], (530, 520)))
    write_png(src / 'lsdir' / 'sub' / '0000002.png', cv2.resize(photos[1], (520, 530)))
    write_png(src / 'lsdir' / 'small.png', random_bgr(500, 600, seed=1))
    _broken(src / 'lsdir' / 'broken.png')
    for camera in ('Canon', 'Nikon'):
        folder = src / 'RealSR(V3)' / camera / 'Test' / '4'
        for i in (1, 2):
            write_png(folder / f'{camera}_{i:03d}_HR.png', random_bgr(66, 64, seed=i))  # 2 rows more than 4 x LR
            write_png(folder / f'{camera}_{i:03d}_LR4.png', random_bgr(16, 16, seed=10 + i))
    write_png(src / 'RealSR(V3)' / 'Canon' / 'Test' / '4' / 'Canon_003_HR.png', random_bgr(64, 64))
    _broken(src / 'RealSR(V3)' / 'Canon' / 'Test' / '4' / 'Canon_004_LR4.png')
    write_png(src / 'RealSR(V3)' / 'Canon' / 'Test' / '4' / 'Canon_004_HR.png', random_bgr(64, 64))
    write_png(src / 'RealSR(V3)' / 'Canon' / 'Test' / '4' / 'readme.png', random_bgr(8, 8))
    for i in (1, 2):
        write_png(src / 'DRealSR' / 'Test_x4' / 'test_HR' / f'DSC_{i:04d}_x1.png', random_bgr(48, 64, seed=i))
        write_png(src / 'DRealSR' / 'Test_x4' / 'test_LR' / f'DSC_{i:04d}_x4.png', random_bgr(12, 16, seed=i))
    write_png(src / 'DRealSR' / 'Test_x4' / 'test_HR' / 'DSC_0003_x1.png', random_bgr(48, 64))
    write_png(src / 'DRealSR' / 'Test_x4' / 'test_LR' / 'DSC_0009_x4.png', random_bgr(12, 16))
    real = src / 'RealSet'
    write_png(real / 'gray.png', random_bgr(20, 24)[..., 0])
    write_png(real / 'rgba.png', np.dstack([random_bgr(21, 17), np.full((21, 17), 128, np.uint8)]))
    write_png(real / 'deep.png', (random_bgr(10, 12).astype(np.uint16) * 257))
    cv2.imwrite(str(real / 'photo.jpg'), random_bgr(30, 40))
    _broken(real / 'bad.png')


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    """(work folder, source folder, stdout of each subcommand): all four sets written to the default outputs."""
    work, src = tmp_path_factory.mktemp('work'), tmp_path_factory.mktemp('src')
    _make_sources(src)
    logs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # the default --out folders are what the option files read
        logs['lsdir'] = _run('lsdir', '--hr', src / 'lsdir', '--num', 5, '--lmdb')
        logs['realsr'] = _run('realsr', '--root', src / 'RealSR(V3)', '--lr-size', 8)
        logs['drealsr'] = _run('drealsr', '--root', src / 'DRealSR', '--lr-size', 0)
        logs['realset'] = _run('realset', '--lr', src / 'RealSet')
    return work, src, logs


# ----------------------------------------------------------------------------- LSDIR-Test
def test_lsdir_pairs_sizes_and_skips(prepared):
    work, src, logs = prepared
    out = work / 'datasets' / 'LSDIR-Test'
    names = ['0000001', 'sub_0000002']
    assert sorted(p.stem for p in (out / 'HR').iterdir()) == names
    assert sorted(p.stem for p in (out / 'LR').iterdir()) == names
    assert _meta(out) == [f'{n}.png' for n in names]
    for n in names:
        assert _read(out / 'HR' / f'{n}.png').shape == (512, 512, 3)
        assert _read(out / 'LR' / f'{n}.png').shape == (128, 128, 3)
    hr = _read(out / 'HR' / '0000001.png')  # the centre crop, untouched
    np.testing.assert_array_equal(hr, _read(src / 'lsdir' / '0000001.png')[4:516, 9:521])
    assert 'small.png: 600x500 is smaller than 512x512' in logs['lsdir']
    assert 'broken.png: cannot decode image' in logs['lsdir']
    assert '--num 5: only 2 usable image(s)' in logs['lsdir']
    assert (out / 'HR.lmdb' / 'data.mdb').is_file() and (out / 'LR.lmdb' / 'data.mdb').is_file()


def test_lsdir_lmdbs_pair_in_the_dataset(prepared):
    from patchscaler.data.paired_image_dataset import PairedSRDataset
    out = prepared[0] / 'datasets' / 'LSDIR-Test'
    ds = PairedSRDataset({'scale': 4, 'dataroot_lq': str(out / 'LR.lmdb'), 'dataroot_gt': str(out / 'HR.lmdb')})
    assert len(ds) == 2
    item = ds[0]
    assert item['lq'].shape == (3, 128, 128) and item['gt'].shape == (3, 512, 512)


def test_lsdir_is_reproducible_per_image(prepared, tmp_path):
    """Same seed: the same image is picked first and gets the same LR, whatever --num is."""
    work, src, _ = prepared
    _run('lsdir', '--hr', src / 'lsdir', '--num', 1, '--out', tmp_path / 'again')
    (lr,) = list((tmp_path / 'again' / 'LR').iterdir())
    np.testing.assert_array_equal(_read(lr), _read(work / 'datasets' / 'LSDIR-Test' / 'LR' / lr.name))
    assert P.image_seed('0000001', 0) != P.image_seed('0000001', 1) != P.image_seed('sub_0000002', 1)


def test_degradation_presets_build():
    for preset in ('resshift', 'realesrgan'):
        kernels, degradation = P.build_degradation(preset)
        assert set(kernels.sample()) == {'kernel1', 'kernel2', 'sinc_kernel'}
    lr = P.degrade(random_bgr(64, 64), 0, kernels, degradation)
    assert lr.shape == (16, 16, 3) and lr.dtype == np.uint8


# ----------------------------------------------------------------------------- RealSR, DRealSR
def test_realsr_pairs_per_camera_with_centre_crop(prepared):
    work, src, logs = prepared
    for camera in ('Canon', 'Nikon'):
        out = work / 'datasets' / 'RealSR' / camera
        names = [f'{camera}_001', f'{camera}_002']
        assert sorted(p.stem for p in (out / 'HR').iterdir()) == names
        assert _meta(out) == [f'{n}.png' for n in names]
        lr, hr = _read(out / 'LR' / f'{camera}_002.png'), _read(out / 'HR' / f'{camera}_002.png')
        assert lr.shape == (8, 8, 3) and hr.shape == (32, 32, 3)
        source = src / 'RealSR(V3)' / camera / 'Test' / '4'
        np.testing.assert_array_equal(lr, _read(source / f'{camera}_002_LR4.png')[4:12, 4:12])
        np.testing.assert_array_equal(hr, _read(source / f'{camera}_002_HR.png')[16:48, 16:48])
    assert 'Canon_003_HR.png: HR without LR' in logs['realsr']
    assert 'readme.png: neither _HR nor _LR4' in logs['realsr']
    assert 'Canon_004_LR4.png: cannot decode image' in logs['realsr']
    assert "pair 'Canon_004' skipped" in logs['realsr']


def test_drealsr_pairs_by_stem(prepared):
    work, src, logs = prepared
    out = work / 'datasets' / 'DRealSR'
    assert _meta(out) == ['DSC_0001.png', 'DSC_0002.png']
    assert _read(out / 'LR' / 'DSC_0001.png').shape == (12, 16, 3)  # --lr-size 0: whole images
    assert _read(out / 'HR' / 'DSC_0001.png').shape == (48, 64, 3)
    assert 'DSC_0003_x1.png: HR without LR' in logs['drealsr']
    assert 'DSC_0009_x4.png: LR without HR' in logs['drealsr']


def test_drealsr_flat_layout_and_same_size_lr(tmp_path):
    """test_HR/ + test_LR/ directly under --root; an LR as large as its HR is skipped with the reason."""
    write_png(tmp_path / 'x4' / 'test_HR' / 'a_HR.png', random_bgr(40, 40))
    write_png(tmp_path / 'x4' / 'test_LR' / 'a_LR4.png', random_bgr(10, 10))
    write_png(tmp_path / 'x4' / 'test_HR' / 'b_x1.png', random_bgr(40, 40))
    write_png(tmp_path / 'x4' / 'test_LR' / 'b_x4.png', random_bgr(40, 40))
    log = _run('drealsr', '--root', tmp_path / 'x4', '--out', tmp_path / 'out', '--lr-size', 0)
    assert _meta(tmp_path / 'out') == ['a.png']
    assert 'b_x4.png: HR 40x40 is smaller than 4 x LR 40x40 (an LR upsampled to HR size' in log


def test_crop_pair_default_lr_size():
    hr, lr = random_bgr(600, 700), random_bgr(150, 175)
    hr_c, lr_c = P.crop_pair(hr, lr, 4, 128)
    assert lr_c.shape == (128, 128, 3) and hr_c.shape == (512, 512, 3)
    np.testing.assert_array_equal(lr_c, lr[11:139, 23:151])
    np.testing.assert_array_equal(hr_c, hr[44:556, 92:604])
    with pytest.raises(P.DataError, match='smaller than --lr-size 128'):
        P.crop_pair(random_bgr(400, 400), random_bgr(100, 100), 4, 128)


# ----------------------------------------------------------------------------- RealSet, errors
def test_realset_lr_only(prepared):
    work, _, logs = prepared
    out = work / 'datasets' / 'RealSet110'
    assert _meta(out) == ['deep.png', 'gray.png', 'photo.png', 'rgba.png']
    assert not (out / 'HR').exists()
    for name in _meta(out):
        img = _read(out / 'LR' / name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert 'bad.png: cannot decode image' in logs['realset']


def test_clear_errors(prepared, tmp_path):
    _, src, _ = prepared
    missing = tmp_path / 'nowhere'
    assert _error('realsr', '--root', missing) == f'error: RealSR root not found: {missing}'
    assert f'LSDIR HR folder not found: {missing}' in _error('lsdir', '--hr', missing)
    assert f'DRealSR folder not found: {missing}' in _error('drealsr', '--root', missing)
    msg = _error('realsr', '--root', src / 'RealSR(V3)', '--cameras', 'Canon', 'Sony')
    assert 'Sony/Test/4 not found: expected the RealSR (V3) layout' in msg
    (tmp_path / 'empty').mkdir()
    assert f'no images found in {tmp_path / "empty"}' in _error('realset', '--lr', tmp_path / 'empty')
    assert 'no test_HR/ and test_LR/ folders' in _error('drealsr', '--root', tmp_path / 'empty')


def test_existing_set_needs_overwrite(prepared, tmp_path):
    _, src, _ = prepared
    out = tmp_path / 'set'
    _run('realset', '--lr', src / 'RealSet', '--out', out)
    assert '--overwrite' in _error('realset', '--lr', src / 'RealSet', '--out', out)
    (out / 'LR' / 'stale.png').write_bytes(b'')
    _run('realset', '--lr', src / 'RealSet', '--out', out, '--overwrite')
    assert not (out / 'LR' / 'stale.png').exists() and len(_meta(out)) == 4
    assert 'lies inside the output' in _error('realset', '--lr', out / 'LR', '--out', out, '--overwrite')


# ----------------------------------------------------------------------------- option files
OPTION_FILES = {'lsdir': 1, 'realsr': 2, 'drealsr': 1, 'realset110': 1}  # -> number of test datasets
FULL_REFERENCE = {'psnr', 'ssim', 'lpips'}
NO_REFERENCE = {'niqe', 'maniqa', 'clipiqa', 'musiq'}


def _load(name):
    from patchscaler.utils.cli import load_option_file
    return load_option_file(os.path.join(ROOT, 'options', f'test_patchscaler_{name}.yml'))


@pytest.mark.parametrize('name', sorted(OPTION_FILES))
def test_option_file_passes_the_check(name, monkeypatch):
    """As tests/test_baselines.py checks every option file, with paths taken as present; metric types are
    registered elsewhere (patchscaler/metrics), so their registry lookup is left out here."""
    from patchscaler.utils import options_check
    opt = _load(name)
    base = _load_base()
    assert {k: v for k, v in opt.items() if k not in ('name', 'datasets', 'val')} == \
        {k: v for k, v in base.items() if k not in ('name', 'datasets', 'val')}
    assert opt['name'] != base['name'] and len(opt['datasets']) == OPTION_FILES[name]
    assert opt['val']['save_img'] is True and opt['val']['pbar'] is True
    metrics = opt['val']['metrics']
    assert set(metrics) == (NO_REFERENCE if name == 'realset110' else NO_REFERENCE | FULL_REFERENCE)
    for key in set(metrics) & {'psnr', 'ssim'}:
        assert metrics[key]['crop_border'] == 4 and metrics[key]['test_y_channel'] is True
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(options_check, '_check_metrics', lambda metrics: None)
    monkeypatch.setattr(os.path, 'exists', lambda p: True)
    monkeypatch.setattr(os.path, 'isfile', lambda p: True)
    options_check.check_options(opt)


def _load_base():
    from patchscaler.utils.cli import load_option_file
    return load_option_file(os.path.join(ROOT, 'options', 'test_patchscaler.yml'))


@pytest.mark.parametrize('name', sorted(OPTION_FILES))
def test_option_file_datasets_build_from_prepared_sets(name, prepared, monkeypatch):
    from basicsr.data import build_dataset
    opt = _load(name)
    monkeypatch.chdir(prepared[0])
    for ds_opt in opt['datasets'].values():
        ds = build_dataset(dict(ds_opt, phase='test', scale=opt['scale']))
        item = ds[0]
        assert 'error' not in item and len(ds) >= 1
        if name == 'realset110':
            assert 'gt' not in item
        else:
            assert item['gt'].shape[-2:] == tuple(4 * s for s in item['lq'].shape[-2:])

"""Building an RTM from images: candidate patches (positions, flat filter, context encoding, bad images) and
``tools/build_rtm.py`` end to end with its option checks."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, write_png

from patchscaler.archs.autoencoder_arch import PixelUnshuffleAutoencoder
from patchscaler.retrieval import ReferenceTextureMemory, build_rtm_from_options, check_rtm_options, collect_candidates
from patchscaler.utils.errors import ConfigError, DataError, PatchScalerError


def _texture(h, w, seed):
    """Photo-like uint8 BGR: smooth noise plus stripes (never flat)."""
    import cv2
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.uniform(0, 255, (h, w, 3)).astype(np.float32), (0, 0), 2)
    stripes = 60 * np.sin(np.arange(w) * 0.7 + seed)[None, :, None]
    return np.clip(base + stripes, 0, 255).astype(np.uint8)


@pytest.fixture
def hr_folder(tmp_path):
    """Three textured images, one flat, one smaller than a patch, one corrupt, one text file."""
    folder = tmp_path / 'hr'
    for i, (h, w) in enumerate([(96, 128), (80, 80), (130, 70)]):
        write_png(str(folder / f'tex{i}.png'), _texture(h, w, i))
    write_png(str(folder / 'flat.png'), np.full((96, 96, 3), 128, np.uint8))
    write_png(str(folder / 'tiny.png'), _texture(12, 40, 9))
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    (folder / 'readme.txt').write_text('not an image')
    return folder


def test_candidates_skip_bad_images_and_flat_patches(hr_folder):
    ae = PixelUnshuffleAutoencoder(4)
    with pytest.warns(UserWarning, match='skipping'):
        values, origins, report = collect_candidates([str(hr_folder)], ae, 4, num=40, seed=0, progress=False)
    assert report.images == 6 and report.used == 3
    assert sorted(name for name, _ in report.skipped) == ['broken.png', 'tiny.png']
    assert 'smaller than one patch (16×16 px' in dict(report.skipped)['tiny.png']
    assert 'cannot decode' in dict(report.skipped)['broken.png']
    assert report.flat_rejected > 0 and not any(name == 'flat.png' for name, _, _ in origins)
    assert values.shape == (40, 48, 4, 4) and len(origins) == 40 == report.candidates
    assert all(y % 4 == 0 and x % 4 == 0 for _, y, x in origins)


def test_candidates_are_the_encoded_patches(hr_folder):
    """Each value is the autoencoder's latent of the image region it names (exact for pixel-unshuffle,
    whose encoding is local, whatever the context window)."""
    from patchscaler.data.image_io import read_image
    ae = PixelUnshuffleAutoencoder(4)
    with pytest.warns(UserWarning):
        values, origins, _ = collect_candidates([str(hr_folder)], ae, 4, num=30, context=3, progress=False)
    for value, (name, y, x) in zip(values, origins):
        img = read_image(str(hr_folder / name))[y:y + 16, x:x + 16, ::-1].copy()
        expected = ae.encode(torch.from_numpy(img.transpose(2, 0, 1))[None])[0]
        assert torch.allclose(value, expected, atol=1e-6)


def test_grid_mode_takes_the_non_overlapping_grid(tmp_path):
    folder = tmp_path / 'one'
    write_png(str(folder / 'a.png'), _texture(64, 96, 0))
    values, origins, _ = collect_candidates([str(folder)], PixelUnshuffleAutoencoder(4), 4, num=1000, mode='grid',
                                            min_std=0, progress=False)
    assert sorted((y, x) for _, y, x in origins) == [(y, x) for y in range(0, 64, 16) for x in range(0, 96, 16)]
    assert len(values) == 24


def test_candidates_bad_sources(tmp_path):
    ae = PixelUnshuffleAutoencoder(4)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='no images in'):
        collect_candidates([str(tmp_path / 'empty')], ae, 4, progress=False)
    with pytest.raises(DataError, match='image folder not found'):
        collect_candidates([str(tmp_path / 'missing')], ae, 4, progress=False)
    write_png(str(tmp_path / 'flat' / 'a.png'), np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(DataError, match='no usable patches'):
        collect_candidates([str(tmp_path / 'flat')], ae, 4, progress=False)
    with pytest.raises(ConfigError, match='mode'):
        collect_candidates([str(tmp_path / 'flat')], ae, 4, mode='sliding', progress=False)


def _options(tmp_path, sources, **over):
    opt = {'name': 'tiny_rtm', 'autoencoder': {'type': 'PixelUnshuffleAutoencoder', 'downscale': 4},
           'patch_size': 4, 'sources': sources, 'candidates': {'num': 60, 'min_std': 0.02, 'batch_size': 8},
           'texture_classifier': {'type': 'LatentTextureDescriptor', 'scales': [1]}, 'size': 12,
           'fps': {'space': 'both'}, 'top_k': 3, 'device': 'cpu',
           'output': str(tmp_path / 'out' / 'tiny_rtm.safetensors'), 'preview': {'queries': 3, 'count': 12}}
    opt.update(over)
    return opt


def test_build_from_options_writes_memory_metadata_and_preview(hr_folder, tmp_path):
    lines = []
    with pytest.warns(UserWarning):
        rtm, path, report = build_rtm_from_options(_options(tmp_path, [str(hr_folder)]), progress=False,
                                                   log=lines.append)
    assert len(rtm) == 12 and os.path.isfile(path)
    import cv2
    preview = cv2.imread(str(tmp_path / 'out' / 'tiny_rtm_preview.png'))
    assert preview is not None and preview.shape[0] > 100
    loaded = ReferenceTextureMemory.load(path, autoencoder=PixelUnshuffleAutoencoder(4), patch_size=4)
    assert loaded.meta['skipped_images'] and loaded.meta['sources'] == [str(hr_folder)]
    assert loaded.top_k == 3 and loaded.meta['name'] == 'tiny_rtm'
    assert any('skipped broken.png' in line for line in lines)


@pytest.mark.parametrize('change, message', [
    ({'candidates': {'nmu': 3}}, "unknown option 'candidates.nmu' (did you mean 'num'?)"),
    ({'sise': 3}, "unknown option 'sise' (did you mean 'size'?)"),
    ({'size': 0}, 'size must be an integer >= 1'),
    ({'patch_size': None}, "missing the required key 'patch_size'"),
    ({'fps': {'space': 'pixels'}}, 'fps.space must be one of'),
    ({'fps': {'value_weight': -1}}, 'fps.value_weight must be a number >= 0'),
    ({'top_k': 50}, 'top_k (50) cannot exceed the memory size (12)'),
    ({'top_k': 0}, 'top_k must be an integer >= 1'),
    ({'candidates': {'batch_size': 0}}, 'candidates.batch_size must be an integer >= 1'),
    ({'candidates': {'context': -1}}, 'candidates.context must be an integer >= 0'),
    ({'candidates': {'mode': 'sliding'}}, 'candidates.mode must be one of'),
    ({'device': 'gpu'}, 'device must be auto, cpu, cuda or cuda:N'),
    ({'center_keys': 'yes'}, 'center_keys must be true, false'),
    ({'patch_size': 2}, 'patches of 2×2 are too small for scales [1]'),
    ({'texture_classifier': {'type': 'LatentTextureDescriptr'}}, "unknown type 'LatentTextureDescriptr'"),
    ({'texture_classifier': {'type': 'TorchvisionTextureClassifier', 'weights': 'weights/none.pth'}},
     'texture classifier weights not found: weights/none.pth'),
])
def test_bad_options_fail_in_one_line_before_any_image_is_read(hr_folder, tmp_path, monkeypatch, change, message):
    import patchscaler.retrieval.build as build_module

    def never(*args, **kwargs):
        raise AssertionError('the candidate step ran before the options were refused')

    monkeypatch.setattr(build_module, 'collect_candidates', never)
    opt = _options(tmp_path, [str(hr_folder)], **change)
    if change.get('patch_size', 0) is None:
        del opt['patch_size']
    with pytest.raises(PatchScalerError) as info:
        build_rtm_from_options(opt, progress=False, log=lambda s: None)
    assert message in str(info.value)
    assert not (tmp_path / 'out').exists()


def test_check_options_accepts_the_shipped_files():
    for path in ('options/build_rtm.yml', 'options/demo/build_rtm_demo.yml'):
        with open(os.path.join(ROOT, path)) as f:
            check_rtm_options(yaml.safe_load(f), check_paths=False)  # the data is not here


def _tool(args, cwd):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'build_rtm.py'), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_tool_end_to_end_and_errors(hr_folder, tmp_path):
    (tmp_path / 'rtm.yml').write_text(yaml.safe_dump(_options(tmp_path, [str(hr_folder)])))
    proc = _tool(['-opt', 'rtm.yml', '--no-progress'], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'RTM: 12 of 60 candidates kept by FPS' in proc.stdout
    assert 'skipped broken.png' in proc.stdout
    for suffix in ('.safetensors', '.json', '_preview.png'):
        assert (tmp_path / 'out' / f'tiny_rtm{suffix}').is_file()

    (tmp_path / 'bad.yml').write_text(yaml.safe_dump(_options(tmp_path, [str(tmp_path / 'nowhere')])))
    proc = _tool(['-opt', 'bad.yml'], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith('error: sources: path does not exist')
    proc = _tool(['-opt', 'missing.yml'], tmp_path)
    assert proc.returncode == 2 and 'option file not found' in proc.stderr

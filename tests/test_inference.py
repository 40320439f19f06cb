"""tools/infer.py: image files in, SR files out, in the input's format; bad files listed, the rest done."""
import os

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, random_bgr, write_png

from patchscaler.inference import checkpoint_files, load_pipeline
from patchscaler.utils.errors import ConfigError

INFER = os.path.join(ROOT, 'tools', 'infer.py')


def _infer(args, cwd):
    import subprocess
    import sys
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    return subprocess.run([sys.executable, INFER, *args, '--no-progress'], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_a_folder_of_every_kind_of_image(trained, tmp_path):
    opt_path, _ = trained
    src = tmp_path / 'in'
    write_png(src / 'rgb.png', random_bgr(12, 10, seed=1))
    write_png(src / 'gray.png', random_bgr(9, 11, seed=2)[..., 0])
    rgba = np.concatenate([random_bgr(8, 8, seed=3), np.full((8, 8, 1), 128, np.uint8)], 2)
    write_png(src / 'rgba.png', rgba)
    write_png(src / 'sub' / 'deep16.png', (random_bgr(8, 12, seed=4).astype(np.uint16) * 257))
    (src / 'broken.jpg').write_bytes(b'\xff\xd8\xff not a jpeg')
    write_png(src / 'tiny.png', random_bgr(1, 1, seed=5))
    (src / 'notes.txt').write_text('not an image')
    proc = _infer(['-i', str(src), '-o', str(tmp_path / 'out'), '--opt', opt_path, '--save-qmap'], tmp_path)
    assert proc.returncode == 1, proc.stderr  # some files failed ...
    failed = [ln for ln in proc.stderr.splitlines() if ln.startswith('failed:')]
    assert len(failed) == 1 and 'broken.jpg: cannot decode' in failed[0]
    assert '5 image(s) written, 1 failed' in proc.stdout and 'PGS:' in proc.stdout
    out = tmp_path / 'out'  # ... and the others were written, in their own format, at ×4
    rgb = cv2.imread(str(out / 'rgb.png'), cv2.IMREAD_UNCHANGED)
    gray = cv2.imread(str(out / 'gray.png'), cv2.IMREAD_UNCHANGED)
    rgba_out = cv2.imread(str(out / 'rgba.png'), cv2.IMREAD_UNCHANGED)
    deep = cv2.imread(str(out / 'sub' / 'deep16.png'), cv2.IMREAD_UNCHANGED)
    assert rgb.shape == (48, 40, 3) and rgb.dtype == np.uint8
    assert gray.shape == (36, 44)
    assert rgba_out.shape == (32, 32, 4) and abs(int(rgba_out[..., 3].mean()) - 128) <= 1
    assert deep.shape == (32, 48, 3) and deep.dtype == np.uint16
    assert cv2.imread(str(out / 'tiny.png')).shape == (4, 4, 3)  # 1×1 px still gives a 2×2 latent at d=2
    assert (out / 'rgb_qmap.png').is_file() and (out / 'rgb_confidence.png').is_file()


def test_an_image_too_small_for_the_model_is_one_clear_failure(trained, tmp_path):
    opt_path, _ = trained
    with open(opt_path) as f:
        opt = yaml.safe_load(f)
    pipe = load_pipeline(opt, 'cpu')
    pipe.autoencoder.downscale_factor = 8  # as the SD VAE: ×4 of a 2×2 image is a 1×1 latent
    assert pipe.min_input_size() == 4
    from patchscaler.inference import infer_paths
    write_png(tmp_path / 'in' / 'two.png', random_bgr(2, 2))
    summary = infer_paths(pipe, [str(tmp_path / 'in')], str(tmp_path / 'out'), progress=False)
    assert not summary.written and 'needs at least 4 px per side' in summary.failures[0][1]


def test_outputs_never_overwrite_inputs_or_each_other(trained, tmp_path):
    from patchscaler.inference import list_images, output_names
    src = tmp_path / 'in'
    write_png(src / 'a.png', random_bgr(8, 8))
    assert cv2.imwrite(str(src / 'a.jpg'), random_bgr(8, 8))
    names = output_names(list_images([str(src)]), str(tmp_path / 'out'))
    assert sorted(os.path.basename(n) for n in names) == ['a_jpg', 'a_png']  # both kept, told apart
    opt_path, _ = trained
    write_png(tmp_path / 'only' / 'b.png', random_bgr(8, 8))
    proc = _infer(['-i', str(tmp_path / 'only'), '-o', str(tmp_path / 'only'), '--opt', opt_path], tmp_path)
    assert proc.returncode == 2 and 'would overwrite an input' in proc.stderr


def test_qmap_outputs_and_suffixes_are_in_the_collision_and_folder_checks(tmp_path):
    """a.png's Qmap is a_qmap.png, the SR image of an input a_qmap.png too: refused before any work, as is a
    suffix (or name) that would put a file outside -o."""
    from patchscaler.inference import list_images, output_names
    from patchscaler.utils.errors import DataError
    src = tmp_path / 'in'
    write_png(src / 'a.png', random_bgr(8, 8))
    write_png(src / 'a_qmap.png', random_bgr(8, 8))
    images, out = list_images([str(src)]), str(tmp_path / 'out')
    assert len(output_names(images, out)) == 2  # without --save-qmap the two are fine
    with pytest.raises(DataError, match='a_qmap.png would overwrite another output'):
        output_names(images, out, extras=('_qmap', '_confidence'))
    for suffix in ('/../../escape', '/../../../y'):
        with pytest.raises(DataError, match='would land outside -o'):
            output_names(images, out, suffix=suffix)
    assert [os.path.basename(n) for n in output_names(images, out, suffix='_x4')] == ['a_x4', 'a_qmap_x4']


def test_ckpt_folder_replaces_the_option_paths(trained, tmp_path):
    opt_path, run = trained
    assert set(checkpoint_files(str(run))) == {'grm', 'dit', 'texture'}
    with open(opt_path) as f:
        opt = yaml.safe_load(f)
    opt['path'] = {}
    pipe = load_pipeline(opt, 'cpu', ckpt=str(run))
    assert pipe.denoiser is not None and pipe.rtm is not None
    with pytest.raises(Exception, match='no weights for network_grm'):
        load_pipeline(opt, 'cpu')


def test_option_and_checkpoint_problems_are_one_line(trained, tmp_path):
    opt_path, run = trained
    src = tmp_path / 'one'
    write_png(src / 'a.png', random_bgr(8, 8))
    with open(opt_path) as f:
        opt = yaml.safe_load(f)
    opt['network_dit']['hidden_size'] = 64  # another configuration than the checkpoint's
    (tmp_path / 'other.yml').write_text(yaml.safe_dump(opt))
    proc = _infer(['-i', str(src), '-o', str(tmp_path / 'o'), '--opt', 'other.yml'], tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith('error: ') and 'does not fit network_dit' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    opt['network_dit'] = dict(opt['network_dit'], hidden_size=32, hiden=2)
    (tmp_path / 'typo.yml').write_text(yaml.safe_dump(opt))
    proc = _infer(['-i', str(src), '-o', str(tmp_path / 'o'), '--opt', 'typo.yml'], tmp_path)
    assert proc.returncode == 2 and "network_dit.hiden" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = _infer(['-i', str(tmp_path / 'nothing'), '-o', str(tmp_path / 'o'), '--opt', opt_path], tmp_path)
    assert proc.returncode == 2 and 'input not found' in proc.stderr


# ---------------------------------------------------------------------------------- speed options (GPU fast path)
def _pipes(trained, **variants):
    opt_path, _ = trained
    with open(opt_path) as f:
        opt = yaml.safe_load(f)
    base = load_pipeline(dict(opt), 'cpu')
    out = {}
    for name, extra in variants.items():
        extra = dict(extra)
        devices, split = extra.pop('_devices', None), extra.pop('_split', None)
        out[name] = load_pipeline(dict(opt, **extra), 'cpu', devices=devices, device_split=split)
    return base, out


def _lq(seed=0, size=20):
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_group_parallel_devices_give_the_same_image(trained):
    """PGS's groups on two (CPU) devices in two threads, each device's texture prompts made by its own copy of the
    denoiser (forced here: on one CPU the copy would be skipped): the same SR as on one device."""
    import copy
    base, pipes = _pipes(trained, two={'_devices': ['cpu', 'cpu']})
    pipe = pipes['two']
    copied = copy.deepcopy(pipe.denoiser)
    pipe.denoisers = [pipe.denoiser, copied]
    used = []
    encode = copied.encode_prompt
    copied.encode_prompt = lambda *a: used.append(1) or encode(*a)
    from patchscaler.sampling.grouping import GroupAssigner
    for p in (base, pipe):  # random weights grade every patch alike: fixed shares give every group patches
        p.sampler.assigner = GroupAssigner(3, mode='share', shares=[0.4, 0.3, 0.3])
    pipe.sampler.device_groups = [[1, 2], [0]]  # the simple group on the copy (device 1)
    lq = _lq(size=48)
    ref, out = base(lq, seed=3), pipe(lq, seed=3)
    assert out.report.patches_per_group[0] > 0 and out.report.cond_calls > 0 and used  # the copy made prompts
    assert len(out.report.seconds_per_device) == 2
    torch.testing.assert_close(out.sr, ref.sr, atol=1e-5, rtol=0)


def test_the_paper_device_split_runs_each_group_where_it_names(trained):
    """device_split paper on ['cpu', 'cpu']: the hard group alone on device 0, simple and medium on device 1 (each
    device's denoiser counted), and the same SR as on one device (the threads' blend order: float tolerance)."""
    import copy
    base, pipes = _pipes(trained, paper={'_devices': ['cpu', 'cpu'], '_split': 'paper'})
    pipe = pipes['paper']
    assert pipe.sampler.device_groups == [[2], [0, 1]]
    pipe.denoisers = [pipe.denoiser, copy.deepcopy(pipe.denoiser)]  # one CPU would share one denoiser: count each
    calls = [0, 0]
    for d, net in enumerate(pipe.denoisers):
        forward = net.forward
        net.forward = lambda *a, _d=d, _f=forward: calls.__setitem__(_d, calls[_d] + 1) or _f(*a)
    from patchscaler.sampling.grouping import GroupAssigner
    for p in (base, pipe):
        p.sampler.assigner = GroupAssigner(3, mode='share', shares=[0.4, 0.3, 0.3])
    ref, out = base(_lq(size=20), seed=3), pipe(_lq(size=20), seed=3)
    s = pipe.sampler
    per_group = [-(-n // s.batch_size) * c for n, c in zip(out.report.patches_per_group, s.calls)]
    assert min(out.report.patches_per_group) > 0 and calls == [per_group[2], per_group[0] + per_group[1]]
    torch.testing.assert_close(out.sr, ref.sr, atol=1e-5, rtol=0)


def test_device_groups_and_splits_take_the_devices_given_at_load(trained):
    """The sampler file's device_groups / device_split need no devices of their own: --devices (or pgs_devices)
    fill them in; a split given at load replaces the file's placement; what cannot work is one line."""
    from patchscaler.sampling.pgs import PatchGroupSampler
    from patchscaler.utils.errors import ConfigError
    opt_path, _ = trained
    with open(opt_path) as f:
        opt = yaml.safe_load(f)
    with_groups = dict(opt, sampler=dict(opt['sampler'], device_groups=[[2], [0, 1]]))
    with_split = dict(opt, sampler=dict(opt['sampler'], device_split='paper'))
    pipe = load_pipeline(with_groups, 'cpu', devices=['cpu', 'cpu'])
    assert pipe.sampler.device_groups == [[2], [0, 1]] and len(pipe.sampler.devices) == 2
    assert load_pipeline(dict(with_split, pgs_devices=['cpu', 'cpu']), 'cpu').sampler.device_groups == [[2], [0, 1]]
    assert load_pipeline(with_groups, 'cpu', devices=['cpu', 'cpu'], device_split='lpt').sampler.device_groups is None
    two = PatchGroupSampler(groups=[(400, 8), (1000, 20)], grouping={'thresholds': [0.9]}, device_split='paper',
                            devices=['cpu', 'cpu'])
    assert two.device_groups == [[1], [0]]
    one = PatchGroupSampler(patch_size=8, groups=[(1000, 2)], device_split='paper')
    assert one.device_groups is None  # one device: nothing to place, and the run says so
    with pytest.warns(UserWarning, match='runs on one device: nothing to place'):
        one.sample(lambda x, t, c: x, torch.zeros(1, 2, 8, 8))
    with pytest.raises(ConfigError, match='sampler.device_groups places groups on devices and none are given'):
        load_pipeline(with_groups, 'cpu')
    with pytest.raises(ConfigError, match='device_split places groups on devices and none are given'):
        load_pipeline(dict(opt), 'cpu', device_split='paper')
    with pytest.raises(ConfigError, match='needs 2 devices and 2\\+ groups, got 3 device'):
        load_pipeline(with_split, 'cpu', devices=['cpu'] * 3)
    with pytest.raises(ConfigError, match='device_groups or device_split, not both'):
        load_pipeline(dict(opt, sampler=dict(with_groups['sampler'], device_split='paper')), 'cpu',
                      devices=['cpu', 'cpu'])
    with pytest.raises(ConfigError, match='device_split must be one of paper, lpt'):
        load_pipeline(dict(opt), 'cpu', devices=['cpu', 'cpu'], device_split='hard-first')


def test_devices_and_speed_options_are_checked(trained):
    from patchscaler.utils.errors import ConfigError
    opt_path, _ = trained
    with open(opt_path) as f:
        opt = yaml.safe_load(f)
    with pytest.raises(ConfigError, match='cuda:7 is not there'):
        load_pipeline(dict(opt), 'cpu', devices=['cpu', 'cuda:7'])
    with pytest.raises(ConfigError, match='devices'):
        load_pipeline(dict(opt), 'cpu', devices=['not-a-device'])
    with pytest.raises(ConfigError, match='not thread-safe'):
        load_pipeline(dict(opt, compile=True), 'cpu', devices=['cpu', 'cpu'])
    with pytest.raises(ConfigError, match='autoencoder_autocast needs autocast'):
        load_pipeline(dict(opt, autoencoder_autocast=True), 'cpu')
    from patchscaler.models.pipeline_options import speed_options
    assert speed_options({'compile': True, 'pgs_devices': ['cuda:0']}) == {'compile': True, 'devices': ['cuda:0']}
    with pytest.raises(ConfigError, match='pgs_devices is an inference option'):
        speed_options({'pgs_devices': ['cuda:0'], 'is_train': False}, model=True)
    with pytest.raises(ConfigError, match='compile is an inference option'):
        speed_options({'compile': True, 'is_train': True}, model=True)


def test_channels_last_and_compile_change_nothing_but_speed(trained):
    base, pipes = _pipes(trained, nhwc={'channels_last': True}, compiled={'compile': {'backend': 'eager'}})
    ref = base(_lq(1), seed=0).sr
    convs = [m for m in pipes['nhwc'].grm.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    torch.testing.assert_close(pipes['nhwc'](_lq(1), seed=0).sr, ref, atol=1e-5, rtol=0)
    assert pipes['compiled'].grm._compiled_call_impl is not None
    torch.testing.assert_close(pipes['compiled'](_lq(1), seed=0).sr, ref, atol=1e-5, rtol=0)


def test_autoencoder_autocast_falls_back_to_fp32_on_nan(trained):
    """bf16 for the autoencoder too: close to fp32; a decoder that overflows (NaN) in low precision is redone."""
    base, pipes = _pipes(trained, ae16={'autocast': 'bf16', 'autoencoder_autocast': True},
                         net16={'autocast': 'bf16'})
    pipe = pipes['ae16']
    out, ref = pipe(_lq(2), seed=0).sr, pipes['net16'](_lq(2), seed=0).sr
    assert out.dtype == torch.float32 and (out - ref).abs().mean() < 0.02 and pipe.fp32_fallbacks == 0
    decode = pipe.autoencoder.decode

    def overflowing(z):
        x = decode(z)
        return x * float('nan') if torch.is_autocast_enabled('cpu') else x
    pipe.autoencoder.decode = overflowing
    fixed = pipe(_lq(2), seed=0).sr
    assert torch.isfinite(fixed).all() and pipe.fp32_fallbacks >= 1
    torch.testing.assert_close(fixed, ref, atol=0.02, rtol=0)


def test_infer_cli_on_two_devices(trained, tmp_path):
    """--devices with the option file's sampler.device_groups (which lists no devices), and --device-split paper:
    both run, with the one-device image."""
    opt_path, _ = trained
    with open(opt_path) as f:
        opt = yaml.safe_load(f)
    opt['sampler']['device_groups'] = [[2], [0, 1]]
    (tmp_path / 'groups.yml').write_text(yaml.safe_dump(opt))
    write_png(tmp_path / 'in' / 'a.png', random_bgr(12, 12, seed=7))
    runs = {'one': [opt_path], 'groups': ['groups.yml', '--devices', 'cpu,cpu'],
            'paper': [opt_path, '--devices', 'cpu,cpu', '--device-split', 'paper']}
    for name, args in runs.items():
        proc = _infer(['-i', str(tmp_path / 'in'), '-o', str(tmp_path / name), '--opt', *args], tmp_path)
        assert proc.returncode == 0, (name, proc.stderr)
    a = cv2.imread(str(tmp_path / 'one' / 'a.png')).astype(int)
    for name in ('groups', 'paper'):
        assert np.abs(cv2.imread(str(tmp_path / name / 'a.png')).astype(int) - a).max() <= 1, name


# ---------------------------------------------------------------------------------- bad inputs, whole tool
def test_more_kinds_of_image_through_the_tool(trained, tmp_path):
    """Palette PNG, EXIF-rotated JPEG, very wide and very tall strips, sides that are multiples of neither the
    autoencoder's factor nor the patch size: each comes out at exactly ×4 of its displayed size, in its format."""
    import io

    from PIL import Image
    opt_path, _ = trained
    src = tmp_path / 'in'
    src.mkdir()
    Image.fromarray(random_bgr(9, 13, seed=1)[..., 0] % 7, mode='P').save(src / 'palette.png')
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :4] = 255  # a white left band
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise: 20 tall, 10 wide, the band on top
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, 'JPEG', exif=exif.tobytes(), quality=95)
    (src / 'exif.jpg').write_bytes(buf.getvalue())
    write_png(src / 'wide.png', random_bgr(3, 97, seed=2))
    write_png(src / 'tall.png', random_bgr(61, 5, seed=3))
    write_png(src / 'odd.png', random_bgr(11, 17, seed=4))
    proc = _infer(['-i', str(src), '-o', str(tmp_path / 'out'), '--opt', opt_path], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '5 image(s) written, 0 failed' in proc.stdout
    out = tmp_path / 'out'
    shapes = {n: cv2.imread(str(out / f'{n}.png'), cv2.IMREAD_UNCHANGED).shape
              for n in ('palette', 'exif', 'wide', 'tall', 'odd')}
    # the output keeps the file's channel count: a palette PNG and an RGB JPEG are colour files even when every
    # pixel is gray (only a gray file comes out gray: test_a_folder_of_every_kind_of_image)
    assert shapes == {'palette': (36, 52, 3), 'exif': (80, 40, 3), 'wide': (12, 388, 3), 'tall': (244, 20, 3),
                      'odd': (44, 68, 3)}
    exif_out = cv2.imread(str(out / 'exif.png'), cv2.IMREAD_UNCHANGED)
    assert exif_out[:8].mean() > 150 and exif_out[-40:].mean() < 100  # rotated as displayed: the band on top


def test_empty_folder_and_missing_input(trained, tmp_path):
    opt_path, _ = trained
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'notes.txt').write_text('no images here')
    proc = _infer(['-i', str(tmp_path / 'empty'), '-o', str(tmp_path / 'out'), '--opt', opt_path], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith('error: no images'), proc.stderr
    proc = _infer(['-i', str(tmp_path / 'nope'), '-o', str(tmp_path / 'out'), '--opt', opt_path], tmp_path)
    assert proc.returncode == 2 and 'error: input not found' in proc.stderr


def test_grm_on_latent_tiles(trained):
    """grm_tile: the GRM on overlapping latent tiles. A latent within one tile is one plain GRM call; a larger one
    goes through tiles of the given size, agrees closely with one pass (the seams are blended) and keeps C in
    [0, 1]; the pipeline runs end to end with it."""
    base, pipes = _pipes(trained, tiled={'grm_tile': 8, 'grm_tile_overlap': 4})
    lq = _lq(5, size=12)  # ×4: 48 px, latent 24×24 at d=2: 5×5 tiles of 8 with overlap 4
    y_lr = base.encode(torch.nn.functional.interpolate(lq, scale_factor=4, mode='bicubic'))
    grm, calls = base.grm, []
    base.grm = lambda t: calls.append(tuple(t.shape[-2:])) or grm(t)
    with torch.no_grad():
        ref = base.run_grm(y_lr)
        base.grm_tile = 64
        base.run_grm(y_lr)
        base.grm_tile, base.grm_tile_overlap = 8, 4
        tiled = base.run_grm(y_lr)
    # one call on the whole latent twice, then 5×5 tiles (offsets 0, 4, ..., 16)
    assert calls[:2] == [(24, 24), (24, 24)] and set(calls[2:]) == {(8, 8)} and len(calls[2:]) == 25
    assert tiled[0].shape == ref[0].shape and tiled[1].shape == ref[1].shape
    assert (tiled[0] - ref[0]).abs().mean() < 0.05 * ref[0].abs().mean()
    assert tiled[1].min() >= 0 and tiled[1].max() <= 1
    assert pipes['tiled'](lq, seed=0).sr.shape == (1, 3, 48, 48)
    from patchscaler.utils.errors import ConfigError
    with pytest.raises(ConfigError, match='grm_tile'):
        _pipes(trained, bad={'grm_tile': 8, 'grm_tile_overlap': 8})
    # a GRM sure everywhere (C = 1): blending the tiles must not push C above 1 (PGS would refuse the map)
    base.grm = lambda t: (t, torch.ones_like(t[:, :1]))
    base.grm_tile, base.grm_tile_overlap = 32, 16
    _, conf = base.run_grm(torch.randn(1, 12, 100, 70))
    assert conf.max() <= 1 and conf.min() > 0.999
    base.grm_tile_overlap = 0  # 0 is a value, not "unset"
    assert base.run_grm(torch.randn(1, 12, 64, 64))[1].shape == (1, 1, 64, 64)
    from patchscaler.models.pipeline_options import speed_options
    assert speed_options({'grm_tile': 32, 'grm_tile_overlap': 0}) == {'grm_tile': 32, 'grm_tile_overlap': 0}


def test_a_file_name_that_is_not_utf8(trained, tmp_path):
    """caf\\xe9.png next to a plain image: both super-resolved, the output under the same (byte) name."""
    opt_path, _ = trained
    src = tmp_path / 'in'
    write_png(src / 'plain.png', random_bgr(8, 8, seed=1))
    name = os.fsdecode(b'caf\xe9')
    with open(os.path.join(str(src), name + '.png'), 'wb') as f:
        f.write(cv2.imencode('.png', random_bgr(8, 8, seed=2))[1].tobytes())
    proc = _infer(['-i', str(src), '-o', str(tmp_path / 'out'), '-opt', opt_path], tmp_path)  # BasicSR's -opt too
    assert proc.returncode == 0, proc.stderr
    assert '2 image(s) written' in proc.stdout
    assert sorted(os.listdir(str(tmp_path / 'out'))) == sorted([name + '.png', 'plain.png'])
    assert 'meshgrid' not in proc.stderr  # BasicSR's Swin warning on every run is filtered (compat fix 11)


def test_a_fifo_with_an_image_name_is_skipped_not_waited_on(trained, tmp_path):
    """A FIFO named like an image would block the read for ever; it is listed as skipped with why, as is every
    other file the walk does not process, and the images are written."""
    opt_path, _ = trained
    src = tmp_path / 'in'
    write_png(src / 'a.png', random_bgr(8, 8, seed=1))
    os.mkfifo(str(src / 'pipe.png'))
    (src / 'notes.txt').write_text('not an image')
    write_png(src / '.a.png.x1y2z3w4.tmp.png', random_bgr(8, 8, seed=2))  # left by an interrupted older version
    os.symlink(str(src / 'gone.png'), str(src / 'dangling.png'))
    proc = _infer(['-i', str(src), '-o', str(tmp_path / 'out'), '--opt', opt_path], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '1 image(s) written, 0 failed, 4 file(s) skipped' in proc.stdout
    skipped = sorted(ln for ln in proc.stdout.splitlines() if ln.startswith('skipped:'))
    assert len(skipped) == 4
    assert any('pipe.png: not a regular file' in ln for ln in skipped)
    assert any('notes.txt: not an image file name' in ln for ln in skipped)
    assert any('.tmp.png: a temporary file of an interrupted write' in ln for ln in skipped)
    assert any('dangling.png: a broken link' in ln for ln in skipped)
    assert os.listdir(str(tmp_path / 'out')) == ['a.png']
    fifo = _infer(['-i', str(src / 'pipe.png'), '-o', str(tmp_path / 'out2'), '--opt', opt_path], tmp_path)
    assert fifo.returncode != 0 and 'not a regular file' in fifo.stderr and 'Traceback' not in fifo.stderr


@pytest.mark.parametrize('stage,message', [('dit', 'the denoiser (PGS output) produced NaN/inf'),
                                           ('grm', 'the GRM produced NaN/inf')])
def test_nan_weights_write_nothing_and_name_the_stage(trained, tmp_path, stage, message):
    """Before: an all-black PNG, '1 image(s) written', exit 0."""
    opt_path, run = trained
    with open(opt_path) as f:
        opt = yaml.safe_load(f)
    ckpt = torch.load(opt['path'][f'pretrain_network_{stage}'], weights_only=True)
    for key in ('params', 'params_ema'):
        first = next(k for k, v in ckpt[key].items() if v.is_floating_point() and v.numel() > 1)
        ckpt[key][first] = torch.full_like(ckpt[key][first], float('nan'))
    bad = tmp_path / f'net_{stage}_nan.pth'
    torch.save(ckpt, bad)
    opt['path'][f'pretrain_network_{stage}'] = str(bad)
    bad_opt = tmp_path / 'nan.yml'
    bad_opt.write_text(yaml.safe_dump(opt))
    write_png(tmp_path / 'in' / 'a.png', random_bgr(8, 8, seed=1))
    proc = _infer(['-i', str(tmp_path / 'in'), '-o', str(tmp_path / 'out'), '--opt', str(bad_opt)], tmp_path)
    assert proc.returncode == 1 and '0 image(s) written, 1 failed' in proc.stdout
    assert message in proc.stderr and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'out').exists() or os.listdir(str(tmp_path / 'out')) == []


def test_nan_input_pixels_are_told_apart_from_nan_weights(trained):
    from patchscaler.utils.errors import InputError
    opt_path, _ = trained
    with open(opt_path) as f:
        pipe = load_pipeline(yaml.safe_load(f), 'cpu')
    lq = _lq()
    lq[0, 1, 2, 3] = float('nan')
    with pytest.raises(InputError, match='input image holds 1 NaN/inf pixel'):
        pipe(lq)


def test_float_images_and_rgb_files_with_equal_channels(trained, tmp_path):
    """Float images in [0, 1] are read as they are (a 16-bit PNG out); any other float image is refused with one
    line, never clipped; an RGB file whose channels happen to be equal stays RGB (the file's channel count)."""
    opt_path, _ = trained
    src = tmp_path / 'in'
    src.mkdir()
    gray_rgb = np.repeat(random_bgr(8, 8, seed=1)[..., :1], 3, 2)
    write_png(src / 'equal_channels.png', gray_rgb)
    unit = (random_bgr(8, 8, seed=2).astype(np.float32) / 255)
    assert cv2.imwrite(str(src / 'unit_float.tiff'), unit)
    assert cv2.imwrite(str(src / 'float255.tiff'), unit * 255)
    proc = _infer(['-i', str(src), '-o', str(tmp_path / 'out'), '--opt', opt_path], tmp_path)
    assert proc.returncode == 1 and '2 image(s) written, 1 failed' in proc.stdout
    assert 'float255.tiff: a float image with values in [' in proc.stderr and 'read as [0, 1]' in proc.stderr
    equal = cv2.imread(str(tmp_path / 'out' / 'equal_channels.png'), cv2.IMREAD_UNCHANGED)
    assert equal.shape == (32, 32, 3)
    deep = cv2.imread(str(tmp_path / 'out' / 'unit_float.png'), cv2.IMREAD_UNCHANGED)
    assert deep.shape == (32, 32, 3) and deep.dtype == np.uint16


def test_an_output_path_that_is_a_file_is_refused_before_any_work(trained, tmp_path):
    opt_path, _ = trained
    write_png(tmp_path / 'in' / 'a.png', random_bgr(8, 8, seed=1))
    (tmp_path / 'taken').write_text('a file')
    proc = _infer(['-i', str(tmp_path / 'in'), '-o', str(tmp_path / 'taken'), '--opt', opt_path], tmp_path)
    assert proc.returncode == 2 and 'taken is a file, not a folder' in proc.stderr
    assert 'Traceback' not in proc.stderr and 'image(s) written' not in proc.stdout


@pytest.mark.parametrize('flag, expected', [(['--seed', str(2 ** 70)], '--seed must be in [0, 2^63)'),
                                            (['--grm-tile', '0'], '--grm-tile must be a positive size')])
def test_bad_flags_are_one_line_before_any_work(tmp_path, flag, expected):
    proc = _infer(['-i', str(tmp_path), '-o', str(tmp_path / 'o'), '--opt', 'x.yml', *flag], tmp_path)
    assert proc.returncode == 2 and expected in proc.stderr and 'Traceback' not in proc.stderr


def test_ctrl_c_keeps_what_was_written_and_prints_the_summary(trained, tmp_path, monkeypatch):
    from patchscaler import inference
    opt_path, _ = trained
    for i in range(3):
        write_png(tmp_path / 'in' / f'{i}.png', random_bgr(8, 8, seed=i))
    with open(opt_path) as f:
        pipe = load_pipeline(yaml.safe_load(f), 'cpu')
    real, calls = inference._upscale_file, []

    def interrupt_second(*args):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(inference, '_upscale_file', interrupt_second)
    summary = inference.infer_paths(pipe, [str(tmp_path / 'in')], str(tmp_path / 'out'), progress=False)
    assert summary.written == [str(tmp_path / 'out' / '0') + '.png'] and summary.interrupted == 2
    assert 'interrupted (Ctrl-C): 2 image(s) not processed' in summary.lines()[-1]
    assert os.listdir(str(tmp_path / 'out')) == ['0.png']


def test_tilde_in_weight_paths_is_expanded_as_test_py_does(trained, tmp_path, monkeypatch):
    opt_path, _ = trained
    with open(opt_path) as f:
        opt = yaml.safe_load(f)
    monkeypatch.setenv('HOME', str(tmp_path.parent))
    for n in ('grm', 'dit', 'texture'):
        opt['path'][f'pretrain_network_{n}'] = opt['path'][f'pretrain_network_{n}'].replace(str(tmp_path.parent), '~')
    assert opt['path']['pretrain_network_grm'].startswith('~/')
    assert load_pipeline(opt, 'cpu').grm is not None


def test_small_tiles_get_a_fitting_overlap_and_grm_tile_names_its_bound(trained, tmp_path):
    """--tile 8..64 failed on the default 64 px overlap the CLI could not set; the overlap now defaults to a
    quarter of a small tile (--tile-overlap sets it); grm_tile 8 named '>= 8' where the bound was 17."""
    opt_path, _ = trained
    with open(opt_path) as f:
        opt = yaml.safe_load(f)
    pipe = load_pipeline(dict(opt, tile=16), 'cpu')
    d = pipe.autoencoder.downscale_factor
    assert pipe.tile == 16 and pipe.tile_overlap == 16 // 4 // d * d
    assert load_pipeline(dict(opt, tile=512), 'cpu').tile_overlap == 64
    assert pipe(_lq(size=12)).sr.shape[-2:] == (48, 48)
    with pytest.raises(ConfigError, match=r'grm_tile must be at least 17 latent px .*got 8'):
        load_pipeline(dict(opt, grm_tile=8), 'cpu')
    write_png(tmp_path / 'in' / 'a.png', random_bgr(12, 12, seed=1))
    proc = _infer(['-i', str(tmp_path / 'in'), '-o', str(tmp_path / 'out'), '--opt', opt_path, '--tile', '16',
                   '--tile-overlap', '4'], tmp_path)
    assert proc.returncode == 0, proc.stderr

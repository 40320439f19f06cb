"""Prepare the paper's test sets from local copies (nothing is downloaded: get each dataset from its authors).

    python datasets/prepare_test_sets.py lsdir   --hr <LSDIR val HR> [<LSDIR test HR>] [--num 2000 --seed 0]
    python datasets/prepare_test_sets.py realsr  --root "<RealSR(V3)>" [--cameras Canon Nikon] [--scale 4]
    python datasets/prepare_test_sets.py drealsr --root <DRealSR>/x4      (holds test_HR/ + test_LR/, or Test_x4/)
    python datasets/prepare_test_sets.py realset --lr <folder of real LR photos>
    (every subcommand: [--out FOLDER] [--lmdb] [--overwrite])

Each set is written as ``<out>/HR`` and ``<out>/LR`` (PNG, equal file names; no HR for ``realset``; RealSR
has one such folder per camera, ``datasets/RealSR/<Camera>``), ``<out>/meta_info.txt`` (one LR file name per
line) and, with ``--lmdb``, ``<out>/{HR,LR}.lmdb`` built by ``patchscaler.data.lmdb_builder``. Names are
``lmdb_key`` of the source name (the LMDB keys equal the file stems). Unreadable images are skipped and listed,
unpaired files listed, and the options in ``options/test_patchscaler_{lsdir,realsr,drealsr,realset110}.yml`` read
the default output folders.

LSDIR-Test (paper, section 4.1: "randomly selected 2000 test images from LSDIR ... following the degradation
method used in ResShift", LR fixed at 128x128). The source images are listed (recursively, sorted), shuffled
with ``random.Random(seed)`` and taken in that order until ``--num`` (default 2000) are written; an image
smaller than 512 px on a side is skipped with its size listed. HR: the centre 512x512 crop (choice: ResShift's
ImageNet script first resizes the short side, which at LSDIR's ~2K px would discard the texture under test).
LR (128x128): ``--degradation resshift`` (default) is ResShift's ``configs/degradation_testing_realesrgan.yaml``
(used by its ``scripts/prepare_testing_imagenet.py``), run by the project's own Real-ESRGAN pieces
(``RealESRGANKernels`` draws the kernels, ``RealESRGANDegradation`` applies them), on the CPU in float32:

    1. blur: sinc with p 0.1 (omega_c ~ U[pi/3, pi], U[pi/5, pi] for sizes >= 13), else iso (p 0.6) or aniso
       (p 0.4) Gaussian, sigma ~ U[0.2, 0.8] per axis, angle ~ U[-pi, pi]; odd size ~ U{3..11}
    2. resize: up x U[1, 1.5] (p 0.2), down x U[0.5, 1] (p 0.7) or keep (p 0.1); area/bilinear/bicubic
    3. noise: Gaussian sigma ~ U[1, 15]/255 (p 0.5) or Poisson scale ~ U[0.05, 0.3]; gray noise with p 0.4
    4. JPEG, quality ~ U[70, 95]
    5. no second stage (ResShift: second_order_prob 0): resize to 128x128 only (area/bilinear/bicubic)
    6. in random order (p 0.5): [final sinc filter with p 0.2, omega_c ~ U[pi/3, pi], size ~ U{3, 5}] then JPEG quality
       ~ U[80, 99], or JPEG then the sinc filter; round to 8 bit
Where this differs from ResShift's script (the shared pieces cannot express it): the JPEG bound is 99 (DiffJPEG
divides by zero at 100);
in the JPEG-first order the last JPEG runs at 128x128 (ResShift: at the stage-one size). ``--degradation
realesrgan`` is instead the training degradation (Real-ESRGAN second order, the kernel and ``degradation``
options of ``options/train_patchscaler.yml``). Each image is degraded with Python, numpy and torch seeded by
``(seed + crc32(name)) mod 2**32``, so an image's LR depends only on its name and ``--seed``.

RealSR (V3): ``<root>/<Camera>/Test/<scale>/<Camera>_NNN_HR.png`` + ``_LR<scale>.png`` -> stem ``<Camera>_NNN``.
DRealSR: ``test_HR/`` + ``test_LR/``, paired by stem after removing ``_x1``, ``_x<scale>``, ``_HR``, ``_LR``,
``_LR<scale>``. Both are cut to the centre ``--lr-size`` (default 128, the paper's RealSR protocol; choice for
DRealSR, so both real paired sets are measured alike; 0 keeps whole images) LR crop and the HR region under it,
after the HR is cut to exactly scale x LR at its top-left corner (as ``PairedSRDataset`` does).
RealSet110: any LR folder (no HR), converted to 8-bit 3-channel PNG (EXIF orientation applied, alpha dropped).
"""
import argparse
import os
import os.path as osp
import random
import re
import shutil
import sys
import zlib

import numpy as np
from tqdm import tqdm

sys.path.insert(0, osp.abspath(osp.join(osp.dirname(__file__), osp.pardir)))

import patchscaler  # noqa: E402,F401  (before any basicsr import: applies the compat fixes)
from patchscaler.data.image_io import IMG_EXTENSIONS, is_image_name, lmdb_key, read_image, write_image  # noqa: E402
from patchscaler.data.lmdb_builder import build_lmdb  # noqa: E402
from patchscaler.utils.errors import DataError, PatchScalerError  # noqa: E402

SCALE = 4
HR_SIZE = 512  # LSDIR-Test: HR 512, LR 128
TRAIN_OPTIONS = osp.join(osp.dirname(osp.abspath(__file__)), osp.pardir, 'options', 'train_patchscaler.yml')
_GAUSSIANS = ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso']
#: ResShift's configs/degradation_testing_realesrgan.yaml, in RealESRGANKernels' option names.
RESSHIFT_KERNELS = dict(
    kernel_list=_GAUSSIANS, kernel_prob=[0.6, 0.4, 0, 0, 0, 0], sinc_prob=0.1, blur_sigma=[0.2, 0.8],
    betag_range=[1.0, 1.5], betap_range=[1, 1.2],
    kernel_list2=_GAUSSIANS, kernel_prob2=[0.6, 0.4, 0, 0, 0, 0], sinc_prob2=0.0, blur_sigma2=[0.2, 0.5],
    betag_range2=[0.5, 0.8], betap_range2=[1, 1.2], final_sinc_prob=0.2,
    # ResShift: blur_kernel_size 13 / blur_kernel_size2 7 -> sizes range(3, 13, 2) and range(3, 7, 2)
    kernel_range=[3, 11], kernel_range2=[3, 5], final_sinc_range=[3, 5])
#: ... and in RealESRGANDegradation's: stage two is switched off (no blur, a plain resize to LR size, zero noise).
RESSHIFT_DEGRADATION = dict(
    resize_prob=[0.2, 0.7, 0.1], resize_range=[0.5, 1.5], gaussian_noise_prob=0.5, noise_range=[1, 15],
    poisson_scale_range=[0.05, 0.3], gray_noise_prob=0.4, jpeg_range=[70, 95],
    second_blur_prob=0.0, resize_prob2=[0, 0, 1], gaussian_noise_prob2=1.0, noise_range2=[0, 0],
    gray_noise_prob2=0.0, jpeg_range2=[80, 99])
OUTPUTS = ('HR', 'LR', 'meta_info.txt', 'HR.lmdb', 'LR.lmdb')


# ----------------------------------------------------------------------------- files in, files out
def list_images(folder, what='image folder'):
    """Image files under ``folder`` (recursive, sorted); :class:`DataError` if it is missing or has none."""
    if not osp.isdir(folder):
        raise DataError(f'{what} not found: {folder}')
    files = sorted(osp.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                   if is_image_name(f) and osp.isfile(osp.join(d, f)))  # no FIFO (its read blocks), no temporary
    if not files:
        raise DataError(f'no images found in {folder} (extensions: {" ".join(IMG_EXTENSIONS)})')
    return files


def read_uint8(path):
    """8-bit BGR (H, W, 3) via ``read_image`` (any bit depth, gray, alpha, EXIF); DataError if unreadable."""
    return np.round(read_image(path) * 255.0).astype(np.uint8)


def _stem(path):
    return osp.splitext(osp.basename(path))[0]


def _rel_name(path, folder):
    """A file's name in a set: its path below ``folder``, '_'-joined, as an LMDB key (as ``build_lmdb`` names it)."""
    return lmdb_key(osp.relpath(path, folder).replace(os.sep, '_'))


def unique_names(names):
    """The same names with ``_2``, ``_3`` ... appended to repeats, in order."""
    seen, out = {}, []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f'{name}_{seen[name]}')
    return out


def prepare_target(target, sources, overwrite):
    """Empty HR/ and LR/ folders in ``target``; refuses to replace an earlier set without ``overwrite``."""
    present = [n for n in OUTPUTS if osp.exists(osp.join(target, n))]
    for src in sources:
        for name in present:
            out = osp.realpath(osp.join(target, name))
            if osp.realpath(src) == out or osp.realpath(src).startswith(out + os.sep):
                raise DataError(f'the source {src} lies inside the output {out}; choose another --out')
    if present and not overwrite:
        raise DataError(f'{target} already holds {", ".join(present)}; pass --overwrite to rebuild it')
    for name in present:
        path = osp.join(target, name)
        shutil.rmtree(path) if osp.isdir(path) else os.remove(path)
    for side in ('HR', 'LR'):
        os.makedirs(osp.join(target, side), exist_ok=True)


def finish(target, names, lmdb, has_hr=True):
    """meta_info.txt, the optional LMDBs, and an HR folder removed again for an LR-only set."""
    if not names:
        for side in ('HR', 'LR'):  # nothing was written: leave no half set that would need --overwrite
            shutil.rmtree(osp.join(target, side), ignore_errors=True)
        raise DataError(f'no images were written to {target} (see the skipped files above)')
    with open(osp.join(target, 'meta_info.txt'), 'w') as f:
        f.writelines(f'{n}.png\n' for n in sorted(names))
    if not has_hr:
        os.rmdir(osp.join(target, 'HR'))
    if lmdb:
        for side in ('HR', 'LR') if has_hr else ('LR',):
            build_lmdb(osp.join(target, side), osp.join(target, f'{side}.lmdb'))
    return len(names)


def write_png(target, side, name, img):
    write_image(osp.join(target, side, f'{name}.png'), img)  # any file name (cv2.imwrite crashes on non-UTF-8)


# ----------------------------------------------------------------------------- LSDIR-Test
def build_degradation(preset='resshift'):
    """(kernel sampler, degradation) of ``preset``: 'resshift' (the test config) or 'realesrgan' (training)."""
    from patchscaler.data.degradation import RealESRGANDegradation
    from patchscaler.data.realesrgan_hr_dataset import RealESRGANKernels
    if preset == 'resshift':
        return RealESRGANKernels(RESSHIFT_KERNELS), RealESRGANDegradation(RESSHIFT_DEGRADATION)
    import yaml
    with open(TRAIN_OPTIONS) as f:
        opt = yaml.safe_load(f)
    return RealESRGANKernels(opt['datasets']['train']), RealESRGANDegradation(opt.get('degradation') or {})


def image_seed(name, seed):
    return (seed + zlib.crc32(name.encode())) % 2 ** 32


def degrade(hr, seed, kernels, degradation, scale=SCALE):
    """One seeded draw of ``degradation`` on an 8-bit BGR HR image -> 8-bit BGR LR image (HR / scale)."""
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gt = torch.from_numpy(np.ascontiguousarray(hr[..., ::-1])).permute(2, 0, 1)[None].float() / 255.0
    lq, _ = degradation({'gt': gt, **{k: v[None] for k, v in kernels.sample().items()}}, scale, None)
    return np.ascontiguousarray((lq[0].permute(1, 2, 0).numpy()[..., ::-1] * 255.0).round().astype(np.uint8))


def center_crop(img, size):
    top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[top:top + size, left:left + size]


def prepare_lsdir(hr_folders, out='datasets/LSDIR-Test', num=2000, seed=0, preset='resshift', lmdb=False,
                  overwrite=False):
    """LSDIR-Test pairs (module docstring). Returns (number written, skipped messages)."""
    if num < 1:
        raise DataError(f'--num must be at least 1, got {num}')
    sources = []
    for folder in hr_folders:
        sources += [(_rel_name(p, folder), p) for p in list_images(folder, 'LSDIR HR folder')]
    sources = list(zip(unique_names([n for n, _ in sources]), [p for _, p in sources]))
    random.Random(seed).shuffle(sources)
    prepare_target(out, hr_folders, overwrite)
    kernels, degradation = build_degradation(preset)
    names, skipped = [], []
    with tqdm(total=min(num, len(sources)), desc='LSDIR-Test', unit='img') as bar:
        for name, path in sources:
            if len(names) == num:
                break
            try:
                img = read_uint8(path)
            except DataError as e:
                skipped.append(str(e))
                continue
            if min(img.shape[:2]) < HR_SIZE:
                skipped.append(f'{path}: {img.shape[1]}x{img.shape[0]} is smaller than {HR_SIZE}x{HR_SIZE}')
                continue
            hr = center_crop(img, HR_SIZE)
            write_png(out, 'HR', name, hr)
            write_png(out, 'LR', name, degrade(hr, image_seed(name, seed), kernels, degradation))
            names.append(name)
            bar.update()
    if len(names) < num:
        skipped.append(f'--num {num}: only {len(names)} usable image(s) in {", ".join(hr_folders)}')
    return finish(out, names, lmdb), skipped


# ----------------------------------------------------------------------------- paired real sets
def pair_by_key(hr_files, lr_files, key):
    """({key: (hr, lr)}, unpaired messages): files matched by ``key(path)``; repeats and loners are unpaired."""
    sides, unpaired = [{}, {}], []
    for side, files, label in ((0, hr_files, 'HR'), (1, lr_files, 'LR')):
        for path in files:
            k = key(path)
            if k in sides[side]:
                unpaired.append(f'{path}: a second {label} image for {k!r} (first: {sides[side][k]})')
            else:
                sides[side][k] = path
    hr, lr = sides
    unpaired += [f'{hr[k]}: HR without LR' for k in sorted(set(hr) - set(lr))]
    unpaired += [f'{lr[k]}: LR without HR' for k in sorted(set(lr) - set(hr))]
    return {k: (hr[k], lr[k]) for k in sorted(set(hr) & set(lr))}, unpaired


def crop_pair(hr, lr, scale, lr_size):
    """HR cut to scale x LR (top-left), then the centre ``lr_size`` LR crop and its HR; DataError if impossible."""
    h, w = lr.shape[:2]
    if hr.shape[0] < h * scale or hr.shape[1] < w * scale:
        raise DataError(f'HR {hr.shape[1]}x{hr.shape[0]} is smaller than {scale} x LR {w}x{h}' +
                        (' (an LR upsampled to HR size, as in RealSR V1/V2? use V3)' if hr.shape == lr.shape else ''))
    hr = hr[:h * scale, :w * scale]
    if not lr_size:
        return hr, lr
    if min(h, w) < lr_size:
        raise DataError(f'LR {w}x{h} is smaller than --lr-size {lr_size}')
    top, left = (h - lr_size) // 2, (w - lr_size) // 2
    lr = lr[top:top + lr_size, left:left + lr_size]
    return hr[top * scale:(top + lr_size) * scale, left * scale:(left + lr_size) * scale], lr


def _pair_dirs(pairs):
    return {osp.dirname(p) for pair in pairs.values() for p in pair}


def write_pairs(pairs, out, scale, lr_size, lmdb, desc):
    """Read, crop and write ``{name: (hr_path, lr_path)}`` to a prepared ``out``. Returns (written, skipped)."""
    names, skipped = [], []
    for name, (hr_path, lr_path) in tqdm(pairs.items(), desc=desc, unit='pair'):
        try:
            hr, lr = read_uint8(hr_path), read_uint8(lr_path)
        except DataError as e:
            skipped.append(f'{e} (pair {name!r} skipped)')
            continue
        try:
            hr, lr = crop_pair(hr, lr, scale, lr_size)
        except DataError as e:
            skipped.append(f'{lr_path}: {e}')
            continue
        write_png(out, 'HR', name, hr)
        write_png(out, 'LR', name, lr)
        names.append(name)
    return finish(out, names, lmdb), skipped


def prepare_realsr(root, cameras=('Canon', 'Nikon'), scale=SCALE, out='datasets/RealSR', lr_size=128, lmdb=False,
                   overwrite=False):
    """RealSR (V3) test pairs per camera. Returns ({camera: number written}, skipped, unpaired)."""
    if not osp.isdir(root):
        raise DataError(f'RealSR root not found: {root}')
    tail = re.compile(rf'_(HR|LR{scale})$')
    found, unpaired = {}, []
    for camera in cameras:  # every camera's folder is checked before anything is written
        src = osp.join(root, camera, 'Test', str(scale))
        if not osp.isdir(src):
            raise DataError(f'{src} not found: expected the RealSR (V3) layout '
                            f'<root>/<Camera>/Test/<scale>/<Camera>_NNN_HR.png and _LR{scale}.png')
        files = list_images(src, 'RealSR folder')
        hr = [p for p in files if _stem(p).endswith('_HR')]
        lr = [p for p in files if _stem(p).endswith(f'_LR{scale}')]
        unpaired += [f'{p}: neither _HR nor _LR{scale}' for p in sorted(set(files) - set(hr) - set(lr))]
        found[camera], lone = pair_by_key(hr, lr, lambda p: lmdb_key(tail.sub('', _stem(p))))
        unpaired += lone
        if not found[camera]:
            raise DataError(f'no <name>_HR / <name>_LR{scale} pairs in {src}')
    for camera, pairs in found.items():  # refuse before writing anything
        prepare_target(osp.join(out, camera), _pair_dirs(pairs), overwrite)
    written, skipped = {}, []
    for camera, pairs in found.items():
        written[camera], bad = write_pairs(pairs, osp.join(out, camera), scale, lr_size, lmdb, f'RealSR {camera}')
        skipped += bad
    return written, skipped, unpaired


def find_drealsr_folders(root, scale=SCALE):
    """(test_HR, test_LR) under ``root`` or ``root/Test_x<scale>``."""
    for base in (root, osp.join(root, f'Test_x{scale}')):
        hr, lr = osp.join(base, 'test_HR'), osp.join(base, 'test_LR')
        if osp.isdir(hr) and osp.isdir(lr):
            return hr, lr
    if not osp.isdir(root):
        raise DataError(f'DRealSR folder not found: {root}')
    raise DataError(f'no test_HR/ and test_LR/ folders in {root} or {osp.join(root, f"Test_x{scale}")} '
                    f'(point --root at the x{scale} test set of DRealSR)')


def prepare_drealsr(root, scale=SCALE, out='datasets/DRealSR', lr_size=128, lmdb=False, overwrite=False):
    """DRealSR test pairs. Returns (number written, skipped, unpaired)."""
    hr_dir, lr_dir = find_drealsr_folders(root, scale)
    tail = re.compile(rf'_(x1|x{scale}|HR|LR{scale}|LR)$', re.IGNORECASE)
    pairs, unpaired = pair_by_key(list_images(hr_dir, 'DRealSR test_HR'), list_images(lr_dir, 'DRealSR test_LR'),
                                  lambda p: lmdb_key(tail.sub('', _stem(p))))
    if not pairs:
        raise DataError(f'no HR/LR pairs in {hr_dir} and {lr_dir}: names must match after removing '
                        f'_x1/_x{scale}/_HR/_LR/_LR{scale}')
    prepare_target(out, _pair_dirs(pairs), overwrite)
    n, skipped = write_pairs(pairs, out, scale, lr_size, lmdb, 'DRealSR')
    return n, skipped, unpaired


# ----------------------------------------------------------------------------- LR-only real photos
def prepare_realset(lr_folder, out='datasets/RealSet110', lmdb=False, overwrite=False):
    """An LR-only folder as 8-bit PNGs. Returns (number written, skipped messages)."""
    files = list_images(lr_folder, 'LR folder')
    names = unique_names([_rel_name(p, lr_folder) for p in files])
    prepare_target(out, [lr_folder], overwrite)
    written, skipped = [], []
    for name, path in tqdm(list(zip(names, files)), desc='RealSet', unit='img'):
        try:
            write_png(out, 'LR', name, read_uint8(path))
        except DataError as e:
            skipped.append(str(e))
            continue
        written.append(name)
    return finish(out, written, lmdb, has_hr=False), skipped


# ----------------------------------------------------------------------------- CLI
def _report(skipped=(), unpaired=()):
    for line in unpaired:
        print(f'unpaired: {line}')
    for line in skipped:
        print(f'skipped: {line}')


def run(args):
    """Run one parsed subcommand; prints a summary and the skipped / unpaired files."""
    common = dict(lmdb=args.lmdb, overwrite=args.overwrite)
    if args.command == 'lsdir':
        n, skipped = prepare_lsdir(args.hr, args.out, args.num, args.seed, args.degradation, **common)
        _report(skipped)
    elif args.command == 'realsr':
        written, skipped, unpaired = prepare_realsr(args.root, args.cameras, args.scale, args.out, args.lr_size,
                                                    **common)
        _report(skipped, unpaired)
        n = ', '.join(f'{c}: {k}' for c, k in written.items())
    elif args.command == 'drealsr':
        n, skipped, unpaired = prepare_drealsr(args.root, args.scale, args.out, args.lr_size, **common)
        _report(skipped, unpaired)
    else:
        n, skipped = prepare_realset(args.lr, args.out, **common)
        _report(skipped)
    print(f'{args.command}: wrote {n} image(s) to {args.out}')


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    cmds = {
        'lsdir': sub.add_parser('lsdir', help='LSDIR-Test: synthetic 512/128 pairs from LSDIR val/test HR images'),
        'realsr': sub.add_parser('realsr', help='RealSR (V3) Canon/Nikon test pairs'),
        'drealsr': sub.add_parser('drealsr', help='DRealSR test pairs'),
        'realset': sub.add_parser('realset', help='an LR-only folder of real photos (RealSet110-style)'),
    }
    cmds['lsdir'].add_argument('--hr', nargs='+', required=True, help='LSDIR HR folder(s), searched recursively')
    cmds['lsdir'].add_argument('--num', type=int, default=2000, help='images to take (paper: 2000)')
    cmds['lsdir'].add_argument('--seed', type=int, default=0, help='selection and degradation seed')
    cmds['lsdir'].add_argument('--degradation', choices=['resshift', 'realesrgan'], default='resshift',
                               help="ResShift's test degradation (paper) or the training one (script -h)")
    cmds['realsr'].add_argument('--root', required=True, help='the RealSR(V3) folder (holds Canon/ and Nikon/)')
    cmds['realsr'].add_argument('--cameras', nargs='+', default=['Canon', 'Nikon'])
    cmds['drealsr'].add_argument('--root', required=True, help='the x4 test folder (test_HR/ + test_LR/)')
    cmds['realset'].add_argument('--lr', required=True, help='folder of LR photos (searched recursively)')
    for name in ('realsr', 'drealsr'):
        cmds[name].add_argument('--scale', type=int, default=SCALE)
        cmds[name].add_argument('--lr-size', type=int, default=128,
                                help='centre LR crop (paper: 128 for RealSR); 0 keeps whole images')
    defaults = {'lsdir': 'LSDIR-Test', 'realsr': 'RealSR', 'drealsr': 'DRealSR', 'realset': 'RealSet110'}
    for name, cmd in cmds.items():
        cmd.add_argument('--out', default=f'datasets/{defaults[name]}')
        cmd.add_argument('--lmdb', action='store_true', help='also build BasicSR LMDBs (HR.lmdb, LR.lmdb)')
        cmd.add_argument('--overwrite', action='store_true', help='replace a set prepared before')
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        run(args)
    except PatchScalerError as e:
        sys.exit(f'error: {e}')


if __name__ == '__main__':
    main()

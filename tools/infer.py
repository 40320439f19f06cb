"""Super-resolve your images with a trained PatchScaler.

    python tools/infer.py -i photo.jpg -o results/sr --opt options/test_patchscaler.yml
    python tools/infer.py -i datasets/demo/val_unseen/LR_x4 -o results/demo_infer \\
        --opt options/demo/test_patchscaler_demo.yml --save-qmap

Folders are read recursively (image files only); the SR images keep the subfolder layout. Grayscale, RGBA
(alpha upscaled separately) and 16-bit images come out in the same format. Files that fail are listed at
the end and the exit status is 1; option or checkpoint problems are one ``error:`` line and status 2; Ctrl-C
keeps what was written, prints the summary and exits with 130.

Many images on several GPUs (data-parallel; each file once, on rank r the files r, r + N, ... of the sorted list,
each rank on cuda:LOCAL_RANK, or the CPU without CUDA); rank 0 prints one summary of all ranks:

    torchrun --nproc_per_node 2 tools/infer.py -i FOLDER -o OUT --opt options/test_patchscaler.yml

One image on two GPUs (group-parallel PGS; the paper's split: the hard group alone on the first GPU):

    python tools/infer.py -i photo.jpg -o OUT --opt ... --devices cuda:0,cuda:1 --device-split paper
"""
import argparse
import os.path as osp
import sys

REPO = osp.abspath(osp.join(osp.dirname(__file__), osp.pardir))
sys.path.insert(0, REPO)

from patchscaler.inference import InferSummary, run  # noqa: E402  (imports the fixes)
from patchscaler.sampling.pgs import DEVICE_SPLITS  # noqa: E402
from patchscaler.utils.cli import load_option_file, one_line  # noqa: E402
from patchscaler.utils.device import enable_tf32  # noqa: E402
from patchscaler.utils.distributed import all_gather, rank_device, torchrun_rank  # noqa: E402
from patchscaler.utils.errors import ConfigError, PatchScalerError  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('-i', '--input', nargs='+', required=True, help='image files and/or folders')
    p.add_argument('-o', '--output', required=True, help='output folder')
    p.add_argument('-opt', '--opt', required=True,
                   help='test option file (networks, autoencoder, sampler, rtm, weights)')
    p.add_argument('--ckpt', default=None, help='a training run (experiments/NAME or its models/ folder): its '
                   'net_grm / net_dit / net_texture latest files replace the option file\'s pretrain paths')
    p.add_argument('--device', default=None, help='cpu, cuda, cuda:1 (default: cuda when available)')
    p.add_argument('--save-qmap', action='store_true', help='also write <name>_qmap.png (PGS groups) and '
                   '<name>_confidence.png')
    p.add_argument('--no-color-fix', action='store_true', help='skip the wavelet color fix against the LR')
    p.add_argument('--tile', type=int, default=None, help='autoencoder tile size in HR pixels (bounds memory)')
    p.add_argument('--tile-overlap', type=int, default=None, help='overlap of those tiles in HR pixels (default: '
                   '64, or a quarter of a tile below 256)')
    p.add_argument('--suffix', default='', help='appended to output names')
    p.add_argument('--seed', type=int, default=0, help='seed of the PGS start noise')
    p.add_argument('--devices', default=None, help='PGS group-parallel sampling on several devices, e.g. '
                   'cuda:0,cuda:1 (the paper: hard group on one GPU, the others on a second); encode, GRM, '
                   'retrieval and decode stay on --device. Same result as one device')
    p.add_argument('--device-split', choices=DEVICE_SPLITS, default=None, help='how --devices share the PGS '
                   'groups (replaces the sampler\'s device_groups / device_split): ' +
                   '; '.join(f'{k}: {v}' for k, v in DEVICE_SPLITS.items()).replace('%', '%%'))
    p.add_argument('--grm-tile', type=int, default=None, help='run the GRM on overlapping latent tiles of this '
                   'size (large images: bounds its memory)')
    p.add_argument('--compile', action='store_true', help='torch.compile the GRM and the denoiser (GPU; the '
                   'first image of each size compiles)')
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    if not 0 <= args.seed < 2 ** 63:
        p.error(f'--seed must be in [0, 2^63), got {args.seed}')
    if args.grm_tile is not None and args.grm_tile <= 0:
        p.error(f'--grm-tile must be a positive size in latent pixels, got {args.grm_tile} (leave it out: no tiles)')
    enable_tf32()  # CUDA float32 matmuls in TF32 (patchscaler.utils.device)
    dist = torchrun_rank()  # (rank, world, local rank) under torchrun, else None
    try:
        opt = load_option_file(args.opt)
        if args.compile:
            opt['compile'] = True
        if args.grm_tile is not None:
            opt['grm_tile'] = args.grm_tile
        if args.tile_overlap is not None:
            opt['tile_overlap'] = args.tile_overlap
        devices = [d.strip() for d in args.devices.split(',') if d.strip()] if args.devices else None
        device = args.device
        if dist:
            if devices or opt.get('pgs_devices'):
                raise ConfigError('under torchrun each rank runs its images on its own device: --devices / '
                                  'pgs_devices (one image over several devices) are for a single process')
            device = rank_device(args.device, dist[2])
        summary = run(opt, args.input, args.output, device, args.ckpt, args.save_qmap,
                      False if args.no_color_fix else None, args.tile, args.suffix, args.seed,
                      not args.no_progress and (not dist or dist[0] == 0), devices, args.device_split,
                      dist[:2] if dist else None)
    except PatchScalerError as e:
        print(f'error: {f"rank {dist[0]}: " if dist else ""}{one_line(e)}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before the first image (loading): nothing written
        print('interrupted (Ctrl-C) before any image was written', file=sys.stderr)
        sys.exit(130)
    if dist:
        summary = InferSummary.merge(all_gather(summary))
        if dist[0] != 0:
            return
    for line in summary.lines():
        print(line, file=sys.stderr if line.startswith('failed:') else sys.stdout)
    if summary.interrupted:
        sys.exit(130)
    if summary.failures:
        sys.exit(1)


if __name__ == '__main__':
    main()

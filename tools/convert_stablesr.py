"""Convert the published StableSR checkpoints for this project (offline; nothing downloads).

    python tools/convert_stablesr.py -i stablesr_000117.ckpt -o weights/stablesr \
        --text-encoder /path/to/stable-diffusion-2-1-base [--cfw vqgan_cfw_00011.ckpt]

writes weights/stablesr/{net_g.pth, unet/config.json, vae/, prompt_embeds.safetensors[, cfw.safetensors]}, which
options/stablesr/test_stablesr_x4.yml and test_stablesr_pgs_x4.yml read. The same for stablesr_turbo.ckpt
(-o weights/stablesr_turbo, options/stablesr/test_stablesr_turbo_x4.yml). Without -i, only the prompt embedding
is written (to train StableSR from SD-2.1's UNet: options/stablesr/train_stablesr_x4.yml). The library function is
patchscaler.archs.stablesr_convert.convert_stablesr_files; a file that does not match is one error naming the first
missing or unexpected key. A Lightning file that needs full unpickling is refused with the command that re-saves
its tensors (python -m patchscaler.utils.checkpoint --trust ...), for a file you trust.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('-i', '--input', help='stablesr_000117.ckpt or stablesr_turbo.ckpt (none: the prompt only)')
    p.add_argument('-o', '--output', required=True, help='output folder, e.g. weights/stablesr')
    p.add_argument('--cfw', help='vqgan_cfw_00011.ckpt: the CFW decoder (autoencoder CFWAutoencoderKL)')
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument('--text-encoder', help='a local SD-2.1(-base) folder (tokenizer/, text_encoder/): computes '
                                               'the published empty-prompt embedding')
    prompt.add_argument('--prompt-embedding', help='a safetensors file with prompt_embeds (1, 77, 1024)')
    prompt.add_argument('--zero-prompt', action='store_true',
                        help='zeros instead (not what StableSR was trained with: for tests only)')
    args = p.parse_args(argv)
    from patchscaler.archs.stablesr_convert import convert_stablesr_files, write_prompt
    from patchscaler.utils.errors import PatchScalerError
    if args.input is None and (args.cfw or not (args.text_encoder or args.prompt_embedding)):
        p.error('-i is required, except to write only the prompt embedding (--text-encoder or --prompt-embedding)')
    try:
        if args.input is None:
            paths = write_prompt(args.output, args.text_encoder, args.prompt_embedding)
        else:
            paths = convert_stablesr_files(args.input, args.output, args.cfw, args.text_encoder,
                                           args.prompt_embedding, args.zero_prompt)
    except PatchScalerError as e:
        sys.exit(f'error: {e}')
    for name, path in paths.items():
        print(f'{name:8s} {path}')


if __name__ == '__main__':
    main()

"""``python -m patchscaler.metrics [--weights-dir DIR]``: the weight files each learned metric needs, where each
comes from, and which are in the folder the metrics read (see :mod:`patchscaler.metrics.iqa`)."""
import argparse
import os.path as osp

from patchscaler.metrics.iqa import ENV_VAR, WEIGHT_FILES, missing_files, weights_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--weights-dir', help=f'default: ${ENV_VAR}, else weights/pyiqa')
    folder = weights_dir(p.parse_args(argv).weights_dir)
    print(f'metric weights folder: {osp.abspath(folder)}')
    ready = 0
    for name, files in WEIGHT_FILES.items():
        missing = {f for f, _ in missing_files(name, folder)}
        ready += not missing
        print(f'{name}: {"ready" if not missing else "unavailable"}')
        for f, url in files:
            print(f'  [{"missing" if f in missing else "ok"}] {f}   {url}')
    return 0 if ready == len(WEIGHT_FILES) else 1


if __name__ == '__main__':
    raise SystemExit(main())

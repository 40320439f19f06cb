"""What ``tools/train.py`` and ``tools/test.py`` share: check the options, run BasicSR's pipeline, and turn
user-fixable problems into one ``error:`` line and exit status 2."""
import argparse
import os
import sys

import yaml

from .errors import PatchScalerError


def _option_file_from_argv(argv):
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt')
    args, _ = parser.parse_known_args(argv)
    return args.opt


def load_option_file(path):
    """Read a YAML option file with one-line errors (missing file, YAML syntax)."""
    from basicsr.utils.options import ordered_yaml

    from .errors import ConfigError
    if not path or not os.path.isfile(path):
        raise ConfigError(f'option file not found: {path}')
    try:
        with open(path) as f:
            return yaml.load(f, Loader=ordered_yaml()[0])
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' line {mark.line + 1}' if mark else ''
        raise ConfigError(f'{path}:{where} is not valid YAML ({getattr(e, "problem", e)})') from None


def one_line(error):
    """The message of a :class:`PatchScalerError` as one line. A DataLoader worker re-raises the error with
    the worker's traceback in the message, ending in ``patchscaler.utils.errors.DataError: <message>``."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[-1]
    return line.split('Error: ', 1)[-1] if line.startswith('patchscaler.') else line


def run_pipeline(kind, root_path):
    """Check the ``-opt`` file, then run BasicSR's ``train_pipeline`` (kind 'train') or ``test_pipeline``
    ('test') with outputs under ``root_path``."""
    from .options_check import check_options
    if kind == 'train':
        from basicsr.train import train_pipeline as pipeline
    else:
        from basicsr.test import test_pipeline as pipeline
    try:
        opt = load_option_file(_option_file_from_argv(sys.argv[1:]))
        check_options(opt)
        from patchscaler import compat
        from patchscaler.utils.device import enable_tf32
        compat.set_dist_params(opt.get('dist_params'))  # timeout of the process group BasicSR starts
        enable_tf32()
        pipeline(root_path)
    except PatchScalerError as e:
        print(f'error: {one_line(e)}', file=sys.stderr)
        sys.exit(2)

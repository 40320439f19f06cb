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
    """Read a YAML option file (:mod:`.option_yaml`: a key given twice is refused, ``4e-4`` is a float) with
    one-line errors: a missing file, YAML syntax, a file that is not text (``--opt`` and ``--ckpt`` swapped) or
    not a mapping (empty, a list, one string)."""
    from .errors import ConfigError
    from .option_yaml import load_yaml
    if not path:
        raise ConfigError('no option file given (-opt <file.yml>)')
    if not os.path.isfile(path):
        raise ConfigError(f'option file not found: {path}')
    try:
        with open(path, encoding='utf-8') as f:
            opt = load_yaml(f)
    except UnicodeDecodeError:
        raise ConfigError(f'{path} is not a text file (a checkpoint or an image?); -opt takes a YAML option file') \
            from None
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' line {mark.line + 1}' if mark else ''
        raise ConfigError(f'{path}:{where} is not valid YAML ({getattr(e, "problem", e)})') from None
    if not isinstance(opt, dict):
        what = 'empty' if opt is None else f'a {type(opt).__name__}, not a mapping of options'
        raise ConfigError(f'{path} is {what}; an option file is a YAML mapping (name:, model_type:, ...)')
    return opt


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
    if {'-h', '--help'} & set(sys.argv[1:]):
        pipeline(root_path)  # BasicSR's own argument parser prints the usage and exits
        return
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

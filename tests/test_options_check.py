"""check_options: one clear ConfigError for each kind of mistake in an option file; the CLI prints it as one line."""
import copy
import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest
import yaml
from conftest import ROOT, random_bgr, write_png

import patchscaler  # noqa: F401  (registration; conftest.py imports it before BasicSR)
from patchscaler.utils.errors import ConfigError
from patchscaler.utils.options_check import check_options


def _make_datasets(tmp_path):
    """Tiny train HR / val LR+HR folders; returns their paths."""
    train = tmp_path / 'data' / 'train_HR'
    val_lr, val_hr = tmp_path / 'data' / 'val' / 'LR_x4', tmp_path / 'data' / 'val' / 'HR'
    for i in range(2):
        write_png(str(train / f't{i}.png'), random_bgr(48, 48, seed=i))
        write_png(str(val_hr / f'v{i}.png'), random_bgr(32, 32, seed=10 + i))
        write_png(str(val_lr / f'v{i}.png'), random_bgr(8, 8, seed=10 + i))
    return train, val_lr, val_hr


@pytest.fixture
def good_opt(demo_opt, tmp_path):
    train, val_lr, val_hr = _make_datasets(tmp_path)
    opt = copy.deepcopy(demo_opt)
    opt['datasets']['train']['dataroot_gt'] = str(train)
    opt['datasets']['val']['dataroot_lq'] = str(val_lr)
    opt['datasets']['val']['dataroot_gt'] = str(val_hr)
    opt['datasets'].pop('val_unseen')  # one validation set is enough here
    return opt


def _config_error(opt):
    with pytest.raises(ConfigError) as info:
        check_options(opt)
    msg = str(info.value)
    assert '\n' not in msg  # one line
    return msg


def test_demo_options_pass(good_opt):
    assert check_options(good_opt) is None


def test_demo_options_pass_with_basicsr_loader(good_opt, tmp_path):
    from basicsr.utils.options import ordered_yaml
    from conftest import DEMO_YML
    with open(DEMO_YML) as f:
        opt = yaml.load(f, Loader=ordered_yaml()[0])
    for phase in ('train', 'val'):
        for key in ('dataroot_gt', 'dataroot_lq'):
            if key in opt['datasets'][phase]:
                opt['datasets'][phase][key] = good_opt['datasets'][phase][key]
    opt['datasets']['val_unseen'].update({k: opt['datasets']['val'][k] for k in ('dataroot_gt', 'dataroot_lq')})
    check_options(opt)


@pytest.mark.parametrize('section,bad,good', [
    (None, 'trian', 'train'),
    (None, 'autoencodr', 'autoencoder'),
    ('train', 'totl_iter', 'total_iter'),
    ('network_grm', 'num_feats', 'num_feat'),
    ('logger', 'print_frq', 'print_freq'),
    ('val', 'val_frequency', 'val_freq'),
    ('autoencoder', 'downscal', 'downscale'),
])
def test_misspelt_keys(good_opt, section, bad, good):
    target = good_opt if section is None else good_opt[section]
    target[bad] = target.pop(good)
    msg = _config_error(good_opt)
    where = bad if section is None else f'{section}.{bad}'
    assert f"'{where}'" in msg
    assert 'did you mean' in msg
    assert f"'{good}'" in msg


def test_misspelt_path_key(good_opt):
    good_opt['path']['resume_stat'] = None
    msg = _config_error(good_opt)
    assert "'path.resume_stat'" in msg and "did you mean 'resume_state'" in msg


def test_misspelt_dataset_key(good_opt):
    good_opt['datasets']['train']['crop_pad_sise'] = good_opt['datasets']['train'].pop('crop_pad_size')
    msg = _config_error(good_opt)
    assert "'datasets.train.crop_pad_sise'" in msg and "did you mean 'crop_pad_size'" in msg


def test_unknown_model_type(good_opt):
    good_opt['model_type'] = 'PatchScalerModle'
    msg = _config_error(good_opt)
    assert 'model_type' in msg and "'PatchScalerModle'" in msg
    assert "did you mean 'PatchScalerModel'" in msg


def test_unknown_network_type(good_opt):
    good_opt['network_grm']['type'] = 'GMR'
    msg = _config_error(good_opt)
    assert 'network_grm' in msg and "unknown type 'GMR'" in msg


def test_unknown_autoencoder_and_dataset_types(good_opt):
    opt = copy.deepcopy(good_opt)
    opt['autoencoder']['type'] = 'PixelUnshufleAutoencoder'
    msg = _config_error(opt)
    assert 'autoencoder' in msg and "did you mean 'PixelUnshuffleAutoencoder'" in msg
    good_opt['datasets']['val']['type'] = 'PairedSRDatset'
    msg = _config_error(good_opt)
    assert 'datasets.val' in msg and "did you mean 'PairedSRDataset'" in msg


@pytest.mark.parametrize('phase,key', [('train', 'dataroot_gt'), ('val', 'dataroot_lq'), ('val', 'dataroot_gt')])
def test_missing_dataset_path(good_opt, tmp_path, phase, key):
    missing = str(tmp_path / 'no' / 'such' / 'folder')
    good_opt['datasets'][phase][key] = missing
    msg = _config_error(good_opt)
    assert f'datasets.{phase}.{key}' in msg
    assert 'path does not exist' in msg and missing in msg


def test_missing_pretrained_network(good_opt, tmp_path):
    good_opt['path']['pretrain_network_grm'] = str(tmp_path / 'grm.pth')
    msg = _config_error(good_opt)
    assert 'path.pretrain_network_grm' in msg and 'grm.pth' in msg


@pytest.mark.parametrize('key', ['name', 'model_type', 'datasets', 'path'])
def test_missing_required_key(good_opt, key):
    del good_opt[key]
    msg = _config_error(good_opt)
    assert f"'{key}'" in msg


def test_not_a_mapping():
    with pytest.raises(ConfigError, match='mapping'):
        check_options(['not', 'a', 'dict'])


def test_required_network_argument_missing():
    from patchscaler.utils.options_check import check_signature

    class Needs:
        def __init__(self, a, b=1):
            pass

    with pytest.raises(ConfigError, match=r"missing required option\(s\) \['a'\]"):
        check_signature(Needs, {'b': 2}, 'network_x')
    check_signature(Needs, {'a': 0}, 'network_x')  # complete: no error


# ----------------------------------------------------------------------------- tools/train.py end to end
def _write_yml(path, opt):
    with open(path, 'w') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    return str(path)


@pytest.fixture(scope='module')
def cli_runs(tmp_path_factory):
    """Start the four bad runs of tools/train.py at once (each spends ~10 s importing), collect on demand."""
    from conftest import DEMO_YML
    tmp = tmp_path_factory.mktemp('cli')
    with open(DEMO_YML) as f:
        base = yaml.safe_load(f)
    train, val_lr, val_hr = _make_datasets(tmp)
    base['datasets']['train'].update(dataroot_gt=str(train), num_worker_per_gpu=0, batch_size_per_gpu=2)
    base['datasets']['val'].update(dataroot_lq=str(val_lr), dataroot_gt=str(val_hr))
    base['datasets'].pop('val_unseen')
    base['logger']['use_tb_logger'] = False
    base['num_gpu'] = 0
    name = f'pytest_cli_{uuid.uuid4().hex[:8]}'
    base['name'] = name

    wrong_key = copy.deepcopy(base)
    wrong_key['train']['totl_iter'] = wrong_key['train'].pop('total_iter')
    missing_path = copy.deepcopy(base)
    missing_path['datasets']['train']['dataroot_gt'] = str(tmp / 'missing_HR')
    vae = copy.deepcopy(base)
    vae['autoencoder'] = {'type': 'DiffusersAutoencoderKL', 'pretrained_path': str(tmp / 'no_vae')}
    vae['network_grm']['in_channels'] = 4
    cases = {
        'wrong_key': _write_yml(tmp / 'wrong_key.yml', wrong_key),
        'missing_path': _write_yml(tmp / 'missing_path.yml', missing_path),
        'no_file': str(tmp / 'does_not_exist.yml'),
        'missing_vae': _write_yml(tmp / 'missing_vae.yml', vae),
    }
    env = dict(os.environ, PYTHONWARNINGS='ignore', CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    procs = {}
    for case, path in cases.items():  # output to files: a full pipe must not stall a run we do not read yet
        with open(tmp / f'{case}.out', 'w') as out, open(tmp / f'{case}.err', 'w') as err:
            procs[case] = subprocess.Popen([sys.executable, 'tools/train.py', '-opt', path], cwd=ROOT, env=env,
                                           stdout=out, stderr=err, stdin=subprocess.DEVNULL)

    def get(case):
        rc = procs[case].wait(timeout=300)
        return rc, (tmp / f'{case}.out').read_text(), (tmp / f'{case}.err').read_text()

    yield get, tmp
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    for folder in ('experiments', 'tb_logger'):  # the model-build case gets as far as making its run folders
        shutil.rmtree(os.path.join(ROOT, folder, name), ignore_errors=True)


def _one_error_line(rc, err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err[-3000:]
    assert 'Traceback' not in err, err[-3000:]
    assert lines and lines[-1].startswith('error:'), err[-3000:]
    return lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize('case, expected', [
    ('wrong_key', lambda tmp: ["'train.totl_iter'", "did you mean 'total_iter'"]),
    ('missing_path', lambda tmp: ['datasets.train.dataroot_gt', str(tmp / 'missing_HR')]),
    ('no_file', lambda tmp: ['option file not found', str(tmp / 'does_not_exist.yml')]),
    ('missing_vae', lambda tmp: ['autoencoder weights not found', f"{tmp / 'no_vae'}/config.json"]),
])
def test_cli_one_error_line(cli_runs, case, expected):
    """tools/train.py on a bad option file: exit 2 and one 'error:' line naming the problem, no traceback."""
    get, tmp = cli_runs
    rc, _, err = get(case)
    line = _one_error_line(rc, err)
    for part in expected(tmp):
        assert part in line, line


@pytest.mark.parametrize('edit, expected', [
    (lambda o: o['val']['metrics']['psnr'].update(type='calculate_psnrr'),
     "val.metrics.psnr: unknown type 'calculate_psnrr'"),
    (lambda o: o.pop('network_grm'), "PatchScalerModel needs the option 'network_grm'"),
    (lambda o: o['train']['optim_grm'].update(type='SGD'), 'train.optim_grm.type must be one of'),
    (lambda o: o['train']['scheduler'].update(type='StepLR'), 'train.scheduler.type must be one of'),
    (lambda o: o['train']['confidence_opt'].update(etaa=0.1), "unknown option 'train.confidence_opt.etaa'"),
    (lambda o: o.update(num_gpu='two'), "num_gpu must be 'auto' or an integer"),
])
def test_mistakes_caught_before_training(good_opt, edit, expected):
    """Each of these used to surface only mid-run (first validation, model build) as a raw traceback."""
    edit(good_opt)
    assert expected in _config_error(good_opt)


def test_num_gpu_without_cuda(good_opt, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    good_opt['num_gpu'] = 1
    assert 'no CUDA device is available' in _config_error(good_opt)


def test_error_from_dataloader_worker_is_one_line(tmp_path):
    """torch re-raises a worker's exception with the worker traceback in its message; the CLI prints one line."""
    import torch

    from patchscaler.utils.cli import one_line
    from patchscaler.utils.errors import DataError

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise DataError(f'{tmp_path}/x.png: cannot decode image')

    with pytest.raises(DataError) as info:
        next(iter(torch.utils.data.DataLoader(Broken(), num_workers=1)))
    assert '\n' in str(info.value)  # what torch hands over
    assert one_line(info.value) == f'{tmp_path}/x.png: cannot decode image'
    assert one_line(DataError('plain message')) == 'plain message'


@pytest.mark.parametrize('text, expected', [
    ('name: a\nscale: 4\nscale: 2\n', "the key 'scale' is given twice in one mapping (lines 2 and 3)"),
    ('', 'is empty; an option file is a YAML mapping'),
    ('- a\n- b\n', 'is a list, not a mapping of options'),
    ('options/demo/train_patchscaler_demo.yml\n', 'is a str, not a mapping of options'),
])
def test_option_files_that_are_not_what_they_seem(tmp_path, text, expected):
    from patchscaler.utils.cli import load_option_file
    path = tmp_path / 'o.yml'
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_option_file(str(path))


def test_a_binary_file_as_option_file_and_floats_without_a_dot(tmp_path):
    """--opt and --ckpt swapped: one line; ``lr: 4e-4`` (no !!float) is a float, in BasicSR's own reader too."""
    import basicsr.utils.options

    from patchscaler.utils.cli import load_option_file
    binary = tmp_path / 'net.pth'
    binary.write_bytes(b'PK\x03\x04\x00\xff\xfe\x80 weights')
    with pytest.raises(ConfigError, match='is not a text file'):
        load_option_file(str(binary))
    path = tmp_path / 'o.yml'
    path.write_text('train:\n  lr: 4e-4\n  eta_min: -1E5\n  iters: 10\n  name: 1e\n')
    assert load_option_file(str(path))['train'] == {'lr': 4e-4, 'eta_min': -1e5, 'iters': 10, 'name': '1e'}
    loader = basicsr.utils.options.ordered_yaml()[0]  # what parse_options reads the file with (compat fix 10)
    with open(path) as f:
        assert yaml.load(f, Loader=loader)['train']['lr'] == 4e-4
    path.write_text('a: 1\na: 2\n')
    with open(path) as f, pytest.raises(ConfigError, match="'a' is given twice"):
        yaml.load(f, Loader=loader)


def test_train_help_prints_the_usage():
    proc = subprocess.run([sys.executable, 'tools/train.py', '--help'], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONWARNINGS='ignore'))
    assert proc.returncode == 0 and '-opt' in proc.stdout and 'not found' not in proc.stdout + proc.stderr


@pytest.mark.parametrize('edit, expected', [
    (lambda o: o.update(scale='four'), "scale must be a positive integer (2, 4, ...), got 'four'"),
    (lambda o: o.update(scale=0), 'scale must be a positive integer'),
    (lambda o: o.update(scale=-4), 'scale must be a positive integer'),
    (lambda o: o.update(scale=4.5), 'scale must be a positive integer'),
    (lambda o: o.update(scale=True), 'scale must be a positive integer'),
    (lambda o: o['datasets']['train'].update(batch_size_per_gpu=0), 'datasets.train.batch_size_per_gpu must be a '
                                                                    'positive integer, got 0'),
    (lambda o: o.update(color_fix='false'), "color_fix must be true/false"),
    (lambda o: o.update(manual_seed=2 ** 70), 'manual_seed must be an integer in [0, 2^32)'),
    (lambda o: o.update(sampler='options/samplers/no_such.yml'), 'sampler'),
])
def test_values_refused_up_front(good_opt, edit, expected):
    edit(good_opt)
    assert expected in _config_error(good_opt)


def test_merge_keys_may_be_overridden_and_keys_must_be_plain(tmp_path):
    from patchscaler.sampling import build_sampler
    from patchscaler.utils.cli import load_option_file
    path = tmp_path / 'o.yml'
    path.write_text('base: &b {lr: 1e-4, beta: 0.9}\ntrain: {<<: *b, lr: 2e-4}\n')
    assert dict(load_option_file(str(path))['train']) == {'lr': 2e-4, 'beta': 0.9}
    path.write_text('? [1, 2]\n: 3\n')
    with pytest.raises(ConfigError, match='a key must be a plain value'):
        load_option_file(str(path))
    sampler = tmp_path / 's.yml'  # sampler files are read the same way
    sampler.write_text('sampler:\n  type: PatchGroupSampler\n  temperature: 3e-1\n  seed: 0\n  seed: 1\n')
    with pytest.raises(ConfigError, match="'seed' is given twice"):
        build_sampler(str(sampler))
    sampler.write_text('sampler:\n  type: PatchGroupSampler\n  temperature: 3e-1\n')
    assert build_sampler(str(sampler)).temperature == 0.3

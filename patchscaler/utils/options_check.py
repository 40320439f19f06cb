"""Check an option file before a run starts, so a typo costs one clear line and not a crash mid-training.

BasicSR reads options with ``opt[key]`` / ``opt.get(key)`` wherever they are needed: a misspelt key is
silently ignored or fails deep inside a run. :func:`check_options` looks at the whole file up front:
unknown top-level and section keys (with a "did you mean"), unknown registry types, arguments a network's
constructor does not take, and dataset paths that do not exist.
"""
import difflib
import inspect
import os

from .errors import ConfigError

TOP_LEVEL_KEYS = {
    'name', 'model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'path', 'train', 'val', 'logger',
    'dist_params', 'find_unused_parameters', 'autoencoder', 'degradation', 'is_train', 'dist', 'rank',
    'world_size', 'auto_resume', 'root_path', 'sampler', 'rtm', 'color_fix', 'tile', 'tile_overlap', 'autocast',
    'autoencoder_autocast', 'channels_last', 'compile', 'pgs_devices', 'grm_tile', 'grm_tile_overlap'}
SECTION_KEYS = {
    'logger': {'print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb'},
    'val': {'val_freq', 'save_img', 'metrics', 'pbar', 'suffix', 'max_images'},
    'path': None,  # checked by prefix below
}
PATH_PREFIXES = ('pretrain_network_', 'param_key_', 'strict_load_')
OPTIMIZERS = {'Adam'}  # what BasicSR 1.4.2's BaseModel.get_optimizer builds
SCHEDULERS = {'MultiStepLR', 'MultiStepRestartLR', 'CosineAnnealingRestartLR'}  # BaseModel.setup_schedulers
PATH_KEYS = {'resume_state', 'ignore_resume_networks', 'experiments_root', 'models', 'training_states', 'log',
             'visualization', 'results_root'}


def _suggest(key, known):
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ''


def check_keys(where, given, known):
    for key in given:
        if key not in known:
            raise ConfigError(f"unknown option '{where}{key}'{_suggest(key, known)}")


def registry_get(registry, name, where):
    try:
        cls = registry.get(name)  # BasicSR's registries raise KeyError, mmengine's return None
    except KeyError:
        cls = None
    if cls is None:
        known = registry.module_dict if hasattr(registry, 'module_dict') else (
            list(registry.keys()) if hasattr(registry, 'keys') else [])
        raise ConfigError(f"{where}: unknown type '{name}'{_suggest(name, known)}")
    return cls


def build_from_registry(registry, opt, where):
    """Build ``registry[opt['type']](**rest)`` with one-line errors for unknown types and arguments."""
    if not isinstance(opt, dict) or 'type' not in opt:
        raise ConfigError(f"{where} must be a mapping with a 'type', got {opt!r}")
    kwargs = dict(opt)
    cls = registry_get(registry, kwargs.pop('type'), where)
    check_signature(cls, kwargs, where)
    return cls(**kwargs)


def check_signature(cls, kwargs, where):
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    known = {k for k in params if k != 'self'}
    check_keys(f'{where}.', kwargs, known)
    missing = [k for k, p in params.items()
               if k != 'self' and p.default is p.empty and p.kind == p.POSITIONAL_OR_KEYWORD and k not in kwargs]
    if missing:
        raise ConfigError(f'{where} ({cls.__name__}) is missing required option(s) {missing}')


def check_networks(opt):
    """Every ``network_*`` section: a mapping whose ``type`` is a registered arch taking exactly its keys."""
    from basicsr.archs import build_network  # noqa: F401  (fills ARCH_REGISTRY)
    from basicsr.utils.registry import ARCH_REGISTRY
    for key, net in opt.items():
        if key.startswith('network_'):
            if not isinstance(net, dict) or 'type' not in net:
                raise ConfigError(f"{key} must be a mapping with a 'type'")
            check_signature(registry_get(ARCH_REGISTRY, net['type'], key), {k: v for k, v in net.items()
                                                                                  if k != 'type'}, key)


def check_path(where, path):
    if path is None:
        return
    if isinstance(path, (list, tuple)):
        for p in path:
            check_path(where, p)
        return
    if not os.path.exists(os.path.expanduser(str(path))):
        raise ConfigError(f"{where}: path does not exist: {path}")


def _check_dataset(phase, ds):
    from basicsr.utils.registry import DATASET_REGISTRY
    where = f'datasets.{phase}'
    if not isinstance(ds, dict) or 'type' not in ds:
        raise ConfigError(f"{where} must be a mapping with a 'type'")
    cls = registry_get(DATASET_REGISTRY, ds['type'], where)
    known = getattr(cls, 'OPTION_KEYS', None)
    if known is not None:
        check_keys(f'{where}.', ds, known)
    for key in ('dataroot_gt', 'dataroot_lq', 'meta_info'):
        check_path(f'{where}.{key}', ds.get(key))


def _check_num_gpu(num_gpu):
    import torch
    if num_gpu != 'auto' and not isinstance(num_gpu, int):
        raise ConfigError(f"num_gpu must be 'auto' or an integer, got {num_gpu!r}")
    if isinstance(num_gpu, int) and num_gpu > 0 and not torch.cuda.is_available():
        raise ConfigError(f"num_gpu is {num_gpu} but no CUDA device is available; use num_gpu: auto (0 here)")


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_values(opt):
    """Values that BasicSR or the pipeline would only trip over mid-run (a crop size from ``scale: four``, a
    zero division from a batch of 0, the colour fix at the first validation)."""
    from .color_fix import color_fix_kind
    if 'scale' in opt and not _positive_int(opt['scale']):
        raise ConfigError(f"scale must be a positive integer (2, 4, ...), got {opt['scale']!r}")
    if 'color_fix' in opt:
        color_fix_kind(opt['color_fix'])  # 'false' (a string) is an error, not a fix that is still applied
    seed = opt.get('manual_seed')
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32):
        raise ConfigError(f'manual_seed must be an integer in [0, 2^32), got {seed!r}')
    for phase, ds in (opt.get('datasets') or {}).items():
        for key in ('batch_size_per_gpu', 'num_worker_per_gpu', 'dataset_enlarge_ratio'):
            value = ds.get(key) if isinstance(ds, dict) else None
            if value is None:
                continue
            ok = _positive_int(value) or (key == 'num_worker_per_gpu' and value == 0)
            if not ok:
                raise ConfigError(f'datasets.{phase}.{key} must be a positive integer'
                                  f'{" (or 0)" if key == "num_worker_per_gpu" else ""}, got {value!r}')


def _check_train_section(train):
    from basicsr.utils.registry import LOSS_REGISTRY
    for key, value in train.items():
        if not isinstance(value, dict):
            continue
        if key.startswith('optim_') and value.get('type') not in OPTIMIZERS:
            raise ConfigError(f"train.{key}.type must be one of {sorted(OPTIMIZERS)}, got {value.get('type')!r}")
        if key == 'scheduler' and value.get('type') not in SCHEDULERS:
            raise ConfigError(f"train.scheduler.type must be one of {sorted(SCHEDULERS)}, got {value.get('type')!r}")
        if key == 'scheduler' and value.get('type') == 'CosineAnnealingRestartLR':
            _check_cosine_periods(value, train.get('total_iter'))
        if key.endswith('_opt'):
            if 'type' not in value:
                raise ConfigError(f"train.{key} must have a 'type'")
            check_signature(registry_get(LOSS_REGISTRY, value['type'], f'train.{key}'),
                            {k: v for k, v in value.items() if k != 'type'}, f'train.{key}')


def _check_cosine_periods(scheduler, total_iter):
    """BasicSR's CosineAnnealingRestartLR has no learning rate past the sum of its periods (a TypeError at that
    iteration, e.g. after raising total_iter of a finished run): the periods must cover total_iter."""
    periods, weights = scheduler.get('periods'), scheduler.get('restart_weights', [1])
    if not isinstance(periods, list) or not periods or not all(
            isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0 for p in periods):
        raise ConfigError(f'train.scheduler.periods must be a list of positive numbers of iterations, got {periods!r}')
    if not isinstance(weights, list) or len(weights) != len(periods):
        raise ConfigError(f'train.scheduler.restart_weights must have one weight per period ({len(periods)}), got '
                          f'{weights!r}')
    if isinstance(total_iter, (int, float)) and sum(periods) < total_iter:
        raise ConfigError(f'train.scheduler.periods sum to {sum(periods)} but total_iter is {total_iter}: the learning '
                          f'rate is undefined after iteration {sum(periods)}; lengthen the periods (e.g. periods: '
                          f'[{total_iter:g}]) or add one (periods: {periods + [total_iter - sum(periods)]}, '
                          f'restart_weights: {weights + [weights[-1]]})')


def _check_metrics(metrics):
    from basicsr.utils.registry import METRIC_REGISTRY
    for name, metric in metrics.items():
        if not isinstance(metric, dict) or 'type' not in metric:
            raise ConfigError(f"val.metrics.{name} must be a mapping with a 'type'")
        registry_get(METRIC_REGISTRY, metric['type'], f'val.metrics.{name}')


def check_options(opt):
    """Raise :class:`ConfigError` (one line) for the first problem found in a parsed option dict."""
    from basicsr.archs import build_network  # noqa: F401  (fills ARCH_REGISTRY)
    from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY

    if not isinstance(opt, dict):
        raise ConfigError('an option file must be a YAML mapping')
    for key in ('name', 'model_type', 'datasets', 'path'):
        if key not in opt:
            raise ConfigError(f"option file is missing the required key '{key}'")
    for key in opt:
        if key not in TOP_LEVEL_KEYS and not key.startswith('network_'):
            raise ConfigError(f"unknown option '{key}'{_suggest(key, TOP_LEVEL_KEYS)}")
    model_cls = registry_get(MODEL_REGISTRY, opt['model_type'], 'model_type')
    for section, known in SECTION_KEYS.items():
        if opt.get(section) is not None and not isinstance(opt[section], dict):
            raise ConfigError(f"'{section}' must be a mapping")
        if known is not None and opt.get(section):
            check_keys(f'{section}.', opt[section], known)
    for key in opt['path'] or {}:
        if key not in PATH_KEYS and not key.startswith(PATH_PREFIXES):
            raise ConfigError(f"unknown option 'path.{key}'{_suggest(key, PATH_KEYS)}")
        if key.startswith('pretrain_network_') or key == 'resume_state':
            check_path(f'path.{key}', opt['path'][key])
    for key in getattr(model_cls, 'REQUIRED_OPTION_KEYS', ()):
        if key not in opt:
            raise ConfigError(f"{opt['model_type']} needs the option '{key}'")
    _check_num_gpu(opt.get('num_gpu', 'auto'))
    _check_values(opt)
    train_keys = getattr(model_cls, 'TRAIN_OPTION_KEYS', None)
    if train_keys is not None and opt.get('train'):
        check_keys('train.', opt['train'], train_keys)
    _check_train_section(opt.get('train') or {})
    _check_metrics((opt.get('val') or {}).get('metrics') or {})
    check_networks(opt)
    if isinstance(opt.get('autoencoder'), dict) and 'type' in opt['autoencoder']:
        ae = opt['autoencoder']
        check_signature(registry_get(ARCH_REGISTRY, ae['type'], 'autoencoder'),
                        {k: v for k, v in ae.items() if k != 'type'}, 'autoencoder')
    if opt.get('sampler'):
        from patchscaler.sampling import build_sampler
        if isinstance(opt['sampler'], str):
            check_path('sampler', opt['sampler'])
        build_sampler(opt['sampler'])
    if opt.get('rtm') is not None:
        rtm = opt['rtm']
        if not isinstance(rtm, dict) or 'type' not in rtm or 'path' not in rtm:
            raise ConfigError("rtm must be a mapping with 'type' and 'path' (a memory built by tools/build_rtm.py)")
        from patchscaler.registry import RETRIEVERS
        from patchscaler.retrieval.memory import RTM_OPTION_KEYS, rtm_path
        registry_get(RETRIEVERS, rtm['type'], 'rtm')
        check_keys('rtm.', rtm, {'type', *RTM_OPTION_KEYS})
        if not os.path.isfile(rtm_path(rtm['path'])):
            raise ConfigError(f"rtm.path {rtm['path']} does not exist; build it with tools/build_rtm.py (the demo: "
                              f"python tools/build_rtm.py -opt options/demo/build_rtm_demo.yml)")
    if not isinstance(opt['datasets'], dict) or not opt['datasets']:
        raise ConfigError("'datasets' must map phases (train, val, test_1, ...) to dataset options")
    for phase, ds in opt['datasets'].items():
        _check_dataset(phase, ds)

"""Every fix PatchScaler needs for BasicSR 1.4.2 on today's torch stack, in one place.

`import patchscaler` calls :func:`apply` before anything imports BasicSR. Nothing else in the code base
patches BasicSR. What breaks and why is listed in ``shared/notes/basicsr-1.4.2.md``; each fix below says
which row it answers.

1. ``basicsr.data.degradations`` imports ``torchvision.transforms.functional_tensor`` (removed from
   torchvision): an alias module pointing at ``torchvision.transforms.functional``.
2. ``distutils`` (Python >= 3.12 has none): a minimal ``distutils.version.LooseVersion`` shim.
3. Resume maps every tensor to CUDA: :func:`load_resume_state` maps to the training device (CPU when no
   GPU is used), loads with ``weights_only=True``, and looks for states under ``root_path`` (BasicSR
   writes there but looked relative to the working directory).
4. ``torch.load`` of networks: explicit ``weights_only=True`` and a one-line error for a checkpoint that
   would need arbitrary unpickling or is truncated.
5. Checkpoints are written in place, so a kill during the write leaves a truncated file that
   ``--auto_resume`` later picks: networks and training states are written to a temporary file and
   renamed (:func:`patchscaler.utils.checkpoint.atomic_save`).
6. ``--launcher pytorch`` uses the global RANK as a GPU index and NCCL always: ``LOCAL_RANK`` picks the
   GPU, and gloo is used when there is no CUDA. DDP on CPU gets ``device_ids=None``. More processes than
   GPUs with NCCL is one clear error (NCCL refuses two ranks on one GPU). The process group gets a timeout of
   ``dist_params.timeout_minutes`` (default 120) instead of NCCL's 10 minutes, which a long rank-0
   validation would exceed; BasicSR passed ``dist_params`` to the slurm launcher only. DataParallel (several
   GPUs, no launcher) with ``train.autocast`` is refused: its replicas run autocast without the dtype (fp16).
7. ``VGGFeatureExtractor`` (the perceptual loss) falls back to torchvision's download when
   ``experiments/pretrained_models/vgg19-dcbb9e9d.pth`` is absent: a :class:`MissingWeightsError` naming the
   file and where to put it instead (nothing is downloaded at run time).
8. ``model_ema`` updates tensor by tensor: one fused ``torch._foreach_lerp_`` (same formula).
9. ``resume_training`` loads each scheduler's whole state, its shape (periods, milestones, ...) included, so a
   resumed run ignores a schedule the option file changed (raising ``total_iter`` and the periods of a finished
   run and resuming gave a TypeError past the old periods' end): the state gives the position (iteration, base
   learning rates), the option file the schedule (:func:`_resume_training`; the change is logged).
10. ``parse_options`` reads the option file with PyYAML's YAML 1.1 rules (a duplicate key is last-wins, ``4e-4``
    a string): it reads it with :class:`patchscaler.utils.option_yaml.OptionLoader`, as the checks before it did.
11. ``swinir_arch`` calls ``torch.meshgrid`` without ``indexing``, and torch warns on every run that builds a Swin
    block (the GRM): that one warning is filtered; the default it relies on, 'ij', is what BasicSR means.
"""
import os
import sys
import types

_applied = False


def _alias_functional_tensor():
    import torchvision.transforms.functional as functional
    sys.modules.setdefault('torchvision.transforms.functional_tensor', functional)


class LooseVersion:
    """Enough of distutils' LooseVersion for BasicSR's torch/torchvision version comparisons."""

    def __init__(self, vstring):
        import re
        self.vstring = str(vstring)
        self.version = [int(p) if p.isdigit() else p for p in re.split(r'[.+\-]', self.vstring) if p]

    @staticmethod
    def _key(parts):
        # numbers compare as numbers (2.10 > 2.9), text after numbers ('+cu130') as text
        return [(0, p, '') if isinstance(p, int) else (1, 0, p) for p in parts]

    def __lt__(self, other):
        other = other if isinstance(other, LooseVersion) else LooseVersion(other)
        return self._key(self.version) < self._key(other.version)

    def __ge__(self, other):
        return not self < other


def _shim_distutils():
    try:
        from distutils.version import LooseVersion as _  # noqa: F401
    except ImportError:  # Python >= 3.12 without setuptools' shim
        distutils = types.ModuleType('distutils')
        version = types.ModuleType('distutils.version')
        version.LooseVersion = LooseVersion
        distutils.version = version
        sys.modules['distutils'] = distutils
        sys.modules['distutils.version'] = version


def training_device(opt):
    """The device BasicSR's BaseModel trains on for these options."""
    import torch
    if opt.get('num_gpu', 0) != 0 and torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def load_resume_state(opt):
    """BasicSR's ``load_resume_state`` with the state mapped to the training device, not always CUDA."""
    from os import path as osp

    from basicsr.utils import check_resume, scandir

    from patchscaler.utils.checkpoint import safe_torch_load

    resume_state_path = None
    if opt['auto_resume']:
        # BasicSR looks relative to the cwd while it writes under root_path; look where it writes
        state_path = osp.join(opt.get('root_path', '.'), 'experiments', opt['name'], 'training_states')
        if osp.isdir(state_path):
            states = [int(v.split('.state')[0]) for v in scandir(state_path, suffix='.state', recursive=False)
                      if v.split('.state')[0].isdigit()]
            if states:
                resume_state_path = osp.join(state_path, f'{max(states)}.state')
                opt['path']['resume_state'] = resume_state_path
    elif opt['path'].get('resume_state'):
        resume_state_path = opt['path']['resume_state']
    if resume_state_path is None:
        return None
    resume_state = safe_torch_load(resume_state_path, map_location=training_device(opt))
    check_resume(opt, resume_state['iter'])
    return resume_state


DIST_TIMEOUT_MINUTES = 120
_dist_params = {}


def set_dist_params(params):
    """The option file's ``dist_params`` for the launchers; ``tools/train.py`` and ``tools/test.py`` pass them
    before BasicSR starts the process group (BasicSR 1.4.2 passes them to the slurm launcher only)."""
    from patchscaler.utils.errors import ConfigError
    params = dict(params or {})
    unknown = set(params) - {'backend', 'port', 'timeout_minutes'}
    if unknown:
        raise ConfigError(f'dist_params takes backend, port and timeout_minutes, not {sorted(unknown)}')
    _dist_params.clear()
    _dist_params.update(params)


def _timeout(params):
    from datetime import timedelta

    from patchscaler.utils.errors import ConfigError
    minutes = params.pop('timeout_minutes', _dist_params.get('timeout_minutes', DIST_TIMEOUT_MINUTES))
    if not isinstance(minutes, (int, float)) or minutes <= 0:
        raise ConfigError(f'dist_params.timeout_minutes must be a positive number, got {minutes!r}')
    return timedelta(minutes=minutes)


def _init_dist(launcher, backend=None, **kwargs):
    """BasicSR's ``init_dist`` with the process group's timeout set (``dist_params.timeout_minutes``, default
    :data:`DIST_TIMEOUT_MINUTES`): only rank 0 validates while the others wait in the next collective, and
    NCCL's default of 10 minutes would end a run whose validation takes longer."""
    import functools

    import basicsr.utils.dist_util as dist_util
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if mp.get_start_method(allow_none=True) is None:  # as BasicSR's init_dist does
        mp.set_start_method('spawn')
    params = {k: v for k, v in _dist_params.items() if k != 'timeout_minutes'}
    params.update(kwargs)
    timeout = _timeout(params)
    backend = backend or params.pop('backend', None) or 'nccl'
    params.pop('backend', None)
    if launcher == 'pytorch':
        return _init_dist_pytorch(backend, timeout=timeout, **{k: v for k, v in params.items() if k != 'port'})
    original = dist.init_process_group
    dist.init_process_group = functools.partial(original, timeout=timeout)
    try:
        return dist_util.init_dist(launcher, backend, **params)
    finally:
        dist.init_process_group = original


def _init_dist_pytorch(backend='nccl', **kwargs):
    import torch
    import torch.distributed as dist

    from patchscaler.utils.errors import ConfigError
    if torch.cuda.is_available():
        local_rank = int(os.environ.get('LOCAL_RANK', os.environ.get('RANK', 0)))
        local_world = int(os.environ.get('LOCAL_WORLD_SIZE', os.environ.get('WORLD_SIZE', 1)))
        gpus = torch.cuda.device_count()
        if backend == 'nccl' and local_world > gpus:
            raise ConfigError(f'{local_world} processes on this machine but {gpus} GPU(s) visible: NCCL needs one GPU '
                              f'per process; use --nproc_per_node {gpus}, or CUDA_VISIBLE_DEVICES= to train on the '
                              f'CPU with gloo')
        torch.cuda.set_device(local_rank % gpus)
    else:
        backend = 'gloo'
    dist.init_process_group(backend=backend, **kwargs)


def _model_to_device(self, net):
    import torch
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    net = net.to(self.device)
    if self.opt['dist']:
        find_unused = self.opt.get('find_unused_parameters', False)
        device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
        net = DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=find_unused)
    elif self.opt['num_gpu'] > 1:
        from patchscaler.models.pipeline import autocast_dtype
        if self.opt.get('is_train') and autocast_dtype((self.opt.get('train') or {}).get('autocast'),
                                                       self.device) is not None:
            from patchscaler.utils.errors import ConfigError
            raise ConfigError(f"train.autocast with {self.opt['num_gpu']} GPUs in one process (DataParallel): torch's "
                              f"parallel_apply re-enters autocast without its dtype, so bf16 would train in fp16 with "
                              f"no loss scaler. Use torchrun --nproc_per_node {self.opt['num_gpu']} tools/train.py ... "
                              f"--launcher pytorch, or num_gpu: 1")
        net = DataParallel(net)
    return net


def _model_ema(self, decay=0.999):
    """BasicSR's EMA, ema = decay·ema + (1 - decay)·param, as one fused ``torch._foreach_lerp_`` over all tensors
    instead of two kernels per tensor (hundreds of launches per step on a GPU)."""
    import torch
    net = self.get_bare_model(self.net_g)
    params = dict(net.named_parameters())
    ema = [p.data for p in self.net_g_ema.parameters()]
    src = [params[k].data for k, _ in self.net_g_ema.named_parameters()]
    torch._foreach_lerp_(ema, src, 1 - decay)


def _save_network(self, net, net_label, current_iter, param_key='params'):
    from patchscaler.utils.checkpoint import atomic_save
    current_iter = 'latest' if current_iter == -1 else current_iter
    nets = net if isinstance(net, list) else [net]
    keys = param_key if isinstance(param_key, list) else [param_key]
    if len(nets) != len(keys):
        raise ValueError('save_network: the lengths of net and param_key differ')
    save_dict = {}
    for net_, key in zip(nets, keys):
        state = self.get_bare_model(net_).state_dict()
        save_dict[key] = {(k[7:] if k.startswith('module.') else k): v.detach().cpu() for k, v in state.items()}
    atomic_save(save_dict, os.path.join(self.opt['path']['models'], f'{net_label}_{current_iter}.pth'))


def _save_training_state(self, epoch, current_iter):
    from patchscaler.utils.checkpoint import atomic_save
    if current_iter == -1:
        return
    state = {'epoch': epoch, 'iter': current_iter,
             'optimizers': [o.state_dict() for o in self.optimizers],
             'schedulers': [s.state_dict() for s in self.schedulers]}
    atomic_save(state, os.path.join(self.opt['path']['training_states'], f'{current_iter}.state'))


def _wrap_load_network(original):
    def load_network(self, net, load_path, strict=True, param_key='params'):
        from patchscaler.utils.checkpoint import explain_load_errors
        with explain_load_errors(load_path):  # torch >= 2.6 (setup.cfg) loads with weights_only=True
            return original(self, net, load_path, strict, param_key)
    return load_network


def _guard_vgg_download():
    import basicsr.archs.vgg_arch as vgg_arch
    original = vgg_arch.VGGFeatureExtractor.__init__

    def __init__(self, *args, **kwargs):
        path = vgg_arch.VGG_PRETRAIN_PATH
        if not os.path.isfile(path):
            from patchscaler.utils.errors import MissingWeightsError
            raise MissingWeightsError(
                f'the perceptual loss needs VGG weights at {path} (torchvision\'s vgg19 ImageNet weights, '
                f'vgg19-dcbb9e9d.pth), relative to the working directory; put the file there, or drop '
                f'train.perceptual_opt (the demo baselines train without it). Nothing is downloaded.')
        original(self, *args, **kwargs)
    vgg_arch.VGGFeatureExtractor.__init__ = __init__


SCHEDULE_SHAPE = ('periods', 'restart_weights', 'cumulative_period', 'eta_min', 'milestones', 'gamma', 'restarts')


def _resume_training(original):
    def resume_training(self, resume_state):
        shapes = [{k: getattr(s, k) for k in SCHEDULE_SHAPE if hasattr(s, k)} for s in self.schedulers]
        original(self, resume_state)
        for scheduler, shape in zip(self.schedulers, shapes):
            changed = {k: v for k, v in shape.items() if getattr(scheduler, k) != v}
            if changed:
                from basicsr.utils import get_root_logger
                moves = ', '.join(f'{k} {getattr(scheduler, k)} -> {v}' for k, v in changed.items()
                                  if k != 'cumulative_period')
                get_root_logger().info(f'resume: {type(scheduler).__name__} follows the option file, not the saved '
                                       f'state: {moves}')
            for k, v in shape.items():
                setattr(scheduler, k, v)
    return resume_training


def _use_option_loader(options):
    original = options.ordered_yaml

    def ordered_yaml():
        from patchscaler.utils.option_yaml import OptionLoader
        return OptionLoader, original()[1]
    options.ordered_yaml = ordered_yaml


def apply():
    """Apply every fix once; safe to call again."""
    global _applied
    if _applied:
        return
    _alias_functional_tensor()
    _shim_distutils()

    import basicsr.train
    import basicsr.utils.dist_util as dist_util
    import basicsr.utils.options
    from basicsr.models.base_model import BaseModel
    from basicsr.utils.dist_util import master_only

    basicsr.train.load_resume_state = load_resume_state
    dist_util._init_dist_pytorch = _init_dist_pytorch
    basicsr.utils.options.init_dist = _init_dist  # parse_options calls it by this name
    BaseModel.model_to_device = _model_to_device
    BaseModel.model_ema = _model_ema
    BaseModel.save_network = master_only(_save_network)
    BaseModel.save_training_state = master_only(_save_training_state)
    BaseModel.load_network = _wrap_load_network(BaseModel.load_network)
    BaseModel.resume_training = _resume_training(BaseModel.resume_training)
    _use_option_loader(basicsr.utils.options)
    import warnings
    warnings.filterwarnings('ignore', message=r'torch\.meshgrid: in an upcoming release, it will be required to pass '
                            r'the indexing argument', category=UserWarning)
    _guard_vgg_download()
    _applied = True

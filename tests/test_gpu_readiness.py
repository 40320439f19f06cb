"""What would crash, give wrong results or run slow on a GPU (issue 19), each shown by its mechanism on a CPU:
tensors left on a device the code did not expect (``hostless``), CPU bf16/fp16 autocast, a one-process gloo group,
a thread with a fresh autocast state. ``gpu``-marked tests repeat the check where only CUDA can show it."""
import numpy as np
import pytest
import torch
from conftest import hostless

from patchscaler.sampling.patches import PatchGrid
from patchscaler.utils.visualize import confidence_to_bgr, group_legend, group_panel, qmap_overlay


def _grm_model(opt, tmp_path, num_gpu=0):
    """The tiny two-stage options as the GRM stage's (no Patch-DiT, a sampler for the Eq. 2 grades)."""
    from patchscaler.models.patchscaler_model import PatchScalerModel
    opt = {k: v for k, v in opt.items() if k not in ('network_dit', 'network_texture', 'rtm')}
    opt['train'] = dict(opt['train'], stage='grm')
    opt = dict(opt, is_train=True, dist=False, rank=0, world_size=1, num_gpu=num_gpu)
    opt['path'] = dict(opt['path'], models=str(tmp_path / 'models'), training_states=str(tmp_path / 'states'),
                       experiments_root=str(tmp_path), visualization=str(tmp_path / 'vis'))
    (tmp_path / 'models').mkdir(parents=True, exist_ok=True)
    return PatchScalerModel(opt)


# ---------------------------------------------------------------- pictures of device tensors
def test_pictures_take_tensors_left_on_the_device():
    """The GRM stage's validation with a sampler and save_img draws the Eq. 2 grades, which the sampler leaves
    where the confidence map is (the GPU): np.asarray on them is a TypeError there."""
    grid = PatchGrid.for_shape(16, 24, 8, 4)
    groups = hostless((torch.arange(grid.num_patches) % 3).view(1, -1))
    qmap = hostless(torch.rand(1, grid.num_patches))
    with pytest.raises(TypeError, match='cpu'):
        np.asarray(groups)  # the stand-in refuses like a CUDA tensor
    image = np.zeros((64, 96, 3), np.uint8)
    strip = qmap_overlay(image, qmap[0], groups[0], grid, ('simple', 'medium', 'hard'))
    assert strip.shape[1] >= 3 * 96
    plain = qmap_overlay(image, qmap[0].cpu(), groups[0].cpu(), grid, ('simple', 'medium', 'hard'))
    assert np.array_equal(strip, plain)
    assert group_panel(image, groups[0], grid).shape == image.shape
    assert group_legend(groups[0], ('simple', 'medium', 'hard')).startswith('simple')
    assert confidence_to_bgr(hostless(torch.rand(1, 16, 24))).shape == (16, 24, 3)


def test_grm_stage_validation_keeps_the_grades_on_the_host(tiny_patchscaler, tmp_path, monkeypatch):
    """PatchScalerModel.test() of a GRM-stage model with a sampler: the grades it keeps for the pictures and the
    detail scores are host tensors whatever device the sampler graded on."""
    from patchscaler.models.patchscaler_model import PatchScalerModel
    opt, _ = tiny_patchscaler
    model = _grm_model(opt, tmp_path)
    assert model.net_g is None and model.sampler is not None
    assign = model.sampler.assign
    monkeypatch.setattr(model.sampler, 'assign', lambda *a: tuple(
        hostless(x) if torch.is_tensor(x) else x for x in assign(*a)))
    model.feed_data({'lq': torch.rand(1, 3, 16, 16)})
    PatchScalerModel.test(model)
    groups, qmap, _, grid = model.pgs_groups
    assert type(groups) is torch.Tensor and type(qmap) is torch.Tensor
    qmap_overlay(np.zeros((64, 64, 3), np.uint8), qmap[0], groups[0], grid)


@pytest.mark.gpu
def test_grm_stage_validation_pictures_on_cuda(tiny_patchscaler, tmp_path):
    opt, _ = tiny_patchscaler
    model = _grm_model(opt, tmp_path, num_gpu=1)
    assert model.device.type == 'cuda'
    model.feed_data({'lq': torch.rand(1, 3, 16, 16)})
    model.test()
    groups, qmap, _, grid = model.pgs_groups
    qmap_overlay(np.zeros((64, 64, 3), np.uint8), qmap[0], groups[0], grid)


# ---------------------------------------------------------------- the process group
@pytest.fixture
def init_calls(monkeypatch):
    """Calls that would start a process group, recorded instead."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from patchscaler import compat
    calls, start_method = [], mp.get_start_method(allow_none=True)
    monkeypatch.setattr(dist, 'init_process_group', lambda **kw: calls.append(kw))
    monkeypatch.setenv('LOCAL_RANK', '1')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    yield calls
    compat.set_dist_params(None)
    mp.set_start_method(start_method, force=True)  # the launcher sets spawn, as BasicSR's does


def test_the_process_group_waits_as_long_as_the_option_says(init_calls):
    """Only rank 0 validates; the others wait in the next collective, and NCCL's default timeout (10 min) would
    end the run. tools/train.py hands the option file's dist_params to the launcher BasicSR calls."""
    from datetime import timedelta

    import basicsr.utils.options

    from patchscaler import compat
    from patchscaler.utils.errors import ConfigError
    basicsr.utils.options.init_dist('pytorch')  # what parse_options calls for --launcher pytorch
    assert init_calls[-1]['timeout'] == timedelta(minutes=compat.DIST_TIMEOUT_MINUTES)
    compat.set_dist_params({'timeout_minutes': 300})
    basicsr.utils.options.init_dist('pytorch')
    assert init_calls[-1]['timeout'] == timedelta(minutes=300)
    with pytest.raises(ConfigError, match='timeout_minutes'):
        compat.set_dist_params({'timeout': 300})


def test_slurm_gets_the_option_files_dist_params_and_the_timeout(init_calls, monkeypatch):
    """--launcher slurm: BasicSR passes dist_params (backend, port) itself; the timeout joins them."""
    from datetime import timedelta

    import basicsr.utils.dist_util as dist_util
    import basicsr.utils.options

    from patchscaler import compat
    seen = []
    monkeypatch.setattr(dist_util, '_init_dist_slurm', lambda backend, port=None: seen.append((backend, port)) or
                        dist_util.dist.init_process_group(backend=backend))
    compat.set_dist_params({'backend': 'gloo', 'port': 29500, 'timeout_minutes': 30})
    basicsr.utils.options.init_dist('slurm', backend='gloo', port=29500)
    assert seen == [('gloo', 29500)] and init_calls[-1] == {'backend': 'gloo', 'timeout': timedelta(minutes=30)}


def test_more_processes_than_gpus_with_nccl_is_one_clear_error(init_calls, monkeypatch):
    """Two torchrun processes on a 1-GPU machine: both would take cuda:0, which NCCL refuses deep inside."""
    import basicsr.utils.options

    from patchscaler.utils.errors import ConfigError
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: None)
    with pytest.raises(ConfigError, match='2 processes on this machine but 1 GPU'):
        basicsr.utils.options.init_dist('pytorch')
    assert not init_calls
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    basicsr.utils.options.init_dist('pytorch')
    assert init_calls[-1]['backend'] == 'nccl'


@pytest.fixture
def gloo_group():
    """A one-process gloo process group: DDP on the CPU, the way torchrun with one rank runs it."""
    import socket

    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_stablesr_freezes_the_unet_before_ddp_wraps_it(tmp_path, gloo_group):
    """train.freeze_unet under torchrun: DDP wrapped the whole network before the UNet was frozen and then waited
    for gradients the frozen UNet never produces (DDP's "finished reduction" error at iteration 2)."""
    from test_stablesr import _batch, _opt

    from patchscaler.models.stablesr_model import StableSRModel
    torch.manual_seed(0)
    opt = _opt('train_stablesr_demo.yml', tmp_path, True)
    opt['dist'], opt['train']['freeze_unet'] = True, True
    model = StableSRModel(opt)
    assert isinstance(model.net_g, torch.nn.parallel.DistributedDataParallel)
    for it in (1, 2, 3):
        model.feed_data(_batch(it))
        model.optimize_parameters(it)
    net = model.get_bare_model(model.net_g)
    spade = {id(p) for n, p in net.unet.named_parameters() if '.spade.' in n}
    assert model.freeze_unet and not any(p.requires_grad for p in net.unet.parameters() if id(p) not in spade)


# ---------------------------------------------------------------- retrieval in float32
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_retrieval_inside_autocast_is_the_float32_retrieval(dtype):
    """The pipeline queries the RTM inside its autocast (PGS's prepare_cond), training outside it: under CPU bf16
    the keys changed the top-4 set of about a tenth of the queries, and in fp16 a decoding key extractor ran past the
    autoencoder's fp32 fallback. Keys and search run in float32 with autocast off."""
    from patchscaler.retrieval import ReferenceTextureMemory
    g = torch.Generator().manual_seed(0)
    values = torch.randn(300, 4, 16, 16, generator=g) * torch.rand(300, 1, 1, 1, generator=g)
    rtm = ReferenceTextureMemory.build(values, {'type': 'LatentTextureDescriptor'}, 200, top_k=4)
    queries = torch.randn(961, 4, 16, 16, generator=g) * torch.rand(961, 1, 1, 1, generator=g)
    sims, idx = rtm.search(queries)
    low = queries.to(dtype)
    sims_low, idx_low = rtm.search(low)  # the float32 retrieval of the rounded patches
    seen = []
    extractor = rtm.texture_classifier

    def recording(x):
        seen.append((torch.is_autocast_enabled('cpu'), x.dtype))
        return extractor(x)
    rtm.texture_classifier = recording
    with torch.autocast('cpu', dtype=dtype):
        sims_ac, idx_ac = rtm.search(queries)
        priors, sims_q = rtm.query(queries)
        sims_low_ac, idx_low_ac = rtm.search(low)
    assert seen and all(s == (False, torch.float32) for s in seen)
    assert torch.equal(idx_ac, idx) and torch.equal(sims_ac, sims) and torch.equal(sims_q, sims)
    assert torch.equal(idx_low_ac, idx_low) and torch.equal(sims_low_ac, sims_low)
    assert priors.dtype == torch.float32


def test_dataparallel_with_autocast_is_refused():
    """One process on several GPUs wraps in DataParallel, whose parallel_apply re-enters autocast without a dtype:
    train.autocast bf16 would train in fp16 with no loss scaler."""
    from types import SimpleNamespace

    from patchscaler import compat
    from patchscaler.utils.errors import ConfigError
    model = SimpleNamespace(device=torch.device('cpu'), opt={'dist': False, 'num_gpu': 2, 'is_train': True,
                                                             'train': {'autocast': 'bf16'}})
    with pytest.raises(ConfigError, match='torchrun --nproc_per_node 2'):
        compat._model_to_device(model, torch.nn.Linear(2, 2))
    for fp32 in (None, 'none', 'auto'):  # auto is fp32 here (no bf16 on a CPU): nothing to refuse
        model.opt['train']['autocast'] = fp32
        assert isinstance(compat._model_to_device(model, torch.nn.Linear(2, 2)), torch.nn.DataParallel)


# ---------------------------------------------------------------- fast defaults
def test_autocast_auto_is_bf16_on_gpus_that_have_it_and_fp32_elsewhere(monkeypatch):
    """The paper-scale option files say autocast: auto (they said ~, so nothing ran in bf16 on any GPU)."""
    import yaml
    from conftest import ROOT

    from patchscaler.models.pipeline import autocast_dtype
    assert autocast_dtype('auto', 'cpu') is None
    seen = []
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d=None: seen.append(d) or (9, 0))  # H100
    assert autocast_dtype('auto', 'cuda:1') is torch.bfloat16 and seen == [torch.device('cuda:1')]
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d=None: (7, 0))  # V100: bf16 only emulated
    assert autocast_dtype('auto', 'cuda:0') is None
    import glob
    import os
    for path in glob.glob(os.path.join(ROOT, 'options', 'test_patchscaler*.yml')) + \
            [os.path.join(ROOT, 'options', 'train_patchscaler.yml')]:
        with open(path) as f:
            opt = yaml.safe_load(f)
        assert opt['autocast'] == 'auto', path
        assert not opt.get('autoencoder_autocast'), path  # the SD VAE in bf16 is not measured: it stays fp32
    assert opt['train']['autocast'] == 'auto'


def test_the_tools_enable_tf32(monkeypatch, tmp_path):
    """tools/train.py and tools/test.py (run_pipeline) turn TF32 on for CUDA float32 matmuls before they run."""
    import sys

    import basicsr.test

    import patchscaler.utils.options_check as options_check
    from patchscaler.utils import cli
    seen = {}
    monkeypatch.setattr(basicsr.test, 'test_pipeline', lambda root: seen.update(
        tf32=torch.backends.cuda.matmul.allow_tf32))
    monkeypatch.setattr(options_check, 'check_options', lambda o: None)
    opt = tmp_path / 'o.yml'
    opt.write_text('name: x\n')
    monkeypatch.setattr(sys, 'argv', ['test.py', '-opt', str(opt)])
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cli.run_pipeline('test', str(tmp_path))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert seen == {'tf32': True}


# ---------------------------------------------------------------- the GRM's Swin masks
def test_swin_masks_are_made_once_per_size_not_per_forward(monkeypatch):
    """BasicSR's Swin block rebuilt its shifted-window mask on the CPU (and copied it) at every forward at a latent
    size other than img_size: 2 x depth x blocks builds per GRM call. The same output with one build per size."""
    from basicsr.archs.swinir_arch import SwinTransformerBlock

    from patchscaler.archs.grm_arch import GRM, _MaskCachingSwinBlock
    builds = []
    original = SwinTransformerBlock.calculate_mask
    monkeypatch.setattr(SwinTransformerBlock, 'calculate_mask', lambda self, size: builds.append(size) or
                        original(self, size))
    monkeypatch.setattr(_MaskCachingSwinBlock, '_cache', __import__('collections').OrderedDict())
    torch.manual_seed(0)
    grm = GRM(in_channels=4, num_feat=16, num_blocks=2, depth=2, num_heads=2, window_size=4, img_size=8).eval()
    reference = [m for m in grm.modules() if isinstance(m, SwinTransformerBlock)]
    assert len(reference) == 4 and all(type(m) is _MaskCachingSwinBlock for m in reference)
    x = torch.randn(1, 4, 12, 20)
    builds.clear()
    with torch.no_grad():
        first = grm(x)
        n_first = len(builds)
        second = grm(x)
    assert n_first == 2 and len(builds) == 2  # one per shift (0, window/2), none for the second call
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for m in reference:  # what BasicSR's block computes
        m.__class__ = SwinTransformerBlock
    with torch.no_grad():
        plain = grm(x)
    assert len(builds) > 2
    for a, b in zip(first, plain):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- EMA and batches
def test_ema_is_one_fused_update_with_basicsrs_formula(monkeypatch):
    """BasicSR's model_ema ran mul_ + add_ per tensor (hundreds of kernel launches per step on a GPU); one
    torch._foreach_lerp_ computes the same ema = decay * ema + (1 - decay) * param."""
    import copy
    from types import SimpleNamespace

    from basicsr.models.base_model import BaseModel
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    expected = {k: 0.99 * e.detach() + 0.01 * dict(net.named_parameters())[k].detach()
                for k, e in ema.named_parameters()}
    calls = []
    fused = torch._foreach_lerp_
    monkeypatch.setattr(torch, '_foreach_lerp_', lambda *a: calls.append(len(a[0])) or fused(*a))
    model = SimpleNamespace(net_g=net, net_g_ema=ema, get_bare_model=lambda n: n)
    BaseModel.model_ema(model, 0.99)
    assert calls == [6]
    for k, p in ema.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], rtol=1e-6, atol=1e-7)


def test_paper_training_files_pin_their_batches():
    import yaml
    from conftest import ROOT
    for name in ('train_patchscaler.yml', 'stablesr/train_stablesr_x4.yml'):
        with open(f'{ROOT}/options/{name}') as f:
            assert yaml.safe_load(f)['datasets']['train']['pin_memory'] is True, name


# ---------------------------------------------------------------- CUDA: the same numbers, to a tolerance
@pytest.mark.gpu
def test_blend_qmap_and_pgs_on_cuda_match_the_cpu_to_a_tolerance():
    """index_add_ and cumsum accumulate in no fixed order on CUDA: bit-exact on the CPU, close on the GPU."""
    from patchscaler.sampling.pgs import PatchGroupSampler
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 40, 56, generator=g)
    conf = torch.rand(2, 1, 40, 56, generator=g)
    grid = PatchGrid.for_shape(40, 56, 16, 8)
    for dev in ('cpu', 'cuda'):
        patches = grid.patchify(x.to(dev))
        torch.testing.assert_close(grid.blend(patches).cpu(), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(grid.patch_mean(conf.cuda()).cpu(), grid.patch_mean(conf), atol=1e-6, rtol=0)
    sampler = PatchGroupSampler(grouping={'mode': 'share', 'shares': [0.4, 0.3, 0.3]})

    def denoiser(x_t, t, cond):
        return torch.tanh(x_t * 0.5 + t.float()[:, None, None, None] / 1000)
    outs = {dev: sampler.sample(denoiser, x.to(dev), conf.to(dev))[0].cpu() for dev in ('cpu', 'cuda')}
    torch.testing.assert_close(outs['cuda'], outs['cpu'], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_autocast_auto_on_this_gpu():
    from patchscaler.models.pipeline import autocast_dtype
    native = torch.cuda.get_device_capability(0)[0] >= 8
    assert autocast_dtype('auto', 'cuda:0') is (torch.bfloat16 if native else None)


@pytest.mark.gpu
def test_retrieval_on_cuda_under_bf16_and_tf32_is_the_cpu_retrieval():
    from patchscaler.retrieval import ReferenceTextureMemory
    from patchscaler.utils.device import enable_tf32
    g = torch.Generator().manual_seed(0)
    values = torch.randn(300, 4, 16, 16, generator=g) * torch.rand(300, 1, 1, 1, generator=g)
    rtm = ReferenceTextureMemory.build(values, {'type': 'LatentTextureDescriptor'}, 200, top_k=4)
    queries = torch.randn(961, 4, 16, 16, generator=g)
    sims, idx = rtm.search(queries)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    enable_tf32()
    try:
        cuda = rtm.to('cuda')
        with torch.autocast('cuda', dtype=torch.bfloat16):
            sims_c, idx_c = cuda.search(queries.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert (idx_c.cpu() == idx).all(1).float().mean() > 0.99  # float32 on both; summation order may differ
    torch.testing.assert_close(sims_c.cpu(), sims, atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_grm_and_per_step_pgs_on_cuda():
    """The Swin GRM (masks cached on the GPU) and step-synchronous PGS give the CPU's numbers on CUDA."""
    from patchscaler.archs.grm_arch import GRM
    from patchscaler.sampling.pgs import PatchGroupSampler
    torch.manual_seed(0)
    grm = GRM(in_channels=4, num_feat=16, num_blocks=2, depth=2, num_heads=2, window_size=4, img_size=8).eval()
    x = torch.randn(1, 4, 12, 20)
    with torch.no_grad():
        ref = grm(x)
        out = grm.cuda()(x.cuda())
        again = grm(x.cuda())
    for a, b, c in zip(ref, out, again):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)
        assert torch.equal(b, c)

    def denoiser(x_t, t, cond):
        return torch.tanh(x_t * 0.5 + t.float()[:, None, None, None] / 1000)
    y0, conf = torch.randn(1, 4, 40, 56), torch.rand(1, 1, 40, 56)
    share = {'mode': 'share', 'shares': [0.4, 0.3, 0.3]}
    runs = [PatchGroupSampler(grouping=share, batch_size=1024, execution=e).sample(denoiser, y0.cuda(), conf.cuda())
            for e in ('per_group', 'per_step')]
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-5, rtol=1e-5)
    assert runs[1][1].denoiser_calls == 20 < runs[0][1].denoiser_calls


def test_full_precision_nests_and_restores_tf32():
    """search() holds the float32 context around query_keys(), which takes it again: on CUDA that context also
    switches TF32 off under a lock, so it must be re-entrant (a plain lock would hang every CUDA retrieval)."""
    import threading

    from patchscaler.retrieval.memory import full_precision
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seen = []

    def nested():
        with full_precision('cuda'):
            with full_precision('cuda'):
                seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            seen.append(torch.backends.cuda.matmul.allow_tf32)
    try:
        worker = threading.Thread(target=nested, daemon=True)
        worker.start()
        worker.join(10)
        assert not worker.is_alive(), 'nested full_precision hung'
        assert seen == [(False, False), False]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored on leaving
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags

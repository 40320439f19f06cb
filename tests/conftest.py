"""Shared fixtures: small images written to tmp_path, the demo option file, a tiny AutoencoderKL config."""
import os

import numpy as np
import pytest
import torch

import patchscaler  # noqa: F401  (compat fixes before BasicSR)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
DEMO_YML = os.path.join(ROOT, 'options', 'demo', 'train_grm_demo.yml')


def write_png(path, array):
    """Write a uint8/uint16 array (H, W) or (H, W, 3 BGR) with OpenCV; returns the path."""
    import cv2
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), array), path
    return str(path)


def random_bgr(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests are skipped on a machine without CUDA (``tools/gpu_check.sh`` runs them on one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs CUDA')
    for item in items:
        if item.get_closest_marker('gpu') is not None:
            item.add_marker(skip)


def hostless(tensor):
    """``tensor`` as a stand-in for a CUDA tensor on a CPU machine: NumPy conversion refuses the way it does for a
    CUDA tensor, ``.cpu()`` / ``.to('cpu')`` give a plain host tensor back. Code that works with it works with
    tensors left on the GPU."""
    return tensor.as_subclass(HostlessTensor)


class HostlessTensor(torch.Tensor):
    """See :func:`hostless`."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")

    def __array__(self, *args, **kwargs):
        return self.numpy()

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()

    def to(self, *args, **kwargs):
        target = kwargs.get('device', args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == 'cpu':
            return self.cpu().to(*args, **kwargs)
        return super().to(*args, **kwargs)


@pytest.fixture
def image_folder(tmp_path):
    """A folder of 3 random RGB PNGs (two at the top, one in a subfolder) plus a non-image file."""
    folder = tmp_path / 'imgs'
    write_png(str(folder / 'a.png'), random_bgr(40, 48, seed=1))
    write_png(str(folder / 'b.png'), random_bgr(32, 36, seed=2))
    write_png(str(folder / 'sub' / 'c.png'), random_bgr(24, 30, seed=3))
    (folder / 'notes.txt').write_text('not an image')
    return folder


@pytest.fixture
def demo_opt():
    """The demo option file, parsed with yaml.safe_load (a fresh dict per test)."""
    import yaml
    with open(DEMO_YML) as f:
        return yaml.safe_load(f)


TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, block_out_channels=[32, 32],
    down_block_types=['DownEncoderBlock2D'] * 2, up_block_types=['UpDecoderBlock2D'] * 2,
    latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=32)


@pytest.fixture
def tiny_vae_config():
    return {k: (list(v) if isinstance(v, list) else v) for k, v in TINY_VAE_CONFIG.items()}


@pytest.fixture
def tiny_patchscaler(tmp_path):
    """(option dict, RTM path): the demo's two-stage options shrunk to seconds — pixel-unshuffle d=2 (c=12),
    an RRDB GRM, a 1-block Patch-DiT on V=8 patches, a texture encoder and a 24-patch RTM of random latents."""
    import torch
    import yaml

    from patchscaler.archs.autoencoder_arch import PixelUnshuffleAutoencoder
    from patchscaler.retrieval import ReferenceTextureMemory
    with open(os.path.join(ROOT, 'options', 'demo', 'train_patchscaler_demo.yml')) as f:
        opt = yaml.safe_load(f)
    ae = PixelUnshuffleAutoencoder(2)
    values = ae.encode(torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    rtm = ReferenceTextureMemory.build(values, None, 24, autoencoder=ae, top_k=2).save(tmp_path / 'rtm_tiny')
    opt['autoencoder'] = {'type': 'PixelUnshuffleAutoencoder', 'downscale': 2}
    opt['network_grm'] = {'type': 'GRM', 'in_channels': 12, 'num_feat': 8, 'body': 'rrdb', 'num_blocks': 1,
                          'num_grow_ch': 4}
    opt['network_dit'] = {'type': 'PatchDiT', 'in_channels': 12, 'input_size': 8, 'patch_size': 2,
                          'hidden_size': 32, 'depth': 1, 'num_heads': 2, 'prompt_dim': 16}
    opt['network_texture'] = {'type': 'TextureEncoder', 'in_channels': 12, 'input_size': 8, 'token_patch': 4,
                              'dim': 16, 'depth': 1, 'num_heads': 2}
    opt['rtm'] = {'type': 'ReferenceTextureMemory', 'path': str(rtm), 'top_k': 2, 'backend': 'torch'}
    opt['sampler'] = {'type': 'PatchGroupSampler', 'patch_size': 8, 'batch_size': 8,
                      'groups': [{'tau': 400, 'steps': 2}, {'tau': 700, 'steps': 3}, {'tau': 1000, 'steps': 4}]}
    opt['train'].update(gt_size=32, patches_per_image=2, grm_iters=2, total_iter=4)
    return opt, rtm


@pytest.fixture
def trained(tiny_patchscaler, tmp_path):
    """A test option file whose networks have (random, perturbed) weights saved the way training saves them."""
    import torch
    import yaml
    from basicsr.archs import build_network
    opt, _ = tiny_patchscaler
    models = tmp_path / 'run' / 'models'
    models.mkdir(parents=True)
    torch.manual_seed(0)
    for name in ('grm', 'dit', 'texture'):
        net = build_network(dict(opt[f'network_{name}']))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.02 * torch.randn_like(p))
        state = net.state_dict()
        torch.save({'params': state, 'params_ema': state}, models / f'net_{name}_latest.pth')
    test = {k: opt[k] for k in ('scale', 'autoencoder', 'network_grm', 'network_dit', 'network_texture', 'rtm',
                                'sampler')}
    test['path'] = {f'pretrain_network_{n}': str(models / f'net_{n}_latest.pth') for n in ('grm', 'dit', 'texture')}
    path = tmp_path / 'test.yml'
    path.write_text(yaml.safe_dump(test))
    return str(path), tmp_path / 'run'

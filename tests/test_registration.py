"""`import patchscaler` registers every component and applies the BasicSR compat fixes."""
import importlib
import sys

import pytest

import patchscaler  # noqa: F401  (registration; conftest.py imports it before BasicSR)


@pytest.mark.parametrize('name', ['GRM', 'PixelUnshuffleAutoencoder', 'DiffusersAutoencoderKL'])
def test_archs_registered(name):
    from basicsr.utils.registry import ARCH_REGISTRY

    from patchscaler.archs import autoencoder_arch, grm_arch
    cls = ARCH_REGISTRY.get(name)
    assert cls is getattr(grm_arch if name == 'GRM' else autoencoder_arch, name)


def test_loss_registered():
    from basicsr.utils.registry import LOSS_REGISTRY

    from patchscaler.losses.confidence_loss import ConfidenceLoss
    assert LOSS_REGISTRY.get('ConfidenceLoss') is ConfidenceLoss


def test_model_registered():
    from basicsr.utils.registry import MODEL_REGISTRY

    from patchscaler.models.patchscaler_model import PatchScalerModel
    assert MODEL_REGISTRY.get('PatchScalerModel') is PatchScalerModel


@pytest.mark.parametrize('name', ['RealESRGANHRDataset', 'PairedSRDataset'])
def test_datasets_registered(name):
    from basicsr.utils.registry import DATASET_REGISTRY
    cls = DATASET_REGISTRY.get(name)
    assert cls.__name__ == name
    assert cls.__module__.startswith('patchscaler.data')


def test_mmengine_registries():
    from mmengine.registry import Registry

    from patchscaler import registry
    for reg, name in ((registry.SAMPLERS, 'sampler'), (registry.RETRIEVERS, 'retriever'),
                      (registry.AUTOENCODERS, 'autoencoder')):
        assert isinstance(reg, Registry)
        assert reg.name == name
        assert reg.scope == 'patchscaler'
    # the package re-exports them
    assert patchscaler.AUTOENCODERS is registry.AUTOENCODERS
    assert patchscaler.SAMPLERS is registry.SAMPLERS
    assert patchscaler.RETRIEVERS is registry.RETRIEVERS


def test_autoencoders_build_from_mmengine_registry():
    from patchscaler.archs.autoencoder_arch import PixelUnshuffleAutoencoder
    from patchscaler.registry import AUTOENCODERS
    assert 'PixelUnshuffleAutoencoder' in AUTOENCODERS.module_dict
    assert 'DiffusersAutoencoderKL' in AUTOENCODERS.module_dict
    ae = AUTOENCODERS.build(dict(type='PixelUnshuffleAutoencoder', downscale=2))
    assert isinstance(ae, PixelUnshuffleAutoencoder)
    assert ae.downscale_factor == 2
    assert ae.latent_channels == 12


def test_functional_tensor_alias():
    from torchvision.transforms import functional
    mod = importlib.import_module('torchvision.transforms.functional_tensor')
    assert mod is functional
    assert sys.modules['torchvision.transforms.functional_tensor'] is functional
    assert callable(mod.rgb_to_grayscale)
    # the module that needed it imports
    import basicsr.data.degradations  # noqa: F401


def test_load_resume_state_patched():
    import basicsr.train

    from patchscaler import compat
    assert basicsr.train.load_resume_state is compat.load_resume_state


def test_apply_is_idempotent():
    import basicsr.train
    from basicsr.models.base_model import BaseModel

    from patchscaler import compat
    save_network = BaseModel.save_network
    load_network = BaseModel.load_network
    compat.apply()
    assert BaseModel.save_network is save_network
    assert BaseModel.load_network is load_network  # not wrapped twice
    assert basicsr.train.load_resume_state is compat.load_resume_state


def test_load_resume_state_maps_to_cpu(tmp_path):
    import torch

    from patchscaler import compat
    from patchscaler.utils.checkpoint import atomic_save
    state_path = tmp_path / '7.state'
    atomic_save({'epoch': 1, 'iter': 7, 'optimizers': [], 'schedulers': [], 'x': torch.ones(2)}, str(state_path))
    opt = {'auto_resume': False, 'num_gpu': 0, 'name': 'x', 'is_train': True,
           'path': {'resume_state': str(state_path)}}
    state = compat.load_resume_state(opt)
    assert state['iter'] == 7
    assert state['x'].device.type == 'cpu'
    assert compat.load_resume_state({'auto_resume': False, 'path': {'resume_state': None}}) is None


def test_loose_version_shim_compares_numbers_as_numbers():
    """The distutils stand-in (Python >= 3.12) must order versions as BasicSR's arch_util expects."""
    from patchscaler.compat import LooseVersion as LV
    assert LV('0.29.1+cu130') >= LV('0.9.0')
    assert LV('2.10') >= LV('2.9')
    assert LV('1.7') < LV('1.10')
    assert LV('2.0') >= LV('2.0')
    assert not LV('0.8') >= LV('0.9.0')

"""Registries for the kinds of component BasicSR has no registry for.

BasicSR's own registries (``basicsr.utils.registry``) hold what BasicSR builds from YAML: archs, models,
losses, datasets, metrics. Samplers (PGS), retrievers (the reference texture memory) and the frozen
autoencoders also live in these mmengine registries, so they build from a dict outside BasicSR::

    from patchscaler.registry import AUTOENCODERS
    ae = AUTOENCODERS.build(dict(type='PixelUnshuffleAutoencoder', downscale=4))
"""
from mmengine.registry import Registry

SAMPLERS = Registry('sampler', scope='patchscaler')
RETRIEVERS = Registry('retriever', scope='patchscaler')
AUTOENCODERS = Registry('autoencoder', scope='patchscaler')

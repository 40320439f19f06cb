"""Registries for the kinds of component BasicSR has no registry for.

BasicSR's own registries (``basicsr.utils.registry``) hold what BasicSR builds from YAML: archs, models,
losses, datasets, metrics. Samplers (PGS), retrievers (the reference texture memory), texture classifiers
(its key extractors) and the frozen autoencoders live in these mmengine registries, so they build from a
dict outside BasicSR::

    from patchscaler.registry import AUTOENCODERS
    ae = AUTOENCODERS.build(dict(type='PixelUnshuffleAutoencoder', downscale=4))
"""
from mmengine.registry import Registry

SAMPLERS = Registry('sampler', scope='patchscaler')
RETRIEVERS = Registry('retriever', scope='patchscaler')
TEXTURE_CLASSIFIERS = Registry('texture classifier', scope='patchscaler')  # the RTM's key extractors
AUTOENCODERS = Registry('autoencoder', scope='patchscaler')

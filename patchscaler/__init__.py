"""PatchScaler: patch-independent diffusion super-resolution (ICCV 2025) as a BasicSR plugin.

``import patchscaler`` applies the BasicSR 1.4.2 compatibility fixes (:mod:`patchscaler.compat`) and
registers every component in BasicSR's registries and in :mod:`patchscaler.registry`.
"""
from . import compat

compat.apply()

from . import archs, data, losses, metrics, models, retrieval, sampling  # noqa: E402,F401  (registration)
from .registry import AUTOENCODERS, RETRIEVERS, SAMPLERS, TEXTURE_CLASSIFIERS  # noqa: E402,F401

__version__ = '0.1.0'

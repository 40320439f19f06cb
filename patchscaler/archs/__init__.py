"""Networks, registered in BasicSR's ARCH_REGISTRY (autoencoders also in patchscaler.registry.AUTOENCODERS)."""
from . import autoencoder_arch, grm_arch  # noqa: F401  (registration)

"""Networks, registered in BasicSR's ARCH_REGISTRY (autoencoders also in patchscaler.registry.AUTOENCODERS)."""
from . import autoencoder_arch, grm_arch, patch_dit_arch, stablesr_arch, texture_encoder_arch  # noqa: F401  (registration)

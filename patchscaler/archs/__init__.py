"""Networks, registered in BasicSR's ARCH_REGISTRY (autoencoders also in patchscaler.registry.AUTOENCODERS)."""
from . import (  # noqa: F401  (registration)
    autoencoder_arch,
    cfw_arch,
    grm_arch,
    patch_dit_arch,
    stablesr_arch,
    texture_encoder_arch,
)

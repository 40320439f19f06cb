"""BasicSR models, registered in MODEL_REGISTRY."""
from . import patchscaler_model  # noqa: F401  (registration)

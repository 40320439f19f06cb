"""BasicSR models, registered in MODEL_REGISTRY."""
from . import baseline_models, patchscaler_model  # noqa: F401  (registration)

"""BasicSR models, registered in MODEL_REGISTRY."""
from . import baseline_models, patchscaler_model, stablesr_model  # noqa: F401  (registration)

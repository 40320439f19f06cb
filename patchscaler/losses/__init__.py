"""Losses, registered in BasicSR's LOSS_REGISTRY."""
from . import confidence_loss  # noqa: F401  (registration)

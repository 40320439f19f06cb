"""Datasets (registered in BasicSR's DATASET_REGISTRY), image reading and the shared degradation."""
from . import paired_image_dataset, realesrgan_hr_dataset  # noqa: F401  (registration)
from .degradation import RealESRGANDegradation  # noqa: F401
from .image_io import ImageSource, decode_image, read_image  # noqa: F401

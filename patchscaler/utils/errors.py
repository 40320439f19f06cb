"""Errors that the tools print as one line (``error: ...``) instead of a traceback.

Anything a user can fix (an option, a path, a missing weight file, a bad checkpoint or image) raises a
subclass of :class:`PatchScalerError` whose message says what is wrong and what to do.
"""


class PatchScalerError(Exception):
    """Base class: a user-fixable problem, reported in one line."""


class ConfigError(PatchScalerError, ValueError):
    """An option file has an unknown key, a wrong type or a missing path."""


class MissingWeightsError(PatchScalerError, FileNotFoundError):
    """A pretrained piece was asked for but its local file or folder is not there."""


class CheckpointError(PatchScalerError, RuntimeError):
    """A checkpoint is missing, truncated, or would need arbitrary unpickling to load."""


class DataError(PatchScalerError, OSError):
    """A dataset is missing or unreadable (LMDB, folder, meta_info, image file)."""


class InputError(PatchScalerError, ValueError):
    """An input tensor has the wrong shape, range or dtype, or holds NaN (e.g. a confidence map for PGS)."""


class NonFiniteError(PatchScalerError, RuntimeError):
    """A network produced NaN/inf from finite input: its weights (or its precision) are broken; the message names
    the stage (GRM, denoiser, decoder), and nothing is written from it."""


class TrainingError(PatchScalerError, RuntimeError):
    """Training cannot go on (e.g. the loss stayed NaN/inf for many steps in a row); the checkpoints are intact."""

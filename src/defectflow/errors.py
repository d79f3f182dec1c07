"""Errors the user can act on. The CLI prints their message and exits 2 instead of a traceback."""


class DefectflowError(Exception):
    """Base class: the message says what went wrong, which file, and how to fix it."""


class DataError(DefectflowError):
    """A dataset folder, image or mask is missing, unreadable or inconsistent."""


class WeightsError(DefectflowError):
    """Pretrained backbone weights could not be obtained."""


class CheckpointError(DefectflowError):
    """A checkpoint is missing, corrupt, foreign, of an unknown version, or would be overwritten."""


class TrainingError(DefectflowError):
    """Training did not give a usable model (it diverged: weights or thresholds are not numbers)."""


class ConfigError(DefectflowError):
    """An option has a value the method cannot use."""


class DefectflowWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it on one line)."""

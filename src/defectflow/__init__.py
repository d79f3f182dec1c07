"""defectflow: unsupervised visual anomaly detection for industrial inspection."""

from .data.folder import AnomalyFolder
from .errors import CheckpointError, ConfigError, DataError, DefectflowError, TrainingError, WeightsError
from .memory import keep_freed_memory
from .methods import METHODS, Detector, Evaluation, Prediction, create, load

__version__ = "0.1.0"

__all__ = [
    "AnomalyFolder", "CheckpointError", "ConfigError", "DataError", "DefectflowError", "Detector",
    "Evaluation", "METHODS", "Prediction", "TrainingError", "WeightsError", "create", "keep_freed_memory", "load",
]

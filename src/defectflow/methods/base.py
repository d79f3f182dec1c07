"""The estimator API every method shares: fit, predict, evaluate, save, load.

A method supplies a config dataclass, a torch model (images in [0, 1] -> anomaly maps) and a
training routine; data loading, batching, devices, metrics and checkpoints live here once.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..checkpoint import save_checkpoint
from ..data.folder import AnomalyFolder, ImageDataset, Sample, load_sample_mask, samples_from_paths
from ..errors import CheckpointError, ConfigError
from ..metrics import compute_metrics
from ..scoring import IMAGE_REDUCTIONS, image_scores


def option(default: Any, help: str) -> Any:
    """A config field with its --help text; the CLI builds one flag per field."""
    return field(default=default, metadata={"help": help})


@dataclass
class DetectorConfig:
    """Options every method has. Methods extend this with their own."""

    backbone: str = option("tf_efficientnet_lite0", "timm model name, or torchvision resnet18 / wide_resnet50_2 / alexnet")
    levels: tuple[int, ...] = option((2, 3, 4), "feature levels of the backbone (ResNets: 2 3 4 = layer2-layer4)")
    input_size: int = option(256, "images are resized to input_size x input_size (multiple of 32)")
    pretrained: bool = option(True, "start from ImageNet weights (off only for tests: random weights detect nothing)")
    weights: str | None = option(None, "local .safetensors/.pth backbone weights instead of the library's cache")
    image_score: str = option("max", "image score from the anomaly map: max or mean")
    smoothing_sigma: float = option(4.0, "Gaussian smoothing of the anomaly map in pixels (0: none)")
    batch_size: int = option(16, "images per forward pass")
    seed: int = option(0, "random seed for weights, shuffling and sampling")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    num_workers: int = option(0, "data-loading worker processes")

    def validate(self) -> None:
        if self.input_size < 32 or self.input_size % 32:
            raise ConfigError(f"input_size must be a multiple of 32 and at least 32, got {self.input_size}")
        if self.image_score not in IMAGE_REDUCTIONS:
            raise ConfigError(f"image_score must be one of {IMAGE_REDUCTIONS}, got {self.image_score!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if not self.levels:
            raise ConfigError("levels must name at least one feature level")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DetectorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CheckpointError(f"Unknown options {sorted(unknown)} for {cls.__name__}; was it written by a newer defectflow?")
        values = dict(data)
        for f in dataclasses.fields(cls):  # JSON has lists where the config has tuples
            if f.name in values and isinstance(values[f.name], list):
                values[f.name] = tuple(values[f.name])
        return cls(**values)


@dataclass
class Prediction:
    """Scores and maps for a list of images. maps are input_size x input_size, calibrated so
    that 0 is typical of normal training pixels and 1 the most anomalous one seen there."""

    paths: list[Path]
    scores: np.ndarray
    maps: np.ndarray
    head_maps: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Evaluation:
    category: str
    metrics: dict[str, float | None]
    prediction: Prediction
    labels: np.ndarray
    masks: np.ndarray | None
    ms_per_image: float
    head_metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)  # each head's map alone


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _samples(data: AnomalyFolder | str | Path | Sequence[str | Path] | Sequence[Sample], split: str) -> list[Sample]:
    if isinstance(data, (str, Path)):
        data = AnomalyFolder.scan(data, require_test=split == "test")
    if isinstance(data, AnomalyFolder):
        return list(data.train if split == "train" else data.test)
    data = list(data)
    if data and all(isinstance(item, Sample) for item in data):
        return data
    return samples_from_paths(data)


class Detector:
    """Base class. Subclasses set `method`, `config_class`, and implement build_model and _fit."""

    method: ClassVar[str]
    config_class: ClassVar[type[DetectorConfig]] = DetectorConfig

    def __init__(self, config: DetectorConfig | None = None, **options: Any) -> None:
        config = config or self.config_class()
        try:
            self.config = dataclasses.replace(config, **options)
        except TypeError as exc:
            raise ConfigError(f"{self.method}: {exc}") from None
        self.config.validate()
        self.device = resolve_device(self.config.device)
        self.model: nn.Module | None = None
        self.fit_seconds: dict[str, float] = {}
        self.validation = None  # a synthetic ValidationSet, for methods that build one in fit

    # -- what a method provides -------------------------------------------------------------
    def build_model(self, pretrained: bool) -> nn.Module:
        raise NotImplementedError

    def _fit(self, train: list[Sample], progress: bool) -> None:
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------------
    def loader(self, samples: Sequence[Sample], shuffle: bool = False) -> DataLoader:
        return DataLoader(
            ImageDataset(samples, self.config.input_size),
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            num_workers=self.config.num_workers,
        )

    def fit(self, data: AnomalyFolder | str | Path | Sequence, progress: bool = True) -> "Detector":
        """Train on normal images (a category folder's train split, or a list of image paths)."""
        torch.manual_seed(self.config.seed)
        np.random.seed(self.config.seed)
        self._fit(_samples(data, "train"), progress)
        return self

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise ConfigError(f"This {self.method} detector is not trained: call fit() or load a checkpoint first.")
        return self.model

    @torch.no_grad()
    def predict(self, data: AnomalyFolder | str | Path | Sequence, progress: bool = True) -> Prediction:
        """Anomaly maps and image scores (a folder's test split, or images / folders of images)."""
        model = self._require_model().eval()
        samples = _samples(data, "test")
        maps, scores, heads = [], [], {}
        for batch in tqdm(self.loader(samples), desc="predict", disable=not progress, leave=False):
            out = model(batch["image"].to(self.device))
            maps.append(out["map"].float().cpu())
            # a model may score images itself (DifferNet); otherwise the score comes from the map
            scores.append(out["score"].float().cpu() if "score" in out else image_scores(maps[-1], self.config.image_score))
            for name, value in out.items():
                if name not in ("map", "score"):
                    heads.setdefault(name, []).append(value.float().cpu())
        all_maps = torch.cat(maps)
        return Prediction(
            paths=[s.path for s in samples],
            scores=torch.cat(scores).numpy(),
            maps=all_maps.numpy(),
            head_maps={name: torch.cat(values).numpy() for name, values in heads.items()},
        )

    def evaluate(self, folder: AnomalyFolder | str | Path, progress: bool = True) -> Evaluation:
        """The four metrics on a category's test split (pixel metrics only where it has masks)."""
        if not isinstance(folder, AnomalyFolder):
            folder = AnomalyFolder.scan(folder)
        start = time.perf_counter()
        prediction = self.predict(folder, progress=progress)
        ms_per_image = 1000.0 * (time.perf_counter() - start) / max(len(folder.test), 1)
        labels = np.array([s.label for s in folder.test])
        masks = None
        if folder.has_masks:
            masks = np.stack([load_sample_mask(s, self.config.input_size)[0].numpy() > 0 for s in folder.test])
        metrics = compute_metrics(labels, prediction.scores, masks, prediction.maps)
        head_metrics = {
            name: compute_metrics(labels, image_scores(torch.from_numpy(maps), self.config.image_score).numpy(), masks, maps)
            for name, maps in prediction.head_maps.items()
        }
        return Evaluation(folder.name, metrics, prediction, labels, masks, ms_per_image, head_metrics)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        model = self._require_model()
        return save_checkpoint(path, self.method, self.config.to_json(), model.state_dict(), overwrite=overwrite)

    @classmethod
    def from_checkpoint(cls, meta: dict[str, Any], state: dict[str, torch.Tensor], device: str | None) -> "Detector":
        config = cls.config_class.from_json(meta["config"])
        if device is not None:
            config.device = device
        detector = cls(config)
        model = detector.build_model(pretrained=False)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"The checkpoint's weights do not fit a {cls.method} model with its config: {exc}") from None
        detector.model = model.to(detector.device).eval()
        return detector

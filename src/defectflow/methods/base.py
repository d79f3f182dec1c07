"""The estimator API every method shares: fit, predict, evaluate, save, load.

A method supplies a config dataclass, a torch model (images in [0, 1] -> anomaly maps) and a
training routine; data loading, batching, devices, metrics and checkpoints live here once.
"""

from __future__ import annotations

import dataclasses
import math
import time
import types
import typing
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..backends import Backend
from ..checkpoint import save_checkpoint
from ..data.folder import (
    IN_MEMORY, AnomalyFolder, ImageDataset, Sample, check_training_images, fitted_size, load_images, load_sample_mask,
    samples_from_paths,
)
from ..data.images import MASK_RESAMPLING, Size
from ..data.synthetic import DefectSynthesizer, TextureSource, ValidationSet, build_validation_set, list_images_recursive
from ..errors import CheckpointError, ConfigError, DataError, DefectflowWarning, TrainingError
from ..features.extractor import FeatureExtractor
from ..features.precision import float32_depthwise
from ..heads.guard import input_statistics, reasons
from ..metrics import compute_metrics
from ..scoring import IMAGE_REDUCTIONS, footprint, image_scores
from ..thresholds import RULES, Thresholds, choose_thresholds

T = TypeVar("T")

# Added after checkpoints of format 1 were first written: older checkpoints lack these options,
# and load with the values that give their behaviour, and these buffers, which load with their
# defaults (the guard uncalibrated or without its colour check, the heads' scales the identity).
LEGACY_OPTIONS: dict[str, Any] = {"tile_size": None, "tile_overlap": 64, "mask_resampling": "cover", "position_reference": "off",
                                   "train_precision": "fp32", "tune_from_level": 0, "gradient_map": "input", "flow_map_stride": 1,
                                   "flow_neighbourhood": 1}
ADDED_LATER = ("guard.", "head_low", "head_high", "scorer.position_low", "fused_low")


PRECISIONS = ("auto", "bf16", "fp32")


def option(default: Any, help: str) -> Any:
    """A config field with its --help text; the CLI builds one flag per field."""
    return field(default=default, metadata={"help": help})


@dataclass
class DetectorConfig:
    """Options every method has. Methods extend this with their own."""

    backbone: str = option("tf_efficientnet_lite0", "timm model name, or torchvision resnet18 / wide_resnet50_2 / alexnet")
    levels: tuple[int, ...] = option((2, 3, 4), "feature levels of the backbone (ResNets: 2 3 4 = layer2-layer4)")
    input_size: tuple[int, ...] = option(
        (256,),
        "image size in pixels, multiples of 32: one value is the short side, the long side following the training "
        "images' median aspect ratio (fixed at fit); two values are height and width",
    )
    tile_size: int | None = option(
        None, "run the extractor on overlapping tiles of this size (multiple of 32) and stitch their features: "
        "bounded memory for large input sizes (None: whole images)",
    )
    tile_overlap: int = option(64, "overlap of neighbouring tiles in pixels (multiple of 32)")
    mask_resampling: str = option(
        "cover", "how ground-truth masks are resized to the map for pixel metrics: cover (every defect region kept "
        "whole, thin ones widened) or nearest (the papers' protocol: thin defects can break up or vanish)",
    )
    pretrained: bool = option(True, "start from ImageNet weights (off only for tests: random weights detect nothing)")
    weights: str | None = option(None, "local .safetensors/.pth backbone weights instead of the library's cache")
    val_fraction: float = option(0.1, "share of training images held out as a synthetic validation set (thresholds, model choice; 0: none)")
    texture_dir: str | None = option(None, "folder of texture images (e.g. DTD) to fill synthetic defects; default: made here")
    foreground: bool = option(False, "put synthetic defects on the object only (object categories)")
    threshold_rule: str = option("far", "operating thresholds from the validation set: far (target false-alarm rate on its good images and pixels) or f1 (best F1 on its synthetic defects)")
    target_far: float = option(0.01, "false-alarm rate on good images and pixels for threshold_rule far")
    image_score: str = option("top", "image score from the anomaly map (above each pixel's normal level where there is one): "
                                     "top, the mean of its highest pixels over one smoothing footprint (a disc of radius "
                                     "2 smoothing sigmas); max; or mean")
    smoothing_sigma: float = option(4.0, "Gaussian smoothing of the anomaly map in pixels (0: none)")
    batch_size: int = option(16, "images per forward pass")
    seed: int = option(0, "random seed for weights, shuffling and sampling")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    num_workers: int = option(0, "worker processes that read images (and make clscnf's synthetic defects) while the "
                                 "model computes: on a GPU, a few keep it busy")
    train_precision: str = option(
        "auto", "arithmetic of training: bf16 (bfloat16 autocast of the networks' matrix products and convolutions), "
        "fp32, or auto (bf16 where the device computes it natively: CPUs with AVX-512 BF16 or AMX, CUDA GPUs from "
        "Ampere on; fp32 elsewhere, where bf16 would be slower). On a CPU, depthwise convolutions that train stay fp32, "
        "where bf16 is slower (features/precision.py). Inference is float32 whatever this says",
    )

    @property
    def score_rule(self) -> tuple[str, int]:
        """(reduction, area) for scoring.image_scores."""
        return self.image_score, footprint(self.smoothing_sigma)

    def validate(self) -> None:
        """Every option checked before any work starts: a bad value fails in a second, not after training."""
        if isinstance(self.input_size, (int, list)):  # input_size=256 from Python, a list from JSON
            self.input_size = tuple(self.input_size) if isinstance(self.input_size, list) else (self.input_size,)
        check_types(self)
        if len(self.input_size) not in (1, 2) or any(v < 32 or v % 32 for v in self.input_size):
            raise ConfigError(
                f"input_size must be one (short side) or two (height width) multiples of 32, each at least 32, got {self.input_size}"
            )
        if self.tile_size is not None and (self.tile_size < 64 or self.tile_size % 32):
            raise ConfigError(f"tile_size must be a multiple of 32 and at least 64, got {self.tile_size}")
        if self.tile_overlap < 0 or self.tile_overlap % 32 or (self.tile_size is not None and self.tile_overlap >= self.tile_size):
            raise ConfigError(f"tile_overlap must be a multiple of 32, at least 0 and below tile_size, got {self.tile_overlap}")
        if self.mask_resampling not in MASK_RESAMPLING:
            raise ConfigError(f"mask_resampling must be one of {MASK_RESAMPLING}, got {self.mask_resampling!r}")
        if self.image_score not in IMAGE_REDUCTIONS:
            raise ConfigError(f"image_score must be one of {IMAGE_REDUCTIONS}, got {self.image_score!r}")
        at_least(self, 1, "batch_size")
        at_least(self, 0, "seed", "num_workers", "smoothing_sigma")
        if not self.levels:
            raise ConfigError("levels must name at least one feature level")
        if min(self.levels) < 0:
            raise ConfigError(f"levels are backbone stages 0, 1, 2, ...; got {list(self.levels)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.threshold_rule not in RULES:
            raise ConfigError(f"threshold_rule must be one of {RULES}, got {self.threshold_rule!r}")
        if self.train_precision not in PRECISIONS:
            raise ConfigError(f"train_precision must be one of {PRECISIONS}, got {self.train_precision!r}")
        if not 0.0 <= self.target_far < 1.0:
            raise ConfigError(f"target_far must be in [0, 1), got {self.target_far}")
        check_device(self.device)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DetectorConfig":
        """The config a checkpoint recorded, every option present and valid (CheckpointError otherwise)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(data) - known, known - set(data)
        if unknown:
            raise CheckpointError(f"Unknown options {sorted(unknown)} for {cls.__name__}; was it written by a newer defectflow?")
        missing -= set(LEGACY_OPTIONS)
        if missing:
            raise CheckpointError(f"The checkpoint's config lacks the options {sorted(missing)}; the checkpoint is damaged.")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in {**LEGACY_OPTIONS, **data}.items() if k in known}
        if isinstance(values.get("input_size"), int):  # checkpoints before non-square sizes: square images
            values["input_size"] = (values["input_size"],) * 2
        config = cls(**values)
        try:  # the device is the loading machine's business (load(device=...)): its value is checked when it is used
            check_types(config)
            dataclasses.replace(config, device="cpu").validate()
        except ConfigError as exc:
            raise CheckpointError(f"The checkpoint's config is invalid: {exc}") from None
        return config


def not_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold NaN or infinite values."""
    return [name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether value fits a config type hint; None for a hint this does not know (not checked)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        known = [_fits(value, arg) for arg in args]
        return None if None in known else any(known)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        items = [_fits(v, args[0]) for v in value] if len(args) == 2 and args[1] is Ellipsis else [None]
        return None if None in items else all(items)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if hint is float:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if hint is str:
        return isinstance(value, str)
    return None


def check_types(config: DetectorConfig) -> None:
    """Each option against its type hint (an int where a float is expected is fine), and every
    number finite: "64" for an int or nan for a learning rate is a ConfigError naming the option."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if _fits(value, hints[f.name]) is False:
            shown = hints[f.name].__name__ if isinstance(hints[f.name], type) else str(hints[f.name]).replace("typing.", "")
            raise ConfigError(f"{f.name} must be of type {shown}, got {value!r} ({type(value).__name__})")
        numbers = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, (float, np.floating)) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")


def at_least(config: DetectorConfig, low: float, *names: str) -> None:
    for name in names:
        if getattr(config, name) < low:
            raise ConfigError(f"{name} must be at least {low}, got {getattr(config, name)}")


def positive(config: DetectorConfig, *names: str) -> None:
    for name in names:
        if not getattr(config, name) > 0:
            raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")


def check_device(name: str) -> None:
    """auto, cpu, cuda[:N] or another torch device that exists on this machine."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for a CUDA GPU but none is available here; use --device cpu (or auto).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) (cuda:0 ...).")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} is not available here; use --device cpu (or auto).")




@dataclass
class Prediction:
    """Scores and maps for a list of images. maps are height x width (input_size), calibrated so
    that 0 is typical of normal training pixels and 1 the most anomalous one seen there."""

    paths: list[Path]
    scores: np.ndarray
    maps: np.ndarray
    head_maps: dict[str, np.ndarray] = field(default_factory=dict)
    thresholds: Thresholds | None = None
    frame: np.ndarray | None = None  # N x len(CHECKS) deviations from the frame guard (heads/guard.py)
    failed: dict[Path, str] = field(default_factory=dict)  # images that could not be read -> why; not in paths

    @property
    def invalid(self) -> np.ndarray:
        """Per image: True where the frame is not like the product's good training images at all
        (blank, saturated, noise, another product...), whatever its anomaly score, or where its
        score is not a number (every comparison with NaN is false: it would pass as OK)."""
        unscored = ~np.isfinite(self.scores)
        return unscored if self.frame is None else unscored | (self.frame > 1).any(axis=1)

    @property
    def frame_reasons(self) -> list[str]:
        """Per image: the guard's checks it fails, and whether its score is not a number ("" when it passes)."""
        checks = [""] * len(self.scores) if self.frame is None else reasons(self.frame)
        return [", ".join(filter(None, (check, "" if np.isfinite(score) else "score is not a number"))) for check, score in zip(checks, self.scores)]

    @property
    def defective(self) -> np.ndarray | None:
        """Not OK (True) / OK per image: at or above the image threshold, or an invalid frame;
        None without thresholds."""
        # compared in float64: a Python float next to a float32 array would be rounded to float32
        return None if self.thresholds is None else (self.scores.astype(np.float64) >= self.thresholds.image) | self.invalid

    @property
    def verdicts(self) -> list[str] | None:
        """"DEFECT", "INVALID" (an invalid frame scoring under the threshold) or "OK" per image, as
        predict prints and writes them; None without thresholds."""
        if self.thresholds is None:
            return None
        over = self.scores.astype(np.float64) >= self.thresholds.image
        return ["DEFECT" if o else "INVALID" if i else "OK" for o, i in zip(over, self.invalid)]

    @property
    def regions(self) -> np.ndarray | None:
        """Binary defect-region masks at the pixel threshold; None without thresholds."""
        return None if self.thresholds is None else self.maps.astype(np.float64) >= self.thresholds.pixel


@dataclass
class Evaluation:
    category: str
    metrics: dict[str, float | None]
    prediction: Prediction
    labels: np.ndarray
    masks: np.ndarray | None
    ms_per_image: float
    head_metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)  # each head's map alone


def native_bf16(device: torch.device) -> bool:
    """Whether the device has bfloat16 arithmetic units; emulated bf16 is slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_bf16_units()
    return False


def cpu_bf16_units() -> bool:
    """Whether this CPU computes in bfloat16 natively (x86 AVX512_BF16 or AMX, ARM BF16). oneDNN's
    own check (torch.ops.mkldnn._is_mkldnn_bf16_supported) is true on any AVX-512 CPU, where it
    emulates bf16: there training in bf16 was slower than in fp32, not faster
    (benchmarks/README.md, *Training on CPUs without bf16 units*)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
    if capabilities is None:
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return any(capabilities().get(name, False) for name in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"))


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether training on `device` runs in bfloat16 for a train_precision value."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


@contextmanager
def train_autocast(precision: str, device: torch.device, model: nn.Module | None = None) -> Iterator[None]:
    """The autocast context of a training forward pass: bfloat16 when use_bf16, else a no-op.
    bfloat16 has float32's range, so the losses need no gradient scaler (float16 would). On a CPU
    the depthwise convolutions of `model` that train stay float32, where bf16 is slower
    (features/precision.py)."""
    enabled = use_bf16(precision, device)
    depthwise = float32_depthwise(model) if enabled and device.type == "cpu" and model is not None else nullcontext()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled), depthwise:
        yield


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _samples(data: AnomalyFolder | str | Path | Sequence[Any], split: str) -> list[Sample]:
    """The samples of a category folder's split, or of a list of paths, folders or in-memory images."""
    if isinstance(data, (str, Path)):
        data = AnomalyFolder.scan(data, require_test=split == "test")
    if isinstance(data, AnomalyFolder):
        return list(data.train if split == "train" else data.test)
    if isinstance(data, IN_MEMORY):  # one image is a list of one
        data = [data]
    data = list(data)
    if not data:
        raise DataError(f"No images given to {'fit' if split == 'train' else 'predict'}(): pass paths, folders or image arrays.")
    if all(isinstance(item, Sample) for item in data):
        return data
    return samples_from_paths(data)


def min_images_to_hold_out(fraction: float) -> int | None:
    """The fewest training images for which hold_out() holds any back (None: fraction 0)."""
    return next((n for n in range(4, 10_000) if hold_out_count(n, fraction)), None) if fraction > 0 else None


def hold_out_count(n: int, fraction: float) -> int:
    """How many of n images hold_out() holds back: none when fewer than 2 would be held or kept."""
    n_held = int(round(fraction * n))
    return 0 if n_held < 2 or n - n_held < 2 else n_held


def hold_out(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(held out, kept): a seeded random share of the samples, none when too few would be left."""
    order = np.random.default_rng(seed).permutation(len(samples))
    n_held = hold_out_count(len(samples), fraction)
    return [samples[i] for i in sorted(order[:n_held])], [samples[i] for i in sorted(order[n_held:])]


def prefetched(items: Iterable[T]) -> Iterator[T]:
    """The items, each read by a thread while the previous one is used: in predict, decoding and
    resizing the next batch of images (PIL and torch release the GIL) overlaps inference of this one."""
    end = object()
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="defectflow-read") as pool:
        pending = pool.submit(next, iterator, end)
        while (item := pending.result()) is not end:
            pending = pool.submit(next, iterator, end)
            yield item


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
        self.requested = self.config  # the options as asked: each fit() settles what they leave open (auto sizes, levels)
        self.device = resolve_device(self.config.device)
        self.model: nn.Module | None = None
        self.fit_seconds: dict[str, float] = {}
        self.validation: ValidationSet | None = None  # built in fit from held-out training images
        self.thresholds: Thresholds | None = None
        self.trained_on: dict[str, str] | None = None  # the category folder fit() was given (absolute), if any
        self.threshold_note: str | None = None  # why there are no thresholds, when there are none
        self.backend: Backend | None = None  # an exported graph's runtime instead of the torch model

    # -- what a method provides -------------------------------------------------------------
    def build_model(self, pretrained: bool) -> nn.Module:
        raise NotImplementedError

    def _fit(self, train: list[Sample], progress: bool) -> None:
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------------
    def build_extractor(self, pretrained: bool, levels: Sequence[int] | None = None) -> FeatureExtractor:
        """The configured backbone at `levels` (default: the configured ones). Without pretrained
        weights it is only a shape for a checkpoint's weights to load into."""
        c = self.config
        return FeatureExtractor(c.backbone, tuple(levels or c.levels), pretrained=pretrained,
                                weights=c.weights if pretrained else None, tile=c.tile_size, overlap=c.tile_overlap)

    @property
    def image_size(self) -> Size:
        """(height, width) the model sees; with one input_size value it is fixed by fit from the training images."""
        size = self.config.input_size
        if len(size) != 2:
            raise ConfigError(f"input_size {size} gives the short side only; fit() fixes the long side from the training images.")
        return size

    def loader(self, samples: Sequence[Sample], shuffle: bool = False, tolerate: bool = False) -> DataLoader:
        return DataLoader(
            ImageDataset(samples, self.image_size, self.config.mask_resampling, tolerate=tolerate),
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",  # lets the host-to-GPU copy overlap the computation
        )

    def fit(self, data: AnomalyFolder | str | Path | Sequence, progress: bool = True) -> "Detector":
        """Train on normal images (a category folder's train split, or a list of image paths).

        A share (val_fraction) of them is held out as a synthetic validation set: methods may
        choose epochs or weights on it, and the operating thresholds are chosen on it last.
        """
        self.config = c = self.requested  # not what an earlier fit() settled for other data
        torch.manual_seed(c.seed)
        np.random.seed(c.seed)
        if isinstance(data, (str, Path)):
            data = AnomalyFolder.scan(data, require_test=False)
        train = _samples(data, "train")
        check_training_images(train)
        if c.texture_dir is not None:  # now, not when the first synthetic defect needs it (or never: an option that does nothing)
            list_images_recursive(Path(c.texture_dir))
        if len(c.input_size) == 1:
            self.config = c = dataclasses.replace(c, input_size=fitted_size(train, c.input_size[0]))
        # absolute: eval without --data finds the data from any working directory
        self.trained_on = {"category": data.name, "root": str(data.root.absolute())} if isinstance(data, AnomalyFolder) else None
        held_out, kept = hold_out(train, c.val_fraction, c.seed)
        self.validation = self._validation_set(held_out, progress) if held_out else None
        self.thresholds = None
        self.threshold_note = self._no_validation_note(len(train)) if not held_out else None
        if self.threshold_note is not None and c.val_fraction > 0:
            warnings.warn(self.threshold_note, DefectflowWarning, stacklevel=2)
        self._fit(kept, progress)
        self._calibrate_guard(kept)
        if self.validation is not None:
            self.thresholds = self._choose_thresholds()
        self._check_finite()
        if self.thresholds is not None and self.thresholds.note is not None:
            warnings.warn(self.thresholds.note, DefectflowWarning, stacklevel=2)
        return self

    def _check_finite(self) -> None:
        """Refuse a model that training left unable to score: a diverged loss leaves weights, levels
        or thresholds that are NaN or infinite, and with a NaN threshold every frame would pass as OK."""
        bad = not_finite(self.model.state_dict())
        if self.thresholds is not None and not self.thresholds.finite:
            bad.append(f"operating thresholds (image {self.thresholds.image}, pixel {self.thresholds.pixel})")
        if bad:
            self.model, self.thresholds = None, None
            shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            raise TrainingError(f"Training {self.method} diverged: {shown} are not finite numbers (NaN or infinite), so this model "
                                "cannot score images and was not kept. Lower the learning rate (--lr, and --cls-lr for clscnf), "
                                "or check the training images (any that are blank or corrupt).")

    def _no_validation_note(self, n_train: int) -> str:
        """Why fit() made no validation set, so no operating thresholds (OK/DEFECT) either."""
        fraction = self.config.val_fraction
        if fraction == 0:
            return "it was trained with --val-fraction 0 (no validation set)"
        return (f"only {n_train} training images: --val-fraction {fraction} holds out too few for a validation set "
                f"(at least 2 held out and 2 kept; {min_images_to_hold_out(fraction)} images at this fraction). "
                "No operating thresholds (OK/DEFECT), scores only: add training images or raise --val-fraction")

    def _validation_set(self, samples: list[Sample], progress: bool) -> ValidationSet:
        """Half the held-out images clean, half with a synthetic defect (deterministic per seed)."""
        c = self.config
        images = load_images(samples, self.image_size, progress)
        synthesizer = DefectSynthesizer(TextureSource(self.image_size, c.texture_dir, normal_images=images), use_foreground=c.foreground)
        return build_validation_set(samples, images, synthesizer, c.seed)

    @torch.no_grad()
    def _guard_inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input statistics and averaged deepest features of images, as the frame guard sees them."""
        model = self._require_model().eval()
        stats, pooled = [], []
        for batch in images.split(self.config.batch_size):
            batch = batch.to(self.device)
            stats.append(input_statistics(batch).cpu())
            pooled.append(model.extractor(batch)[-1].mean(dim=(2, 3)).cpu())
        return torch.cat(stats), torch.cat(pooled)

    def _calibrate_guard(self, train: list[Sample], count: int = 64) -> None:
        """The frame guard's ranges from up to `count` training images spread over the set and
        the clean held-out images of the validation set."""
        picks = list(train)[:: max(1, len(train) // count)][:count]
        stats, pooled = self._guard_inputs(load_images(picks, self.image_size))
        held_stats, held_pooled = (stats[:0], pooled[:0]) if self.validation is None else self._guard_inputs(self.validation.clean)
        self.model.guard.calibrate(stats, pooled, held_stats, held_pooled)

    def _choose_thresholds(self) -> Thresholds:
        """The far rule needs good images only: every held-out image before its synthetic defect,
        twice as many as the clean half of the validation set (on KolektorSDD 24, not 12)."""
        c, validation = self.config, self.validation
        if c.threshold_rule == "far":
            prediction = self.predict_images(validation.clean)
            labels, masks = np.zeros(len(validation.clean), int), np.zeros(prediction.maps.shape, bool)
        else:
            prediction = self.predict_images(validation.images)
            labels, masks = validation.labels, validation.masks.numpy()
        return choose_thresholds(labels, prediction.scores, masks, prediction.maps, c.threshold_rule, c.target_far)

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise ConfigError(f"This {self.method} detector is not trained: call fit() or load a checkpoint first.")
        return self.model

    def predict(self, data: AnomalyFolder | str | Path | Sequence, progress: bool = True) -> Prediction:
        """Anomaly maps and image scores (a folder's test split, or images / folders of images, or
        images in memory: numpy arrays HxW / HxWx3, uint8 or float in [0, 1], PIL images).

        An image that cannot be read is left out of paths, scores and maps and listed in
        Prediction.failed with the reason: one bad file does not cost the others their scores.
        """
        self._require_model()
        samples = _samples(data, "test")
        failed: dict[Path, str] = {}

        def readable_batches() -> Iterable[torch.Tensor]:
            with tqdm(total=len(samples), desc="predict", unit="img", disable=not progress, leave=False) as bar:
                for batch in prefetched(self.loader(samples, tolerate=True)):
                    ok = torch.tensor([not error for error in batch["error"]])
                    failed.update({samples[int(i)].path: e for i, e in zip(batch["index"], batch["error"]) if e})
                    if ok.any():
                        yield batch["image"][ok]
                    bar.update(len(ok))  # after the batch's inference: the rate shown is images/s end to end

        prediction = self._predict_batches(readable_batches(), [])
        prediction.paths = [s.path for s in samples if s.path not in failed]
        prediction.failed = failed
        return prediction

    def predict_images(self, images: torch.Tensor) -> Prediction:
        """Prediction for a N x 3 x H x W tensor of images in [0, 1] (paths are left empty)."""
        return self._predict_batches(images.split(self.config.batch_size), [])

    def forward_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's outputs for one batch; an exported backend (backends.py) replaces only this."""
        if self.backend is not None:
            return self.backend(images)
        return self._require_model().eval()(images.to(self.device))

    @torch.no_grad()
    def _predict_batches(self, batches: Iterable[torch.Tensor], paths: list[Path]) -> Prediction:
        maps, scores, frames, heads = [], [], [], {}
        for images in batches:
            out = self.forward_batch(images)
            maps.append(out["map"].float().cpu())
            # a model may score images itself (DifferNet); otherwise the score comes from the map
            scores.append(out["score"].float().cpu() if "score" in out else image_scores(maps[-1], *self.config.score_rule))
            frames.append(out["frame"].float().cpu())
            for name, value in out.items():
                if name not in ("map", "score", "frame"):
                    heads.setdefault(name, []).append(value.float().cpu())
        if not maps:  # no image (every one failed to read)
            return Prediction(paths=paths, scores=np.zeros(0, np.float32), maps=np.zeros((0, 0, 0), np.float32), thresholds=self.thresholds)
        return Prediction(
            paths=paths,
            scores=torch.cat(scores).numpy(),
            maps=torch.cat(maps).numpy(),
            head_maps={name: torch.cat(values).numpy() for name, values in heads.items()},
            thresholds=self.thresholds,
            frame=torch.cat(frames).numpy(),
        )

    def _warm_up(self, count: int) -> None:
        """One untimed pass at each batch shape that predicting `count` images runs. A shape's first
        pass pays one-off costs that are no part of a running line's cost per image: CUDA's context
        and kernel loading and cuDNN's set-up (seconds on a GPU: measured 129 ms/image on 83 images
        without this, 30 after training in the same process), oneDNN's on the CPU."""
        size = self.config.batch_size
        for batch in sorted({min(size, count), count % size} - {0}):
            self.predict_images(torch.zeros(batch, 3, *self.image_size))

    def evaluate(self, folder: AnomalyFolder | str | Path, progress: bool = True) -> Evaluation:
        """The four metrics on a category's test split (pixel metrics only where it has masks)."""
        if not isinstance(folder, AnomalyFolder):
            folder = AnomalyFolder.scan(folder)
        self._warm_up(len(folder.test))
        start = time.perf_counter()
        prediction = self.predict(folder, progress=progress)
        ms_per_image = 1000.0 * (time.perf_counter() - start) / max(len(folder.test), 1)
        test = [s for s in folder.test if s.path not in prediction.failed]  # metrics on the images that could be read
        if not test:
            raise DataError(f"None of the {len(folder.test)} test images of {folder.root} could be read; first: "
                            f"{next(iter(prediction.failed.values()))}")
        labels = np.array([s.label for s in test])
        masks = None
        if folder.has_masks:
            masks = np.stack([load_sample_mask(s, self.image_size, resampling=self.config.mask_resampling)[0].numpy() > 0 for s in test])
        metrics = compute_metrics(labels, prediction.scores, masks, prediction.maps)
        head_metrics = {
            name: compute_metrics(labels, image_scores(torch.from_numpy(maps), *self.config.score_rule).numpy(), masks, maps)
            for name, maps in prediction.head_maps.items()
        }
        return Evaluation(folder.name, metrics, prediction, labels, masks, ms_per_image, head_metrics)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        model = self._require_model()
        extra = {"thresholds": None if self.thresholds is None else self.thresholds.to_json(), "trained_on": self.trained_on,
                 "threshold_note": self.threshold_note}
        return save_checkpoint(path, self.method, self.config.to_json(), model.state_dict(), overwrite=overwrite, extra=extra)

    @classmethod
    def from_checkpoint(cls, meta: dict[str, Any], state: dict[str, torch.Tensor], device: str | None) -> "Detector":
        config = cls.config_class.from_json(meta["config"])
        if device is not None:
            config.device = device
        detector = cls(config)  # the device is checked here: a GPU checkpoint on a CPU machine asks for --device cpu
        model = detector.build_model(pretrained=False)
        fresh = model.state_dict()
        added = [name for name in fresh if name not in state and name.startswith(ADDED_LATER)]
        if "guard.calibrated" in added:
            warnings.warn("This checkpoint predates the frame guard: blank or foreign frames are not flagged "
                          "as INVALID. Retrain the model to get the guard.", stacklevel=2)
        state = {**{name: fresh[name] for name in added}, **state}  # their defaults leave the model as it was
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"The checkpoint's weights do not fit a {cls.method} model with its config: {exc}") from None
        bad = not_finite(state)
        if bad:
            raise CheckpointError(f"The checkpoint's weights {', '.join(bad[:4])} hold NaN or infinite values (its training diverged), "
                                  "so it cannot score images: retrain the model.")
        detector.model = model.to(detector.device).eval().requires_grad_(False)  # frozen: see FeatureExtractor
        thresholds = meta.get("thresholds")
        detector.thresholds = None if thresholds is None else Thresholds.from_json(thresholds)
        detector.trained_on = meta.get("trained_on")
        detector.threshold_note = meta.get("threshold_note")
        return detector

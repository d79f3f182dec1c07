"""CFlow-AD (Gudovskiy et al., WACV 2022): conditional flows on a frozen pretrained extractor.

The extractor is frozen, so its features are computed once per training image and the flows
are trained on those cached features; the reference code runs the extractor again in every
epoch, which is most of its training time on a CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.folder import Sample
from ..errors import ConfigError
from ..features.extractor import FeatureExtractor
from ..heads.flows import ConditionalFlows, bf16_subnets
from ..heads.guard import FrameGuard
from ..scoring import flow_anomaly_map, footprint, image_scores, normalise, smooth, upsample
from .base import Detector, DetectorConfig, at_least, option, positive, prefetched, use_bf16


POSITION_REFERENCES = ("auto", "on", "off")
POSITION_SPREAD = 2.0  # standard deviations above a pixel's mean normal level that still count as normal
STANDING_IMAGES = 10  # held-out good images position_reference auto needs to compare defects' standing with and without the level


@dataclass
class CFlowConfig(DetectorConfig):
    coupling_blocks: int = option(8, "coupling blocks per flow")
    clamp: float = option(1.9, "soft clamp of the affine coupling scales")
    condition_dim: int = option(128, "size of the 2-D positional condition (multiple of 4)")
    fiber_batch: int = option(256, "feature vectors per optimisation step")
    epoch_vectors: int | None = option(
        64_000,
        "random vectors drawn from every level in each epoch, capped at the largest level's count (None: that count); "
        "a level with fewer vectors is drawn in repeated shuffled passes, so coarse levels take as many steps as fine ones",
    )
    lr: float = option(1e-3, "Adam learning rate (after warm-up)")
    meta_epochs: int = option(2, "meta-epochs: the cosine schedule steps once per meta-epoch")
    sub_epochs: int = option(2, "epochs (epoch_vectors from every level) per meta-epoch")
    warmup_meta_epochs: float = option(0.5, "linear warm-up from lr/10, in meta-epochs")
    position_reference: str = option(
        "auto", "image score relative to each pixel's normal level (mean + 2 sd of the training images' maps there, "
        "at least 0), so that where good parts vary (edges, slots, fixtures) stops outscoring a real defect; the map is "
        "unchanged. on, off, or auto: on where the validation set's synthetic defects stand further above the held-out "
        "good images with it than without (fixed at fit)",
    )
    flow_neighbourhood: int = option(
        3, "the flows model the mean of each cell's k x k neighbourhood on its level's grid (odd k; 1: the cell alone, "
        "as CFlow-AD): good parts score more alike; benchmarks/README.md: Flows on neighbourhood means",
    )
    flow_map_stride: int = option(
        2, "the flows' levels are summed and smoothed at 1/stride of the input size (1, 2 or 4), then upsampled once: "
        "a map smoothed with sigma >= stride pixels has no detail finer than that, and the steps cost 1/stride^2",
    )

    @classmethod
    def from_json(cls, data: dict) -> "CFlowConfig":
        """position_reference was on or off (true / false) before auto."""
        value = data.get("position_reference")
        if isinstance(value, bool):
            data = {**data, "position_reference": "on" if value else "off"}
        return super().from_json(data)

    def validate(self) -> None:
        super().validate()
        if self.position_reference not in POSITION_REFERENCES:
            raise ConfigError(f"position_reference must be one of {POSITION_REFERENCES}, got {self.position_reference!r}")
        if self.condition_dim < 4 or self.condition_dim % 4:
            raise ConfigError(f"condition_dim must be a positive multiple of 4, got {self.condition_dim}")
        at_least(self, 1, "coupling_blocks", "fiber_batch", "meta_epochs", "sub_epochs")
        if self.flow_neighbourhood < 1 or self.flow_neighbourhood % 2 == 0:
            raise ConfigError(f"flow_neighbourhood must be an odd number of cells (1, 3, 5, ...), got {self.flow_neighbourhood}")
        at_least(self, 0, "warmup_meta_epochs")
        positive(self, "lr", "clamp")
        if self.flow_map_stride not in (1, 2, 4):
            raise ConfigError(f"flow_map_stride must be 1, 2 or 4, got {self.flow_map_stride}")
        if self.flow_map_stride > 1 and self.smoothing_sigma < self.flow_map_stride:
            raise ConfigError(f"flow_map_stride {self.flow_map_stride} needs smoothing_sigma of at least {self.flow_map_stride} "
                              f"(got {self.smoothing_sigma}): a less smoothed map has detail that stride would lose; "
                              "use --flow-map-stride 1")
        if self.epoch_vectors is not None and self.epoch_vectors < self.fiber_batch:
            raise ConfigError(f"epoch_vectors must be at least fiber_batch ({self.fiber_batch}), got {self.epoch_vectors}")


def lr_factor(step: int, steps_per_meta: int, meta_epochs: int, warmup_meta: float) -> float:
    """CFlow-AD's schedule as a multiple of the base lr: warm-up, then cosine per meta-epoch."""
    floor = 1e-3
    meta = min(step // steps_per_meta, meta_epochs - 1)
    cosine = floor + (1 - floor) * (1 + math.cos(math.pi * meta / meta_epochs)) / 2
    warmup_steps = warmup_meta * steps_per_meta
    if step < warmup_steps:
        top = floor + (1 - floor) * (1 + math.cos(math.pi * warmup_meta / meta_epochs)) / 2
        return 0.1 + (top - 0.1) * step / warmup_steps
    return cosine


class FlowScorer(nn.Module):
    """Conditional flows + calibration: feature maps -> calibrated anomaly map at input size.

    The calibration buffers hold each level's reference log-likelihood, the low/high values of
    the map on normal training images and, per pixel, the normal level there (position_low, zero
    when off); they are in the state dict, so a loaded model scores exactly as the trained one did.

    Why a per-pixel level for the image score, on top of the positional condition: the flows model
    every position with one network, and on KolektorSDD good parts scored highest along the image's
    edges (the commutator's bright slot, the border), above many hairline cracks. The level is
    never below 0, so it only lowers places where good parts score high; on a centred object with a
    plain background it is near 0 almost everywhere. It enters the image score, not the map:
    subtracted from the map it also lowered real defects' pixels on MVTec bottle, where good parts
    vary most where defects lie (pixel AUPR 77.9 -> 34, measured on one seed-0 cflow model).
    """

    def __init__(self, flows: ConditionalFlows, input_size: tuple[int, int], sigma: float, reduction: str, stride: int = 1) -> None:
        super().__init__()
        self.flows = flows
        self.input_size = tuple(input_size)
        self.sigma = sigma
        self.stride = stride  # the levels are summed and smoothed at 1/stride of input_size (CFlowConfig.flow_map_stride)
        self.reduction = reduction
        self.area = footprint(sigma)  # for the `top` image score
        self.register_buffer("level_reference", torch.zeros(len(flows.flows)))
        self.register_buffer("map_low", torch.tensor(0.0))
        self.register_buffer("map_high", torch.tensor(1.0))
        self.register_buffer("position_low", torch.zeros(self.input_size))

    def raw_map(self, log_likelihoods: Sequence[torch.Tensor]) -> torch.Tensor:
        """The levels' map, smoothed, at input size. With a stride the sum and the smoothing (sigma /
        stride) run on the smaller grid and one upsampling follows: on MVTec bottle, KolektorSDD and
        elpv the metrics of six saved models moved by at most 0.11 points, their decisions not at all."""
        small = (self.input_size[0] // self.stride, self.input_size[1] // self.stride)
        smoothed = smooth(flow_anomaly_map(log_likelihoods, self.level_reference, small), self.sigma / self.stride)
        return smoothed if self.stride == 1 else upsample(smoothed, self.input_size)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return normalise(self.raw_map(self.flows(features)), self.map_low, self.map_high)

    def image_score(self, maps: torch.Tensor) -> torch.Tensor:
        """The image score of what lies above each pixel's normal level."""
        return self.reduce(maps - self.position_low)

    def reduce(self, maps: torch.Tensor) -> torch.Tensor:
        """The configured image score (max, mean or top) of maps on this scorer's grid."""
        return image_scores(maps, self.reduction, self.area)

    @torch.no_grad()
    def calibrate(self, features: Sequence[torch.Tensor], position: bool, chunk: int = 16) -> torch.Tensor:
        """Per-level references, the map's low (mean) and high (max) from normal features, and with
        `position` each pixel's normal level (mean + POSITION_SPREAD sd of the calibrated maps).
        Returns those images' calibrated maps (what forward() gives for them)."""
        self.eval()
        n_images = features[0].shape[0]
        level_ll = [
            torch.cat([self.flows.level_log_likelihood(level, f[i:i + chunk]) for i in range(0, n_images, chunk)])
            for level, f in enumerate(features)
        ]
        self.level_reference.copy_(torch.stack([ll.max() for ll in level_ll]))
        raw = torch.cat([self.raw_map([ll[i:i + chunk] for ll in level_ll]) for i in range(0, n_images, chunk)])
        self.map_low.copy_(raw.mean())
        self.map_high.copy_(raw.max())
        normal = normalise(raw, self.map_low, self.map_high)
        self.position_low.zero_()
        if position:
            level = normal.mean(dim=0) + POSITION_SPREAD * normal.std(dim=0, correction=0)
            self.position_low.copy_(level.clamp_min(0.0))
        return normal


class FlowMapModel(nn.Module):
    """Extractor + flow scorer: images -> {"map": calibrated anomaly map, "score", "frame": guard deviations}."""

    def __init__(self, extractor: FeatureExtractor, scorer: FlowScorer) -> None:
        super().__init__()
        self.extractor = extractor
        self.scorer = scorer
        self.guard = FrameGuard(extractor.channels[-1])

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.extractor(images)
        anomaly_map = self.scorer(features)
        return {"map": anomaly_map, "score": self.scorer.image_score(anomaly_map), "frame": self.guard(images, features[-1])}

    def normal_level(self) -> torch.Tensor:
        """Each pixel's normal level, which the image score is taken above (zero: the map itself)."""
        return self.scorer.position_low


@torch.no_grad()
def collect_features(
    features_of: Callable[[torch.Tensor], Sequence[torch.Tensor]], batches: Iterable[torch.Tensor], device: torch.device
) -> list[torch.Tensor]:
    """Per-level features of every image batch, concatenated over batches, on the device."""
    per_level: list[list[torch.Tensor]] = []
    for images in batches:
        features = features_of(images.to(device, non_blocking=True))
        per_level = per_level or [[] for _ in features]
        for level, feature in enumerate(features):
            per_level[level].append(feature)
    return [torch.cat(level) for level in per_level]


def vectors_per_epoch(config: CFlowConfig, level_counts: Sequence[int]) -> int:
    """How many vectors every level draws in one epoch: epoch_vectors, capped at the largest level's count."""
    largest = max(level_counts)
    return min(config.epoch_vectors or largest, largest)


def train_flows(
    flows: ConditionalFlows, features: Sequence[torch.Tensor], config: CFlowConfig, progress: bool
) -> list[float]:
    """Maximum likelihood on random batches of cached feature vectors; returns loss per epoch
    (the mean over levels).

    Every level takes the same number of steps per epoch. Drawing each level's vectors once per
    epoch instead leaves a coarse level (a few vectors per image) with a few dozen steps in all and
    its flow far from fitted: on MVTec bottle the stride-32 flow's NLL per dimension on held-out
    good images was 1.21 after the 48 steps that gave it, 0.11 after 1,000 (benchmarks/flow_steps_bottle.py).
    The levels' flows share nothing, so each trains with its own optimizer, schedule and random
    stream, and on a CPU they train side by side, one per core (see level_workers, CoreShares). With bf16
    training (config.train_precision) the coupling subnetworks' matrix products, most of a step's
    arithmetic, run in bfloat16; the likelihood itself stays float32 (heads/flows.py).
    """
    device = features[0].device
    levels = len(features)
    seeds = torch.randint(2**62, (levels,)).tolist()  # from the global stream, so the seed fixes every level
    per_epoch = vectors_per_epoch(config, [f.shape[0] * f.shape[2] * f.shape[3] for f in features])
    epochs = config.meta_epochs * config.sub_epochs
    workers = level_workers(device, levels)
    threads = torch.get_num_threads()
    cores = CoreShares(threads, workers, levels)
    bar = tqdm(total=levels * epochs, desc="train flows", unit="level-epoch", disable=not progress)

    def train(level: int) -> list[float]:
        cores.take_share()  # before this thread's first torch operation (see CoreShares)
        generator = torch.Generator(device).manual_seed(seeds[level])
        try:
            return train_level(flows, level, features[level], per_epoch, config, generator, bar.update, cores.take_share)
        finally:
            cores.level_done()

    # the costliest level (most channels: a step costs ~channels^2, every level takes as many steps)
    # trains in this thread, the others in the pool beside it; only this thread's share grows (CoreShares)
    order = sorted(range(levels), key=lambda level: -features[level].shape[1])
    mine, theirs = (order[:1], order[1:]) if workers > 1 else (order, [])
    flows.train()
    try:
        with bf16_subnets(flows, use_bf16(config.train_precision, device)), ThreadPoolExecutor(max(1, workers - 1)) as pool:
            others = pool.map(train, theirs)
            losses = dict(zip(mine + theirs, [train(level) for level in mine] + list(others)))
    finally:
        torch.set_num_threads(threads)
        bar.close()
    flows.eval()
    return [sum(losses[level][epoch] for level in range(levels)) / levels for epoch in range(epochs)]


class CoreShares:
    """The CPU threads of levels training side by side. torch's thread count is per thread: each
    level's thread takes its share before its first operation and before every step, so the
    costliest level, trained by the thread that made this (train_flows' caller) and left last,
    takes the cores the finished ones freed. On bottle the stride-32 level (320 channels) is the
    longest by far, and it used to finish alone on one core while the other idled for the last ~45%
    of the flows' time; a step of it takes 48 ms with one thread and 29 with two (2-core Xeon).
    Two rules make the second core pay: only the owner's team grows, and a pool thread takes its
    share before any operation. A team made by another thread makes libgomp manage more threads
    than there are cores, and from then on every team sleeps between parallel regions instead of
    spinning (a 2-thread step in a pool thread took 54-57 ms). On that Xeon a step's loss and
    gradients come out the same to the bit with 1 or 2 threads, so the weights do not depend on
    when the share changes; where a BLAS splits its sums differently by thread count, runs agree to
    float rounding only."""

    def __init__(self, threads: int, workers: int, levels: int) -> None:
        self.threads, self.workers, self.levels, self.unfinished = threads, workers, levels, levels
        self.owner = threading.current_thread()  # the thread that trains the costliest level
        self.lock = threading.Lock()

    def take_share(self) -> None:
        """Sets the calling thread's torch threads to its share of the cores now: the owner's grows
        as levels finish, a pool thread's stays its first (a team it grew would slow every team)."""
        busy = self.unfinished if threading.current_thread() is self.owner else self.levels
        share = max(1, self.threads // max(1, min(self.workers, busy)))
        if torch.get_num_threads() != share:
            torch.set_num_threads(share)

    def level_done(self) -> None:
        with self.lock:
            self.unfinished -= 1


def level_workers(device: torch.device, levels: int) -> int:
    """How many flow levels train at once. A flow step is hundreds of small operations that torch's
    threads barely share: on 2 cores one level's step took 13.1 / 15.2 / 32.1 ms (strides 8 / 16 /
    32) with 2 threads and 12.9 / 18.9 / 39.3 with 1, and two 1-thread runs side by side kept that
    speed. So on a CPU each core trains a level of its own; on a GPU they stay one after another."""
    return max(1, min(levels, torch.get_num_threads())) if device.type == "cpu" else 1


def step_in_turn(step: int, level: int, levels: int, level_steps: int) -> int:
    """The step a level's `step` was when the levels trained one after another, an epoch of
    `level_steps` steps each in turn. The schedule runs on it, so training the levels side by side
    keeps every level's learning rate of then, warm-up included: on bottle (seeds 0, 1) the held-out
    NLL per level stayed within 0.02 of before, where one schedule per level's own steps moved the
    stride-16 and stride-32 levels by up to 0.08 (their warm-up had come after the finer levels')."""
    epoch, within = divmod(step, level_steps)
    return (epoch * levels + level) * level_steps + within


def train_level(
    flows: ConditionalFlows, level: int, features: torch.Tensor, per_epoch: int, config: CFlowConfig,
    generator: torch.Generator, epoch_done: Callable[[], object], before_step: Callable[[], object],
) -> list[float]:
    """One level's flow, trained on `per_epoch` random vectors of its cached B x C x h x w features
    in each epoch; returns its loss per epoch. `before_step` runs before every step (CoreShares)."""
    device = features.device
    vectors = flows.neighbourhood_mean(features).permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    positions = features.shape[2] * features.shape[3]
    cond = flows.condition(features.shape[2], features.shape[3], device)
    params = list(flows.flows[level].parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, fused=True)  # one kernel for all parameters
    levels, level_steps = len(flows.flows), math.ceil(per_epoch / config.fiber_batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step_in_turn(step, level, levels, level_steps), levels * level_steps * config.sub_epochs,
                               config.meta_epochs, config.warmup_meta_epochs),
    )
    history = []
    for _ in range(config.meta_epochs * config.sub_epochs):
        total = torch.zeros((), device=device)  # summed on the device: no host sync per step
        passes = math.ceil(per_epoch / len(vectors))
        order = torch.cat([torch.randperm(len(vectors), device=device, generator=generator) for _ in range(passes)])
        for start in range(0, per_epoch, config.fiber_batch):
            before_step()
            index = order[start:min(start + config.fiber_batch, per_epoch)]
            loss = -flows.vector_log_likelihood(level, vectors[index], cond[index % positions]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.detach() * len(index)
        history.append(total.item() / per_epoch)
        epoch_done()
    return history


def build_flow_scorer(config: CFlowConfig, channels: Sequence[int]) -> FlowScorer:
    flows = ConditionalFlows(channels, config.condition_dim, config.coupling_blocks, config.clamp, config.flow_neighbourhood)
    return FlowScorer(flows, config.input_size, config.smoothing_sigma, config.image_score, config.flow_map_stride)


class RefitFlows:
    """For detectors whose flows sit on a frozen extractor (cflow, clscnf): refit_on, which export
    --int8 uses, and _settle_position_reference. The detector's _fit_flows(train, progress) fits
    the flows and all that is calibrated after them, the per-place level settled last."""

    position_standing: dict[bool, float] | None = None  # the synthetic defects' standing with / without the level, when auto measured it

    def refit_on(self, extractor: nn.Module, train: list[Sample], progress: bool) -> "Detector":
        """A copy whose flows, frame guard and thresholds are fitted again on what `extractor` (an
        INT8 one, at export) gives for the training images, as fit() fitted them on the fp32 ones:
        the flows then model the features the deployed extractor computes. Fitted on fp32 features,
        they read INT8 rounding (17-20% of the features' norm on MVTec bottle) as a defect: the INT8
        model's pixel AUPR was 40.93 against fp32's 78.05, and 78.37 with flows fitted on INT8
        features (seed 0, README). The copy keeps this model's extractor."""
        refit = copy.deepcopy(self)
        own = refit.model.extractor
        torch.manual_seed(self.config.seed)
        np.random.seed(self.config.seed)  # FrEIA draws the flows' soft permutations from numpy
        channels = [flow.shapes[0][0] for flow in refit.model.scorer.flows.flows]
        refit.model.scorer = build_flow_scorer(self.config, channels).to(self.device)
        refit.model.extractor = extractor
        try:
            refit._fit_flows(train, progress)
            refit._calibrate_guard(train)
            refit.thresholds = refit._choose_thresholds() if refit.validation is not None else None
        finally:
            refit.model.extractor = own
        refit._check_finite()
        refit.model.eval().requires_grad_(False)
        return refit

    @torch.no_grad()
    def _settle_position_reference(self) -> None:
        """position_reference auto -> on or off for this product, from the validation set; the
        config says which from then on (and a checkpoint keeps it).

        The per-place level trades sensitivity where good parts vary for fewer false alarms there.
        On KolektorSDD it lifted image AUROC from 87 to 96 (the bright slot and border of good
        parts); on MVTec bottle rotated and shifted at random, where the part moves from image to
        image, the level was high almost everywhere and at the operating threshold 13 of 63 defects
        passed as OK against 1 without it (cflow, seed 0). The threshold sits a few standard
        deviations above the held-out good images' scores, so what counts is how far defects stand
        above those scores in units of their spread: the level is kept where the synthetic defects'
        median standing, (score - mean) / sd of the held-out good images' scores, is at least as
        high with it as without. With fewer than STANDING_IMAGES held-out good images (or none) their
        spread is too loose to decide on, and it is kept (on).
        """
        c, level = self.config, self.model.normal_level()
        self.position_standing = None
        if c.position_reference != "auto":
            return
        keep = True
        validation = self.validation
        if validation is not None and len(validation.clean) >= STANDING_IMAGES and level.any():
            # the maps do not depend on the level: one pass each for the good images and the synthetic defects
            good = torch.from_numpy(self.predict_images(validation.clean).maps)
            made = torch.from_numpy(self.predict_images(validation.images[torch.from_numpy(validation.labels == 1)]).maps)
            self.position_standing = {use: self._defect_standing(good, made, level.cpu() if use else 0.0) for use in (True, False)}
            keep = self.position_standing[True] >= self.position_standing[False]
        if not keep:
            level.zero_()
        self.config = dataclasses.replace(c, position_reference="on" if keep else "off")

    def _defect_standing(self, good: torch.Tensor, made: torch.Tensor, level: torch.Tensor | float) -> float:
        """The synthetic defects' median (score - mean) / sd of the held-out good images' scores, from
        their maps (`made`, `good`), the image score taken above `level`."""
        reduce = self.model.scorer.reduce
        good_scores, made_scores = reduce(good - level), reduce(made - level)
        return float(np.median(((made_scores - good_scores.mean()) / good_scores.std().clamp_min(1e-12)).numpy()))


class CFlowDetector(RefitFlows, Detector):
    method = "cflow"
    config_class = CFlowConfig
    config: CFlowConfig

    def build_model(self, pretrained: bool) -> FlowMapModel:
        c = self.config
        extractor = self.build_extractor(pretrained)
        return FlowMapModel(extractor, build_flow_scorer(c, extractor.channels))

    def _fit(self, train: list[Sample], progress: bool) -> None:
        model = self.build_model(pretrained=True).to(self.device)
        model.extractor.requires_grad_(False)
        self.model = model
        self._fit_flows(train, progress)

    def _fit_flows(self, train: list[Sample], progress: bool) -> None:
        """The flows and their calibration, on the features the model's (frozen) extractor gives."""
        model = self.model
        start = time.perf_counter()
        # the next batch is decoded and resized in a thread while this one is extracted
        loader = self.loader(train)
        loaded = tqdm(prefetched(loader), total=len(loader), desc="extract features", disable=not progress, leave=False)
        batches = (batch["image"] for batch in loaded)
        features = collect_features(model.extractor.eval(), batches, self.device)
        self.fit_seconds["extract"] = time.perf_counter() - start
        start = time.perf_counter()
        self.loss_history = train_flows(model.scorer.flows, features, self.config, progress)
        model.scorer.calibrate(features, self.config.position_reference != "off")
        self._settle_position_reference()
        self.fit_seconds["flows"] = time.perf_counter() - start

"""DifferNet (Rudolph, Wandt, Rosenhahn, WACV 2021): an image-level normalizing flow on
multi-scale features.

Each image is described by one vector: the pooled last-level features of a pretrained
extractor at three image scales, concatenated (AlexNet in the paper: 3 x 256 = 768-d). A flow
maps these vectors of normal images to a standard normal; the anomaly score is the mean squared
norm of the latent over N rotated copies of the image. The map is the smoothed gradient of the
negative log-likelihood: the paper takes it with respect to the input pixels, here by default with
respect to the level-1 features (stride 4), which needs no backward pass through the stem and
first stage, at the highest resolutions (see `gradient_map`).

The extractor is frozen, so training vectors are computed once for a fixed number of random
rotations of each image (augment_copies) instead of once per epoch: the flow then trains on
cached vectors. The defaults are the paper's schedule cut for a CPU (4 x 8 epochs and 4 test
rotations, not 24 x 8 and 64; on KolektorSDD the paper's took 27 minutes to train and 1.1 s per
image). Scoring turns a batch into all its rotations and embeds them in a few forward passes;
rotation 0 is scored by the pass that computes the gradient map, which also feeds the guard.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn
from tqdm.auto import tqdm

from ..data.folder import AnomalyFolder, Sample, load_images
from ..errors import ConfigError
from ..features.extractor import FeatureExtractor
from ..heads.flows import bf16_subnets, image_flow
from ..heads.guard import FrameGuard
from ..metrics import image_auroc
from ..scoring import normalise, smooth
from .base import Detector, DetectorConfig, at_least, option, positive, use_bf16

SELECTIONS = ("last", "validation")
GRADIENT_MAPS = ("features", "input")
MAP_LEVEL = 1  # the level whose features the map's gradient is taken at: stride 4, finer than the map's smoothing
ROTATION_CHUNK = 32  # rotated images per forward pass when scoring: bounds memory (64 measured no faster on a CPU)


@dataclass
class DifferNetConfig(DetectorConfig):
    levels: tuple[int, ...] = option((4,), "backbone level pooled into the image vector (the last; alexnet: 2)")
    scales: tuple[float, ...] = option((1.0, 0.5, 0.25), "image scales relative to input_size (paper: 448, 224, 112 px)")
    coupling_blocks: int = option(8, "coupling blocks of the flow")
    clamp: float = option(3.0, "soft clamp of the affine coupling scales")
    subnet_width: int = option(2048, "hidden width of the coupling subnetworks")
    lr: float = option(2e-4, "Adam learning rate")
    meta_epochs: int = option(
        4, "meta-epochs (paper: 24; on MVTec bottle the test AUROC after meta-epochs 1-6 was 99.84, 99.92, 99.76, "
        "99.68, 99.68, 99.68: more epochs cost time, not errors)")
    sub_epochs: int = option(8, "passes over the cached training vectors per meta-epoch")
    vector_batch: int = option(64, "image vectors per optimisation step")
    augment_copies: int = option(8, "randomly rotated copies of each training image, computed once")
    flips: bool = option(False, "random flips as well as rotations")
    test_rotations: int = option(
        4, "rotations averaged in the score (paper: 64, each a forward pass per image; on MVTec bottle 8, 4, 2 and 1 "
        "gave test AUROC 99.68, 99.76, 99.76, 99.84, but 2 instead of 4 dropped it from 90.46 to 82.58 on KolektorSDD "
        "and from 88.64 to 86.97 on elpv)")
    select: str = option("last", "model to keep: the last, or the best on the synthetic validation set")
    gradient_map: str = option(
        "features", "the map is the NLL's gradient with respect to: features, the level-1 features (stride 4; its backward "
        "skips the stem, where most of it goes) or input, the pixels (the paper's). One model each, input -> features: "
        "bottle pixel AUROC / AUPR / AUPRO 84.08 / 22.33 / 31.19 -> 82.64 / 20.25 / 28.42, KolektorSDD 89.41 / 3.18 / "
        "67.76 -> 91.55 / 4.97 / 70.15 and 282.7 -> 221.3 ms per image; the score does not use the map")

    def validate(self) -> None:
        super().validate()
        if self.select not in SELECTIONS:
            raise ConfigError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if self.gradient_map not in GRADIENT_MAPS:
            raise ConfigError(f"gradient_map must be one of {GRADIENT_MAPS}, got {self.gradient_map!r}")
        if self.gradient_map == "features" and self.tile_size is not None:
            raise ConfigError("gradient_map features needs untiled extraction (each tile would give its own gradients): "
                              "with tile_size set, use gradient_map input.")
        at_least(self, 1, "coupling_blocks", "meta_epochs", "sub_epochs", "vector_batch", "augment_copies", "test_rotations",
                 "subnet_width")
        positive(self, "lr", "clamp")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"scales must be positive, got {self.scales}")


def rotations(count: int) -> list[float]:
    """count angles evenly spaced over the full circle, starting at 0."""
    return [360.0 * i / count for i in range(count)]


class DifferNetModel(nn.Module):
    """images -> {"score": mean squared latent norm over rotations, "map": NLL-gradient map, "frame": guard deviations}."""

    def __init__(self, extractor: FeatureExtractor, flow: nn.Module, config: DifferNetConfig) -> None:
        super().__init__()
        self.extractor = extractor
        self.flow = flow
        self.scales = tuple(config.scales)
        self.test_rotations = config.test_rotations
        self.sigma = config.smoothing_sigma
        self.gradient_map = config.gradient_map
        self.guard = FrameGuard(extractor.channels[-1])
        self.register_buffer("map_low", torch.tensor(0.0))
        self.register_buffer("map_high", torch.tensor(1.0))

    def scale_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Last-level feature maps of the images at each scale."""
        out = []
        for scale in self.scales:
            size = tuple(max(32, int(round(side * scale))) for side in images.shape[-2:])
            scaled = images if size == tuple(images.shape[-2:]) else F.interpolate(images, size=size, mode="bilinear", antialias=True)
            out.append(self.extractor(scaled)[-1])
        return out

    @staticmethod
    def pool(features: Sequence[torch.Tensor]) -> torch.Tensor:
        """B x D: feature maps average-pooled and concatenated (the image vector the flow sees)."""
        return torch.cat([f.mean(dim=(2, 3)) for f in features], dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B x D: last-level features at each scale, pooled."""
        return self.pool(self.scale_features(images))

    def embed_rotations(self, images: torch.Tensor, angles: Sequence[float]) -> torch.Tensor:
        """R x B x D: the embedding of every image turned by every angle, in forward passes of up to
        ROTATION_CHUNK images (one pass per rotation is mostly per-call overhead for a small batch)."""
        rotated = torch.cat([TF.rotate(images, angle) for angle in angles])  # rotation-major
        vectors = torch.cat([self.embed(part) for part in rotated.split(ROTATION_CHUNK)])
        return vectors.view(len(angles), len(images), -1)

    def latent_sq_norm(self, vectors: torch.Tensor) -> torch.Tensor:
        """Mean squared latent per dimension of ... x D vectors: the per-rotation anomaly score."""
        z, _ = self.flow(vectors.reshape(-1, vectors.shape[-1]))
        return z.pow(2).mean(dim=1).view(vectors.shape[:-1])

    def rotation_score(self, vectors: torch.Tensor) -> torch.Tensor:
        """The anomaly score from R x B x D vectors: the mean over rotations of the mean squared latent."""
        return self.latent_sq_norm(vectors).mean(dim=0)

    def _gradient_pass(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One pass with gradients at rotation 0: (raw map, rotation-0 score, scale-1 last-level
        features or None), so the map, the score's first rotation and the guard share one forward."""
        with torch.enable_grad():
            if self.gradient_map == "input":
                x = images.detach().clone().requires_grad_(True)
                features, wrt = self.scale_features(x), [x]
            else:  # one tapped level-1 tensor per scale
                with self.extractor.gradient_taps(MAP_LEVEL) as wrt:
                    features = self.scale_features(images)
            z, log_det = self.flow(self.pool(features))
            nll = 0.5 * z.pow(2).sum(dim=1) - log_det
            grads = torch.autograd.grad(nll.sum(), wrt)
        size = images.shape[-2:]
        raw = sum(g.abs().sum(dim=1) if g.shape[-2:] == size
                  else F.interpolate(g.abs().sum(dim=1, keepdim=True), size=size, mode="bilinear")[:, 0] for g in grads)
        full = features[self.scales.index(1.0)].detach() if 1.0 in self.scales else None
        return smooth(raw, self.sigma), z.detach().pow(2).mean(dim=1), full

    def raw_map(self, images: torch.Tensor) -> torch.Tensor:
        """|d NLL / d pixel| (or / d feature) summed over channels, at input size (summed over scales), smoothed."""
        return self._gradient_pass(images)[0]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raw, first, full = self._gradient_pass(images)
        angles = rotations(self.test_rotations)  # starts at 0: the gradient pass scored that one
        rest = self.latent_sq_norm(self.embed_rotations(images, angles[1:])).sum(dim=0) if len(angles) > 1 else 0.0
        full = self.extractor(images)[-1] if full is None else full
        return {"score": (first + rest) / len(angles), "map": normalise(raw, self.map_low, self.map_high),
                "frame": self.guard(images, full)}


class DifferNetDetector(Detector):
    method = "differnet"
    config_class = DifferNetConfig
    config: DifferNetConfig

    def build_model(self, pretrained: bool) -> DifferNetModel:
        c = self.config
        extractor = self.build_extractor(pretrained)
        dims = extractor.channels[-1] * len(c.scales)
        if c.gradient_map == "features":
            with extractor.gradient_taps(MAP_LEVEL), torch.no_grad():  # refuses a backbone whose level cannot be tapped, before training
                extractor(torch.zeros(1, 3, 64, 64))
        return DifferNetModel(extractor, image_flow(dims, c.coupling_blocks, c.clamp, c.subnet_width), c)

    def fit(self, data, progress: bool = True, log_test: bool = False) -> "DifferNetDetector":
        """Train; when data is a category folder with a test split and log_test is on, the test
        AUROC after every meta-epoch is logged in epoch_log (reporting only: it chooses nothing).
        Off by default: the test images' rotated vectors cost as much extraction as training's."""
        self._log_folder = data if isinstance(data, AnomalyFolder) and data.test and log_test else None
        return super().fit(data, progress)

    @torch.no_grad()
    def _vectors(self, images: torch.Tensor, angles: Sequence[float], flips: Sequence[bool]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.config.batch_size):
            batch = images[i:i + self.config.batch_size].to(self.device)
            batch = torch.stack([
                TF.rotate(TF.horizontal_flip(img) if flip else img, angle)
                for img, angle, flip in zip(batch, angles[i:i + len(batch)], flips[i:i + len(batch)])
            ])
            out.append(self.model.embed(batch))
        return torch.cat(out)

    @torch.no_grad()
    def _rotation_vectors(self, images: torch.Tensor, progress: bool, desc: str) -> torch.Tensor:
        """R x N x D cached vectors of each test rotation, so per-epoch scoring needs only the flow."""
        angles = rotations(self.config.test_rotations)
        return torch.cat([self.model.embed_rotations(batch.to(self.device), angles)
                          for batch in tqdm(images.split(self.config.batch_size), desc=desc, disable=not progress, leave=False)], dim=1)

    def _fit(self, train: list[Sample], progress: bool) -> None:
        c = self.config
        self.model = model = self.build_model(pretrained=True).to(self.device)
        model.extractor.requires_grad_(False)
        model.extractor.eval()
        generator = torch.Generator().manual_seed(c.seed)
        if c.select == "validation" and self.validation is None:
            raise ConfigError("select=validation needs a validation set: set val_fraction above 0 (and train on at least 4 images).")
        validation = None
        start = time.perf_counter()
        images = load_images(train, self.image_size, progress)
        count = len(images) * c.augment_copies
        angles = (torch.rand(count, generator=generator) * 360).tolist()
        flips = (torch.rand(count, generator=generator) < 0.5).tolist() if c.flips else [False] * count
        vectors = self._vectors(images.repeat(c.augment_copies, 1, 1, 1), angles, flips)
        if c.select == "validation":
            validation = self._rotation_vectors(self.validation.images, progress, "validation vectors")
        test = None
        if self._log_folder is not None:
            test_images = load_images(self._log_folder.test, self.image_size, progress)
            test = (self._rotation_vectors(test_images, progress, "test vectors"),
                    np.array([s.label for s in self._log_folder.test]))
        self.fit_seconds["extract"] = time.perf_counter() - start

        start = time.perf_counter()
        optimizer = torch.optim.Adam(model.flow.parameters(), lr=c.lr, betas=(0.8, 0.8), eps=1e-4, weight_decay=1e-5, fused=True)
        bf16 = use_bf16(c.train_precision, self.device)
        self.epoch_log: list[dict] = []
        best = (-1.0, None)
        bar = tqdm(range(c.meta_epochs), desc="train flow", disable=not progress)
        for meta in bar:
            model.flow.train()
            total = torch.zeros((), device=self.device)  # summed on the device: no host sync per step
            with bf16_subnets(model.flow, bf16):  # training only: the per-epoch scores below are float32
                for _ in range(c.sub_epochs):
                    order = torch.randperm(len(vectors), generator=generator)
                    for s in range(0, len(order), c.vector_batch):
                        z, log_det = model.flow(vectors[order[s:s + c.vector_batch]])
                        loss = (0.5 * z.pow(2).sum(dim=1) - log_det).mean() / z.shape[1]
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        total += loss.detach() * len(z)
            model.flow.eval()
            record = {"meta_epoch": meta + 1, "nll": total.item() / (len(vectors) * c.sub_epochs)}
            if validation is not None:
                record["val_auroc"] = image_auroc(self.validation.labels, self._score_cached(validation))
                if record["val_auroc"] > best[0]:
                    best = (record["val_auroc"], copy.deepcopy(model.flow.state_dict()))
            if test is not None:
                record["test_auroc"] = image_auroc(test[1], self._score_cached(test[0]))
            self.epoch_log.append(record)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "meta_epoch"})
        if best[1] is not None:
            model.flow.load_state_dict(best[1])
        # held-out good images when there are some: at training images the flow sits at its optimum
        # and their gradients are orders of magnitude smaller than on any unseen good image
        self._calibrate_map(images[: min(len(images), 16)] if self.validation is None else self.validation.clean)
        self.fit_seconds["flow"] = time.perf_counter() - start

    @torch.no_grad()
    def _score_cached(self, per_rotation: torch.Tensor) -> np.ndarray:
        return self.model.rotation_score(per_rotation).cpu().numpy()

    def _calibrate_map(self, images: torch.Tensor) -> None:
        """Map low/high: mean and max of the gradient map on normal images."""
        raw = torch.cat([self.model.raw_map(images[i:i + 8].to(self.device)) for i in range(0, len(images), 8)])
        self.model.map_low.fill_(raw.mean().item())
        self.model.map_high.fill_(raw.max().item())

    def epoch_summary(self) -> dict:
        """The form DifferNet's users report: AUROC at each meta-epoch, the last, the best and its epoch."""
        aurocs = [r.get("test_auroc") for r in self.epoch_log]
        if not aurocs or aurocs[0] is None:
            return {}
        best = int(np.argmax(aurocs))
        return {"per_epoch": aurocs, "last": aurocs[-1], "best": aurocs[best], "best_epoch": best + 1}

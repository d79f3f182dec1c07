"""The system of Oh & Kim (IEEE Access 2024), here `clscnf`: a pixelwise classifier trained on
synthetic defects fine-tunes the extractor, conditional flows then model normal features (of
that fine-tuned, frozen extractor in the paper; see Sharing for the default), and the two maps
are fused.

Stage 1: the decoder learns on synthetic defects with the extractor frozen, then both learn
together (lower learning rate for the extractor; BatchNorm statistics stay frozen). Stage 2:
flows are trained on cached features of normal images. A synthetic validation set, built from
held-out training images, picks the best stage-1 epoch; the test set is never used to choose
anything.

Fusion. The paper adds the classifier map to the flow map with a weight tuned on the synthetic
validation set (`fusion tuned`: the raw heads, the weight of FUSION_WEIGHTS that scores best).
Such a weight favours the head that learned the synthetic defects: it took the top of the grid,
10, on MVTec bottle and on elpv, where the fused map then scored far below the flow head alone.
By default (`fusion calibrated`) each head is put on one scale measured on good images the model
never trained on (the held-out images before their synthetic defects: 0 at their median pixel, 1
at their largest), then the two are added, `fusion_weight` (default 1) weighing the classifier:
nothing about the weight is learned from synthetic defects. Measured on one training each (seed
0), tuned -> calibrated image AUROC: bottle 99.76 -> 99.92, elpv 79.86 -> 86.19 (flow head alone
87.64), KolektorSDD 91.19 -> 92.80; pixel AUPR bottle 81.68 -> 82.20 but KolektorSDD 32.72 -> 25.24.

Sharing. On every product measured (bottle, KolektorSDD, elpv) the flows fitted the ImageNet
extractor's features better than the fine-tuned ones (KolektorSDD flow-head AUPRO 76.29 shared,
88.07 on ImageNet features), while fine-tuning helped the classifier on bottle and elpv. So by
default the heads share what fine-tuning leaves alone and part where it starts: one pass through
the stem and the untuned shallow stages (most of a pass: the highest resolutions) feeds both; the
classifier reads the fine-tuned deeper stages, the flows the same stages with ImageNet weights,
run from the shared stage's output (`ClsCNFModel.branch`). That scored at or above the paper's
shared system on all four metrics of all three products and above cflow on KolektorSDD
(benchmarks/README.md, "what the shared, fine-tuned extractor costs the flows"); `shared=True` is
the paper's system.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.folder import Sample, load_images
from ..data.synthetic import DefectSynthesizer, SyntheticBatches, TextureSource
from ..errors import ConfigError
from ..features.extractor import FeatureExtractor
from ..heads.classifier import LOSSES, SegmentationDecoder, segmentation_loss
from ..heads.guard import FrameGuard
from ..metrics import compute_metrics
from ..scoring import image_scores, normalise
from .base import Detector, at_least, option, positive, train_autocast
from .cflow import POSITION_SPREAD, CFlowConfig, FlowScorer, RefitFlows, build_flow_scorer, collect_features, train_flows

FUSION_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0)
FUSIONS = ("calibrated", "tuned")


@dataclass
class ClsCNFConfig(CFlowConfig):
    decoder_levels: tuple[int, ...] = option((0, 1, 2, 3, 4), "backbone levels the classifier decodes (skip connections)")
    decoder_width: int = option(64, "channels of the decoder's deepest stage")
    cls_loss: str = option("bce", "classifier loss on soft targets: bce (the paper's), focal or dice")
    cls_lr: float = option(1e-3, "Adam learning rate of the decoder")
    extractor_lr_factor: float = option(0.1, "extractor learning rate as a share of cls_lr when fine-tuning")
    frozen_epochs: int = option(4, "stage-1 epochs with the extractor frozen")
    joint_epochs: int = option(16, "stage-1 epochs fine-tuning extractor and decoder together")
    tune_from_level: int | None = option(
        None, "fine-tune the extractor from this level's stage up; the stem and shallower stages keep their ImageNet "
        "weights and one pass through them feeds both heads (None: the shallowest flow level; 0: all, the paper's)")
    cls_batch_size: int = option(8, "images per classifier training step")
    defect_probability: float = option(0.5, "share of training images given a synthetic defect")
    fusion: str = option("calibrated", "calibrated: both heads on one scale from held-out good images, then added; "
                                            "tuned (the paper's): raw heads, the classifier's weight tuned on the synthetic validation set")
    fusion_weight: float | None = option(None, "weight of the classifier map in the fused map (default: 1 calibrated, tuned when tuned)")
    shared: bool = option(False, "flows on the fine-tuned extractor, the paper's shared system (off: the flows keep ImageNet weights "
                                 "from the fine-tuned stages up, branching off the untuned shallow stages both heads share)")

    @classmethod
    def from_json(cls, data: dict) -> "ClsCNFConfig":
        """Checkpoints from before calibrated fusion fused the raw heads with a tuned weight."""
        return super().from_json({"fusion": "tuned", **data})

    def validate(self) -> None:
        super().validate()
        if self.cls_loss not in LOSSES:
            raise ConfigError(f"cls_loss must be one of {LOSSES}, got {self.cls_loss!r}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if not 0.0 <= self.defect_probability <= 1.0:
            raise ConfigError(f"defect_probability must be in [0, 1], got {self.defect_probability}")
        at_least(self, 1, "cls_batch_size", "decoder_width")
        at_least(self, 0, "frozen_epochs", "joint_epochs", "extractor_lr_factor")
        if self.tune_from_level is not None:
            at_least(self, 0, "tune_from_level")
        positive(self, "cls_lr")
        if self.frozen_epochs + self.joint_epochs < 1:
            raise ConfigError("frozen_epochs + joint_epochs must be at least 1: with none, the classifier would stay untrained")
        if not self.decoder_levels or min(self.decoder_levels) < 0:
            raise ConfigError(f"decoder_levels must name backbone stages 0, 1, 2, ...; got {list(self.decoder_levels)}")
        if self.fusion_weight is not None and self.fusion_weight < 0:
            raise ConfigError(f"fusion_weight must be at least 0, got {self.fusion_weight}")


class ClsCNFModel(nn.Module):
    """images -> {"map": fused, "score", "flow": calibrated flow map, "classifier": defect probability, "frame": guard deviations}.

    One pass through the extractor feeds both heads when shared. Otherwise the flows have an
    extractor of their own, with ImageNet weights; `branch` = (level, index among the extractor's
    outputs) names the deepest stage fine-tuning left at ImageNet weights, from whose output the
    flows' extractor goes on alone, so the stem and shallow stages still run once for both heads;
    flow levels up to that stage (flow_index) then come from the shared pass itself.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        decoder: SegmentationDecoder,
        scorer: FlowScorer,
        flow_index: Sequence[int],
        decoder_index: Sequence[int],
        input_size: tuple[int, int],
        flow_extractor: FeatureExtractor | None = None,
        branch: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.decoder = decoder
        self.scorer = scorer
        self.flow_extractor = flow_extractor
        self.branch = branch
        self.flow_index = tuple(flow_index)
        self.decoder_index = tuple(decoder_index)
        self.input_size = tuple(input_size)
        self.guard = FrameGuard(extractor.channels[-1])
        self.register_buffer("fusion_weight", torch.tensor(1.0))
        # each head's (0, 1) points in the fused map, per head (flow, classifier); identity until calibrated
        self.register_buffer("head_low", torch.zeros(2))
        self.register_buffer("head_high", torch.ones(2))
        # each pixel's normal level in the fused map: the image score is taken from what lies above it
        self.register_buffer("fused_low", torch.zeros(self.input_size))

    def classifier_logits(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decoder([features[i] for i in self.decoder_index], self.input_size)

    def flow_features(self, images: torch.Tensor, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        shared = [features[i] for i in self.flow_index]
        if self.flow_extractor is None:
            return shared
        if self.branch is not None:
            level, index = self.branch
            return shared + self.flow_extractor.forward_after(level, features[index])
        return self.flow_extractor(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.extractor(images)
        classifier = torch.sigmoid(self.classifier_logits(features))[:, 0]
        flow = self.scorer(self.flow_features(images, features))
        flow_part, classifier_part = (normalise(head, low, high) for head, low, high in zip((flow, classifier), self.head_low, self.head_high))
        fused = flow_part + self.fusion_weight * classifier_part
        return {"map": fused, "score": self.scorer.reduce(fused - self.fused_low), "flow": flow,
                "classifier": classifier, "frame": self.guard(images, features[-1])}

    def normal_level(self) -> torch.Tensor:
        """Each pixel's normal level in the fused map, which the image score is taken above."""
        return self.fused_low

    def head_scales(self) -> torch.Tensor:
        """What each head's raw map (flow, classifier) is multiplied by in the fused map."""
        return torch.stack([torch.ones_like(self.fusion_weight), self.fusion_weight]) / (self.head_high - self.head_low).clamp_min(1e-12)

    def fused_level(self, moments: torch.Tensor) -> torch.Tensor:
        """Each pixel's normal level in the fused map (mean + POSITION_SPREAD sd, as the flow head's),
        from the heads' per-pixel moments on normal images (see `pixel_moments`) and the fusion in the model."""
        scale = self.head_scales().double()
        mean_flow, mean_classifier, flow_flow, classifier_classifier, flow_classifier = moments.double()
        mean = scale[0] * (mean_flow - self.head_low[0]) + scale[1] * (mean_classifier - self.head_low[1])
        variance = (scale[0] ** 2 * (flow_flow - mean_flow ** 2) + scale[1] ** 2 * (classifier_classifier - mean_classifier ** 2)
                    + 2 * scale[0] * scale[1] * (flow_classifier - mean_flow * mean_classifier))
        return (mean + POSITION_SPREAD * variance.clamp_min(0.0).sqrt()).clamp_min(0.0).to(self.fused_low.dtype)


def pixel_moments(flow: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Per-pixel sums of the two heads' maps over images (B x H x W each): f, c, f f, c c, f c, stacked.
    Divided by the number of images they give the mean and sd of any weighted sum of the heads."""
    flow, classifier = flow.double(), classifier.double()
    return torch.stack([flow.sum(0), classifier.sum(0), (flow * flow).sum(0), (classifier * classifier).sum(0),
                        (flow * classifier).sum(0)])


def validation_score(labels: np.ndarray, masks: np.ndarray, maps: np.ndarray) -> float:
    """What selection maximises: the mean of the four reported metrics on the validation set."""
    scores = image_scores(torch.from_numpy(maps)).numpy()
    return float(np.mean([value or 0.0 for value in compute_metrics(labels, scores, masks, maps).values()]))


class ClsCNFDetector(RefitFlows, Detector):
    method = "clscnf"
    config_class = ClsCNFConfig
    config: ClsCNFConfig
    _normal_moments: torch.Tensor | None = None  # the heads' per-pixel moments on the training images, from fit()

    # -- model ---------------------------------------------------------------------------------
    def _levels(self) -> tuple[tuple[int, ...], list[int], list[int]]:
        c = self.config
        union = tuple(sorted(set(c.levels) | set(c.decoder_levels))) if c.shared else tuple(c.decoder_levels)
        return union, [union.index(l) for l in c.levels] if c.shared else [], [union.index(l) for l in c.decoder_levels]

    def build_model(self, pretrained: bool) -> ClsCNFModel:
        c = self.config
        union, flow_index, decoder_index = self._levels()
        extractor = self.build_extractor(pretrained, union)
        flow_extractor, branch = None, None
        if not c.shared:
            flow_extractor, branch, flow_index = self._flow_extractor(pretrained, union)
        flow_channels = [extractor.channels[i] for i in flow_index] + list(flow_extractor.channels if flow_extractor else [])
        decoder = SegmentationDecoder([extractor.channels[i] for i in decoder_index], c.decoder_width)
        scorer = build_flow_scorer(c, flow_channels)  # the same flows and calibration as CFlow-AD
        return ClsCNFModel(extractor, decoder, scorer, flow_index, decoder_index, c.input_size, flow_extractor, branch)

    def _flow_extractor(self, pretrained: bool, union: tuple[int, ...]) -> tuple[FeatureExtractor | None, tuple[int, int] | None, list[int]]:
        """The flows' ImageNet extractor when not shared, the branch it resumes from, and which of
        the main extractor's outputs (indices in `union`) the flows read directly: the flow levels
        fine-tuning leaves at ImageNet weights, when the branch can start at or after them."""
        level = self._tune_from_level() - 1  # the deepest stage that keeps its ImageNet weights
        untuned = [l for l in self.config.levels if l <= level]
        deeper = [l for l in self.config.levels if l > level]
        # timm draws a random init before loading the weights: keep the stream, so stage 1 trains as when shared
        with torch.random.fork_rng(devices=[]):
            if level in union and set(untuned) <= set(union):
                if not deeper:  # every flow level untuned: the shared pass gives them all
                    return None, None, [union.index(l) for l in untuned]
                flow_extractor = self.build_extractor(pretrained, deeper)
                if flow_extractor.resumes_after(level):
                    return flow_extractor, (level, union.index(level)), [union.index(l) for l in untuned]
            return self.build_extractor(pretrained), None, []  # a whole pass of its own for every flow level

    @classmethod
    def from_checkpoint(cls, meta: dict, state: dict[str, torch.Tensor], device: str | None) -> "ClsCNFDetector":
        detector = super().from_checkpoint(meta, state, device)
        if "fused_low" not in state:  # saved before the fused map had its own level: the flow head's, on its fused scale
            model = detector.model
            model.fused_low.copy_(model.scorer.position_low * model.head_scales()[0])
        return detector

    # -- training ------------------------------------------------------------------------------
    def fit(self, data, progress: bool = True, classifier_from: "ClsCNFDetector | None" = None) -> "ClsCNFDetector":
        """Train both stages; classifier_from reuses another clscnf detector's trained stage 1
        (same backbone, levels and tune_from_level), e.g. to build the paper's shared system beside
        the default without training stage 1 twice."""
        if classifier_from is not None and classifier_from._tune_from_level() != self._tune_from_level():
            raise ConfigError(f"classifier_from fine-tuned from level {classifier_from._tune_from_level()}, this detector from "
                              f"{self._tune_from_level()}: give both the same tune_from_level")
        self._classifier_from = classifier_from
        return super().fit(data, progress)

    def _fit(self, train: list[Sample], progress: bool) -> None:
        c = self.config
        model = self.build_model(pretrained=True).to(self.device)
        self.model = model
        start = time.perf_counter()
        images = load_images(train, self.image_size, progress)
        source = TextureSource(self.image_size, c.texture_dir, normal_images=images)
        synthesizer = DefectSynthesizer(source, c.defect_probability, use_foreground=c.foreground)
        self.fit_seconds["prepare"] = time.perf_counter() - start

        start = time.perf_counter()
        if self._classifier_from is not None:
            donor = self._classifier_from._require_model()
            model.extractor.load_state_dict(donor.extractor.state_dict())
            model.decoder.load_state_dict(donor.decoder.state_dict())
            self.classifier_history = list(getattr(self._classifier_from, "classifier_history", []))  # none when loaded
        else:
            self.classifier_history = self._train_classifier(images, synthesizer, progress)
        self.fit_seconds["classifier"] = time.perf_counter() - start
        self._fit_flows(train, progress, images)

    def _fit_flows(self, train: list[Sample], progress: bool, images: torch.Tensor | None = None) -> None:
        """Stage 2 on the trained (frozen) extractor and decoder: the flows, their calibration, the
        heads' fusion and the fused map's normal level. `images`: the training images, if loaded."""
        c, model = self.config, self.model
        images = load_images(train, self.image_size, progress) if images is None else images
        start = time.perf_counter()
        for frozen in (model.extractor, model.decoder, model.flow_extractor):
            if frozen is not None:
                frozen.requires_grad_(False)
        model.eval()
        classifier_maps: list[torch.Tensor] = []

        def features_of(batch: torch.Tensor) -> list[torch.Tensor]:
            features = model.extractor(batch)
            if c.position_reference != "off":  # for the fused map's level
                classifier_maps.append(torch.sigmoid(model.classifier_logits(features))[:, 0].cpu())
            return model.flow_features(batch, features)

        features = collect_features(features_of, images.split(c.batch_size), self.device)
        self.loss_history = train_flows(model.scorer.flows, features, c, progress)
        flow_maps = model.scorer.calibrate(features, c.position_reference != "off")
        self._normal_moments = None
        if c.position_reference != "off":
            # the heads' per-pixel moments over these images: what places the fused map's normal level for any fusion
            classifier, chunk = torch.cat(classifier_maps), c.batch_size
            self._normal_moments = sum(pixel_moments(flow_maps[i:i + chunk].cpu(), classifier[i:i + chunk])
                                       for i in range(0, len(classifier), chunk)) / len(classifier)
        self.fit_seconds["flows"] = time.perf_counter() - start

        self._fuse(c.fusion)
        self._settle_position_reference()
        model.eval()

    def _tune_from_level(self) -> int:
        c = self.config
        return min(c.levels) if c.tune_from_level is None else c.tune_from_level

    def _train_classifier(self, images: torch.Tensor, synthesizer: DefectSynthesizer, progress: bool) -> list[dict]:
        """Stage 1; keeps the weights of the epoch that scores best on the validation set."""
        c, model = self.config, self.model
        decoder_params = list(model.decoder.parameters())
        # the stem and shallow stages work at the highest resolutions: not fine-tuning them cut a
        # joint step at 256 x 256 from 70.0 to 55.0 ms per image (lite0, levels 0-1 kept)
        kept = {id(p) for p in model.extractor.parameters_before(self._tune_from_level())}
        extractor_params = [p for p in model.extractor.parameters() if id(p) not in kept]
        optimizer = torch.optim.Adam([
            {"params": decoder_params, "lr": c.cls_lr},
            {"params": extractor_params, "lr": c.cls_lr * c.extractor_lr_factor},
        ], fused=True)
        history: list[dict] = []
        best_score, best_state = -1.0, None
        epochs = c.frozen_epochs + c.joint_epochs
        made = SyntheticBatches(images, synthesizer, c.seed, epochs, c.cls_batch_size)
        batches = iter(DataLoader(made, batch_size=None, num_workers=c.num_workers, pin_memory=self.device.type == "cuda"))
        bar = tqdm(range(epochs), desc="train classifier", disable=not progress)
        for epoch in bar:
            joint = epoch >= c.frozen_epochs
            model.extractor.requires_grad_(False)
            for parameter in extractor_params:
                parameter.requires_grad_(joint)
            model.extractor.train(joint)
            model.decoder.train()
            total = torch.zeros((), device=self.device)  # summed on the device: no host sync per step
            for batch, target in itertools.islice(batches, made.steps_per_epoch):
                batch, target = batch.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
                with train_autocast(c.train_precision, self.device, model.extractor):
                    with torch.set_grad_enabled(joint):
                        features = model.extractor(batch)
                    logits = model.classifier_logits(features)
                loss = segmentation_loss(logits.float(), target, c.cls_loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(batch)
            record = {"epoch": epoch + 1, "joint": joint, "loss": total.item() / len(images)}
            if self.validation is not None:
                record["val_score"] = self._classifier_validation_score()
                if record["val_score"] > best_score:
                    best_score = record["val_score"]
                    best_state = copy.deepcopy({"extractor": model.extractor.state_dict(), "decoder": model.decoder.state_dict()})
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{record.get('val_score', float('nan')):.3f}")
        if best_state is not None:
            model.extractor.load_state_dict(best_state["extractor"])
            model.decoder.load_state_dict(best_state["decoder"])
        model.extractor.requires_grad_(False)
        return history

    @torch.no_grad()
    def _validation_maps(self, with_flow: bool, images: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Classifier maps (and flow maps, once the flows are trained) of the validation images (or `images`)."""
        model = self.model
        model.eval()
        outputs: dict[str, list[torch.Tensor]] = {}
        for batch in (self.validation.images if images is None else images).split(self.config.batch_size):
            batch = batch.to(self.device)
            features = model.extractor(batch)
            outputs.setdefault("classifier", []).append(torch.sigmoid(model.classifier_logits(features))[:, 0].cpu())
            if with_flow:
                outputs.setdefault("flow", []).append(model.scorer(model.flow_features(batch, features)).cpu())
        return {name: torch.cat(values).numpy() for name, values in outputs.items()}

    def _classifier_validation_score(self) -> float:
        maps = self._validation_maps(with_flow=False)["classifier"]
        return validation_score(self.validation.labels, self.validation.masks.numpy(), maps)

    def set_fusion(self, fusion: str) -> None:
        """Fuse the heads of a detector trained here the other way (e.g. to compare the two fusions of
        one training). It needs the validation set fit() built: a loaded detector has none, and
        re-fusing it would drop its calibration. The operating thresholds are chosen again: the
        fused scores moved under them."""
        if self.validation is None:
            raise ConfigError("set_fusion needs the synthetic validation set that fit() builds, and this detector has none "
                              f"(loaded from a checkpoint, or trained without held-out images): train with fusion={fusion!r} instead.")
        self._fuse(fusion)
        self.thresholds = self._choose_thresholds()

    def _fuse(self, fusion: str) -> None:
        """Put the heads' scales and the classifier's weight in the model for `fusion` (see the module doc)."""
        c, model = self.config, self.model
        model.head_low.fill_(0.0)
        model.head_high.fill_(1.0)
        if fusion == "calibrated" and self.validation is not None:
            with torch.no_grad():
                maps = self._validation_maps(with_flow=True, images=self.validation.clean)
            for index, name in enumerate(("flow", "classifier")):
                model.head_low[index] = float(np.median(maps[name]))
                model.head_high[index] = float(maps[name].max())
        weight = c.fusion_weight if c.fusion_weight is not None else 1.0 if fusion == "calibrated" else self._tune_fusion_weight()
        model.fusion_weight.fill_(weight)
        model.fused_low.zero_()
        if self._normal_moments is not None and self.config.position_reference != "off":
            model.fused_low.copy_(model.fused_level(self._normal_moments.to(model.fused_low.device)))
        self.config = dataclasses.replace(c, fusion=fusion)

    def _tune_fusion_weight(self) -> float:
        """The weight of FUSION_WEIGHTS that scores best on the synthetic validation set (1.0 without one)."""
        if self.validation is None:
            return 1.0
        maps = self._validation_maps(with_flow=True)
        masks = self.validation.masks.numpy()
        scores = {w: validation_score(self.validation.labels, masks, maps["flow"] + w * maps["classifier"]) for w in FUSION_WEIGHTS}
        self.fusion_scores = scores
        return max(scores, key=lambda w: (scores[w], -w))

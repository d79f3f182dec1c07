"""Multi-scale feature extractors: any timm model, or torchvision's ResNets and AlexNet.

Levels are numbered as timm numbers feature stages (for ResNets: 1 = layer1 ... 4 = layer4), so
the paper's "layers 2-4" is levels (2, 3, 4) for both libraries.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from .folding import folded_copy
from .tiling import stitched_features

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision models: level index -> node name for create_feature_extractor.
_TORCHVISION_RESNET_NODES = {0: "relu", 1: "layer1", 2: "layer2", 3: "layer3", 4: "layer4"}
_TORCHVISION_NODES = {
    "resnet18": _TORCHVISION_RESNET_NODES,
    "wide_resnet50_2": _TORCHVISION_RESNET_NODES,
    # AlexNet's ReLU outputs after each pooling stage (DifferNet pools the last one).
    "alexnet": {0: "features.2", 1: "features.5", 2: "features.12"},
}
TORCHVISION_MODELS = tuple(_TORCHVISION_NODES)


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a local file, without unpickling arbitrary objects."""
    if not path.is_file():
        raise WeightsError(f"Weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is unusable
        raise WeightsError(f"Cannot read weights file {path}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict of tensors.")
    return state


def _no_weights_help(name: str, library: str, exc: Exception) -> WeightsError:
    where = (
        "the Hugging Face hub cache (set HF_HOME to a folder that holds it; HF_HUB_OFFLINE=1 when offline)"
        if library == "timm"
        else "torch's hub cache (~/.cache/torch/hub/checkpoints, or $TORCH_HOME)"
    )
    return WeightsError(
        f"Pretrained weights for {name} could not be loaded ({type(exc).__name__}: {exc}). "
        f"Download them once on a machine with internet into {where}, or pass --weights FILE "
        "with a local .safetensors/.pth state dict of this model."
    )


class FeatureExtractor(nn.Module):
    """images in [0, 1] -> list of feature maps, one per requested level (shallow to deep).

    BatchNorm layers always use their stored statistics, even in train mode, so fine-tuning
    (the paper's stage 1) changes weights but not normalisation statistics. Frozen (eval mode, no
    weight that requires a gradient), it computes with a copy whose BatchNorms are folded into
    the convolutions (features/folding.py), made again whenever a weight has changed.
    """

    def __init__(
        self,
        name: str,
        levels: Sequence[int],
        pretrained: bool = True,
        weights: str | Path | None = None,
        tile: int | None = None,
        overlap: int = 64,
    ) -> None:
        super().__init__()
        self.name = name
        self.levels = tuple(int(level) for level in levels)
        self.tile, self.overlap = tile, overlap  # see features/tiling.py
        if name in _TORCHVISION_NODES:
            self.body, mean, std = self._build_torchvision(name, pretrained, weights)
        else:
            self.body, mean, std = self._build_timm(name, pretrained, weights)
        # channels-last: the layout oneDNN's (and cuDNN's) fast convolutions use; on this project's
        # CPU it made lite0's forward 1.6x faster with the same features (within 1e-4)
        self.body.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._folded: tuple[tuple, nn.Module | None] | None = None  # (weights' fingerprint, folded body)
        self.train(False)  # before the probe: a forward pass in train mode would move BatchNorm statistics
        with torch.no_grad():
            self.channels = tuple(int(f.shape[1]) for f in self(torch.zeros(1, 3, 64, 64)))

    def _build_timm(self, name: str, pretrained: bool, weights: str | Path | None):
        import timm

        if not timm.is_model(name):
            raise WeightsError(
                f"Unknown backbone {name!r}: use a timm model name or one of {', '.join(TORCHVISION_MODELS)}."
            )
        kwargs = {"features_only": True, "out_indices": self.levels}
        try:
            if weights is not None:
                model = timm.create_model(name, pretrained=False, **kwargs)
                state = _load_state_file(Path(weights))
                try:
                    missing, _ = model.load_state_dict(state, strict=False)
                except RuntimeError as exc:  # shapes of another model: not a download problem
                    raise WeightsError(f"{weights} does not fit {name} (weights of another model?): {str(exc)[:300]}") from None
                if missing:
                    raise WeightsError(f"{weights} does not fit {name} (weights of another model?): missing {', '.join(missing[:5])} ...")
            else:
                model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except (IndexError, AssertionError) as exc:
            raise WeightsError(f"{name} has no feature levels {self.levels}: {exc}") from None
        except WeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types
            raise _no_weights_help(name, "timm", exc) from None
        config = model.pretrained_cfg
        return model, config.get("mean", IMAGENET_MEAN), config.get("std", IMAGENET_STD)

    def _build_torchvision(self, name: str, pretrained: bool, weights: str | Path | None):
        import torchvision
        from torchvision.models.feature_extraction import create_feature_extractor

        nodes = _TORCHVISION_NODES[name]
        unknown = [level for level in self.levels if level not in nodes]
        if unknown:
            raise WeightsError(f"{name} has feature levels {sorted(nodes)}, not {unknown}.")
        try:
            model = torchvision.models.get_model(
                name, weights="DEFAULT" if pretrained and weights is None else None
            )
        except Exception as exc:  # noqa: BLE001 - download errors come in many types
            raise _no_weights_help(name, "torchvision", exc) from None
        if weights is not None:
            try:
                model.load_state_dict(_load_state_file(Path(weights)))
            except RuntimeError as exc:
                raise WeightsError(f"{weights} does not fit {name} (weights of another model?): {str(exc)[:300]}") from None
        body = create_feature_extractor(model, return_nodes={nodes[level]: str(level) for level in self.levels})
        return body, IMAGENET_MEAN, IMAGENET_STD

    def train(self, mode: bool = True) -> "FeatureExtractor":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def _stage_names(self) -> dict[int, str]:
        """level -> the module (timm) or graph node (torchvision) whose output is its features."""
        if self.name in _TORCHVISION_NODES:
            return _TORCHVISION_NODES[self.name]
        return {i: info["module"] for i, info in enumerate(self.body.feature_info.info)}

    def _stage_name(self, level: int) -> str:
        names = self._stage_names()
        if level not in names:
            raise ConfigError(f"{self.name} has feature levels {sorted(names)}, not {level}.")
        return names[level]

    @contextmanager
    def gradient_taps(self, level: int) -> Iterator[list[torch.Tensor]]:
        """Within the block, every forward pass cuts the autograd graph at `level`'s output: that
        tensor becomes a leaf that requires a gradient and is appended to the yielded list, so a
        gradient with respect to it runs backward through the later stages only (the stem and the
        first stages, at the highest resolutions, are most of a backward pass). The block must run
        the extractor; if nothing was tapped, it raises: the level is not a module's output there
        (torchvision's traced ResNet stages)."""
        name = self._stage_name(level)
        taps: list[torch.Tensor] = []

        def cut(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            leaf = output.detach().requires_grad_(True)
            taps.append(leaf)
            return leaf

        hook = self._inference_body().get_submodule(name).register_forward_hook(cut)  # the body (or folded copy) that runs
        try:
            yield taps
        finally:
            hook.remove()
        if not taps:
            raise ConfigError(f"{self.name}'s level {level} ({name}) is not a module output that can be tapped for a "
                              "gradient: use a timm backbone, or a gradient with respect to the input.")

    def parameters_before(self, level: int) -> list[nn.Parameter]:
        """Parameters of the stem and stages that run before `level`'s stage (timm's stage modules,
        torchvision's nodes), in any backbone: a probe pass records which modules run first."""
        if level <= 0:
            return []
        stage = set(self.body.get_submodule(self._stage_name(level - 1)).modules())
        ran: list[nn.Module] = []  # in the order they finished: a GraphModule calls only the leaves
        hooks = [m.register_forward_hook(lambda module, args, output: ran.append(module)) for m in self.body.modules()]
        try:
            with torch.no_grad():
                self._run(self.body, torch.zeros(1, 3, 64, 64, device=self.mean.device))
        finally:
            for hook in hooks:
                hook.remove()
        last = max(i for i, module in enumerate(ran) if module in stage)
        return list(dict.fromkeys(p for m in ran[: last + 1] for p in m.parameters(recurse=False)))

    def _probe(self) -> torch.Tensor:
        """A fixed random 64 x 64 image for checking a rewritten body against the original."""
        return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(self.mean.device)

    def _chain(self, body: nn.Module) -> list[tuple[str, nn.Module]]:
        """body's top-level modules in order, a Sequential that holds stages opened into its
        children (timm EfficientNets: conv_stem, bn1, blocks.0, ..., blocks.6)."""
        stages = set(self._stage_names().values())
        units: list[tuple[str, nn.Module]] = []
        for name, child in body.named_children():
            if isinstance(child, nn.Sequential) and any(s.startswith(name + ".") for s in stages):
                units += [(f"{name}.{n}", m) for n, m in child.named_children()]
            else:
                units.append((name, child))
        return units

    def resumes_after(self, level: int) -> bool:
        """Whether forward_after(level, ...) gives this extractor's features: the body must run
        as a chain of modules (as timm's EfficientNets and ResNets do) and every level of this
        extractor must lie deeper than `level`; not with tiling. Checked on a probe, so a body
        this does not understand gets a full pass (speed, never features)."""
        if self.tile is not None or not 0 <= level < min(self.levels):
            return False
        units = self._chain(self.body)
        stages, names = self._stage_names(), dict(units)
        if level not in stages or any(stages.get(l) not in names for l in (level, *self.levels)):
            return False
        normalised = ((self._probe() - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        try:
            with torch.no_grad():
                chained = self._run_chain(units, normalised, 0)
                whole = self._run(self.body, normalised)
        except Exception:  # noqa: BLE001 - a module that does not run alone (a traced graph's containers)
            return False
        return all(torch.allclose(c, w, rtol=1e-4, atol=1e-5 * float(w.abs().max())) for c, w in zip(chained, whole))

    def forward_after(self, level: int, features: torch.Tensor) -> list[torch.Tensor]:
        """This extractor's features computed from its own `level` output, without running the
        stem and the stages before: an extractor whose shallow stages another one shares (clscnf's
        flows) costs only its deeper stages. Only where resumes_after(level)."""
        units = self._chain(self._inference_body())
        return self._run_chain(units, features, [name for name, _ in units].index(self._stage_name(level)) + 1)

    def _run_chain(self, units: list[tuple[str, nn.Module]], x: torch.Tensor, start: int) -> list[torch.Tensor]:
        """This extractor's levels from running units[start:] on x, up to the deepest level."""
        stages = self._stage_names()
        wanted = {stages[l]: l for l in self.levels}
        out: dict[int, torch.Tensor] = {}
        for name, unit in units[start:]:
            if len(out) == len(wanted):
                break
            x = unit(x)
            if name in wanted:
                out[wanted[name]] = x
        return [out[l] for l in self.levels]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.tile is not None and max(images.shape[-2:]) > self.tile:
            return stitched_features(self._untiled, images, self.tile, self.overlap)
        return self._untiled(images)

    def _untiled(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self._run(self._inference_body(), (images - self.mean) / self.std)

    @staticmethod
    def _run(body: nn.Module, normalised: torch.Tensor) -> list[torch.Tensor]:
        features = body(normalised.contiguous(memory_format=torch.channels_last))
        return list(features.values()) if isinstance(features, dict) else list(features)

    def _inference_body(self) -> nn.Module:
        """The folded copy when frozen, else body. The copy is keyed on every weight's storage and
        version counter, which any in-place change (load_state_dict, an optimiser step) or move bumps."""
        if self.training or any(p.requires_grad for p in self.body.parameters()) or torch.compiler.is_compiling():
            return self.body  # an exported graph is folded by the runtime that loads it
        tensors = itertools.chain(self.body.parameters(), self.body.buffers())
        fingerprint = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._folded is None or self._folded[0] != fingerprint:
            self._folded = (fingerprint, folded_copy(self.body, self._probe(), self._run))
        return self.body if self._folded[1] is None else self._folded[1]

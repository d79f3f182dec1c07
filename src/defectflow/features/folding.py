"""BatchNorm folded into the convolution before it, for a frozen extractor's inference.

A BatchNorm that uses its stored statistics is an affine map per channel, so after a
convolution it can be folded into the convolution's weights and bias: the same features,
one memory pass fewer per layer. On lite0 at 256 x 256 the BatchNorms were about 6 of the
extractor's 21 ms per image on this project's CPU. ONNX Runtime and OpenVINO fold them on their
own; this gives PyTorch inference (and every frozen-extractor pass in training) the same.

Which BatchNorm follows which convolution is read from one probe forward pass (a BatchNorm whose
input is a convolution's output), so any backbone's wiring works without a table of layer
names; the folded copy is then checked against the original on the probe and not used if it
differs (a layout this does not understand costs speed, never features).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

TOLERANCE = 1e-3  # folded features may differ by rounding only: relative to the features' largest value


def _conv_bn_pairs(body: nn.Module, probe: torch.Tensor) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(convolution, BatchNorm) pairs where the BatchNorm's input is the convolution's output."""
    outputs: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}  # the tensor is kept so its id is not reused
    pairs = []

    def after_conv(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        outputs[id(output)] = (module, output)

    def before_bn(module: nn.Module, args: tuple) -> None:
        found = outputs.get(id(args[0]))
        if found is not None:
            pairs.append((found[0], module))

    hooks = [m.register_forward_hook(after_conv) for m in body.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(before_bn) for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            body(probe)
    finally:
        for hook in hooks:
            hook.remove()
    return pairs


def _without_norm(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of the BatchNorm module once its normalisation is folded away (None: unknown kind)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):  # timm: norm, drop, act
        return nn.Sequential(bn.drop, bn.act)
    return None


def folded_copy(
    body: nn.Module, probe: torch.Tensor, run: Callable[[nn.Module, torch.Tensor], Sequence[torch.Tensor]]
) -> nn.Module | None:
    """A frozen copy of body (in eval mode: its BatchNorms use stored statistics) with its
    conv -> BatchNorm pairs folded, or None when there is nothing to fold or run(copy, probe)
    differs from run(body, probe)."""
    folded = copy.deepcopy(body).eval().requires_grad_(False)  # eval again: a GraphModule's copy comes back in train mode
    parents = {module: (parent, name) for parent in folded.modules() for name, module in parent.named_children()}
    count = 0
    for conv, bn in _conv_bn_pairs(folded, probe):
        rest = _without_norm(bn)
        if rest is None or bn.running_mean is None:
            continue
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        conv.requires_grad_(False)
        parent, name = parents[bn]
        setattr(parent, name, rest)
        count += 1
    if not count:
        return None
    with torch.no_grad():
        expected, got = run(body, probe), run(folded, probe)
    for a, b in zip(expected, got):
        if a.shape != b.shape or (a - b).abs().max() > TOLERANCE * a.abs().max().clamp_min(1e-6):
            return None
    return folded

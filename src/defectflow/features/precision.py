"""Depthwise convolutions in float32 while the rest of a CPU training step runs in bfloat16.

On CPUs with bf16 units (AMX), oneDNN's bfloat16 depthwise convolution is slower than its float32
one, most of all backward: forward + backward of a 5 x 5 depthwise convolution (144 channels, 8 x 32
x 32) took 26.2 ms in bf16 against 6.4 ms in fp32, while pointwise and dense convolutions were 1.2-1.9x
faster in bf16. EfficientNets are half depthwise convolutions, so fine-tuning one under bf16 autocast
was slower than in fp32 (clscnf's joint step at 640 x 256: 1.37 s against 1.04 s). Keeping only the
depthwise convolutions that train in float32 gives bf16's speed to the rest (benchmarks/README.md,
*bf16 fine-tuning with float32 depthwise convolutions*).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


@contextmanager
def float32_depthwise(model: nn.Module) -> Iterator[int]:
    """Within the block, each depthwise convolution of `model` whose weight requires a gradient runs
    outside autocast, in float32 (its input cast up); the others, and every other layer, as autocast
    says. Yields how many convolutions it watches. Hooks, removed on leaving: the model and its state
    dict are unchanged."""
    guards: list[torch.autocast | None] = []  # a stack: one entry per convolution running now

    def enter(module: nn.Conv2d, args: tuple) -> tuple | None:
        device = args[0].device.type
        if not (module.weight.requires_grad and torch.is_autocast_enabled(device)):
            guards.append(None)
            return None
        guard = torch.autocast(device, enabled=False)
        guard.__enter__()
        guards.append(guard)
        return tuple(a.float() if torch.is_tensor(a) else a for a in args)

    def leave(module: nn.Conv2d, args: tuple, output: torch.Tensor) -> None:
        guard = guards.pop()
        if guard is not None:
            guard.__exit__(None, None, None)

    convolutions = [m for m in model.modules() if is_depthwise(m)]
    hooks = [h for m in convolutions for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave, always_call=True))]
    try:
        yield len(convolutions)
    finally:
        for hook in hooks:
            hook.remove()

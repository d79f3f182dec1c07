import torch
from torch import nn

from defectflow.features.precision import float32_depthwise
from defectflow.methods.base import train_autocast


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8))


def _dtypes(model: nn.Sequential, x: torch.Tensor) -> list[torch.dtype]:
    out = []
    for layer in model:
        x = layer(x)
        out.append(x.dtype)
    return out


def test_trained_depthwise_convolutions_leave_bf16_autocast_and_match_float32() -> None:
    model, x = _model(), torch.randn(2, 8, 16, 16)
    model[2].requires_grad_(False)  # a frozen depthwise convolution keeps autocast's bf16
    expected = model[0](x)  # float32, outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16), float32_depthwise(model) as watched:
        assert watched == 2
        assert _dtypes(model, x) == [torch.float32, torch.bfloat16, torch.bfloat16]
        torch.testing.assert_close(model[0](x), expected, rtol=0, atol=0)
        assert torch.is_autocast_enabled("cpu")  # restored after each convolution
    with torch.autocast("cpu", dtype=torch.bfloat16):  # hooks removed on leaving
        assert _dtypes(model, x) == [torch.bfloat16] * 3
    assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in model)


def test_train_autocast_keeps_depthwise_float32_on_cpu_only_when_bf16() -> None:
    model, x = _model(), torch.randn(1, 8, 8, 8)
    with train_autocast("bf16", torch.device("cpu"), model):
        assert _dtypes(model, x) == [torch.float32, torch.bfloat16, torch.float32]
    with train_autocast("bf16", torch.device("cpu")):
        assert _dtypes(model, x) == [torch.bfloat16] * 3
    with train_autocast("fp32", torch.device("cpu"), model):
        assert _dtypes(model, x) == [torch.float32] * 3
    with train_autocast("bf16", torch.device("cpu"), model):
        output = model(x)
    output.float().sum().backward()  # gradients flow through the float32 convolutions as usual
    assert model[0].weight.grad is not None and model[0].weight.grad.dtype == torch.float32

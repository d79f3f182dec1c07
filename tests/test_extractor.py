from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from defectflow.errors import ConfigError, WeightsError
from defectflow.features.extractor import FeatureExtractor


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return FeatureExtractor("tf_efficientnet_lite0", (2, 3, 4))


def test_pretrained_timm_levels(lite0: FeatureExtractor) -> None:
    features = lite0(torch.rand(1, 3, 256, 256))
    assert lite0.channels == (40, 112, 320)
    assert [tuple(f.shape[-2:]) for f in features] == [(32, 32), (16, 16), (8, 8)]


def test_pretrained_weights_are_not_random(lite0: FeatureExtractor) -> None:
    random = FeatureExtractor("tf_efficientnet_lite0", (2, 3, 4), pretrained=False)
    name, weight = next(iter(lite0.state_dict().items()))
    assert not torch.allclose(weight, random.state_dict()[name])


def test_batchnorm_statistics_stay_frozen_in_train_mode(lite0: FeatureExtractor) -> None:
    lite0.train()
    before = {k: v.clone() for k, v in lite0.state_dict().items() if "running_mean" in k}
    lite0(torch.rand(2, 3, 64, 64) * 5)
    after = {k: v for k, v in lite0.state_dict().items() if "running_mean" in k}
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    bn = [m for m in lite0.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(m.training for m in bn)
    lite0.eval()


def test_local_weights_file(lite0: FeatureExtractor, tmp_path: Path) -> None:
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.body.state_dict().items()}, str(path))
    loaded = FeatureExtractor("tf_efficientnet_lite0", (2, 3, 4), weights=path)
    x = torch.rand(1, 3, 64, 64)
    assert all(torch.allclose(a, b) for a, b in zip(lite0(x), loaded(x)))


def test_unusable_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pth"):
        FeatureExtractor("tf_efficientnet_lite0", (2, 3, 4), weights=path)


def test_weights_not_available_offline_gives_instructions() -> None:
    # lite1 is not in the shared cache, and the hub is offline
    with pytest.raises(WeightsError, match=r"tf_efficientnet_lite1.*HF_HOME.*--weights"):
        FeatureExtractor("tf_efficientnet_lite1", (2, 3, 4))


def test_unknown_backbone() -> None:
    with pytest.raises(WeightsError, match="Unknown backbone"):
        FeatureExtractor("no_such_net", (2,))


@pytest.mark.parametrize("name, channels", [("resnet18", (128, 256, 512)), ("wide_resnet50_2", (512, 1024, 2048))])
def test_torchvision_resnets_layers_2_to_4(name: str, channels: tuple[int, ...]) -> None:
    extractor = FeatureExtractor(name, (2, 3, 4), pretrained=False)
    features = extractor(torch.rand(1, 3, 64, 64))
    assert extractor.channels == channels
    assert [tuple(f.shape[-2:]) for f in features] == [(8, 8), (4, 4), (2, 2)]


def test_torchvision_weights_unavailable_offline_gives_instructions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache, and no network here
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError, match=r"resnet18.*torch's hub cache.*--weights"):
        FeatureExtractor("resnet18", (2, 3, 4))


def _unfolded(extractor: FeatureExtractor, images: torch.Tensor) -> list[torch.Tensor]:
    return extractor._run(extractor.body, (images - extractor.mean) / extractor.std)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_frozen_extractor_folds_batchnorm_with_the_same_features(name: str) -> None:
    extractor = FeatureExtractor(name, (2, 3, 4), pretrained=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # BatchNorm statistics far from the identity, so a wrong fold shows
        for bn in (m for m in extractor.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=generator) * 0.1)
    images = torch.rand(2, 3, 96, 128, generator=generator)

    extractor.requires_grad_(True)
    assert extractor._inference_body() is extractor.body  # trainable: never a stale copy
    extractor.requires_grad_(False)
    folded = extractor._inference_body()
    assert folded is not extractor.body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        for got, want in zip(extractor(images), _unfolded(extractor, images)):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())

        conv = next(m for m in extractor.body.modules() if isinstance(m, torch.nn.Conv2d))
        conv.weight.mul_(1.5)  # an in-place change (an optimiser step, load_state_dict) is seen
        for got, want in zip(extractor(images), _unfolded(extractor, images)):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_parameters_before_a_level_are_those_of_the_stem_and_shallower_stages(lite0: FeatureExtractor) -> None:
    names = {id(p): n for n, p in lite0.body.named_parameters()}
    before = [names[id(p)] for p in lite0.parameters_before(2)]
    expected = [n for n in names.values() if n.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    assert sorted(before) == sorted(expected) and expected
    assert lite0.parameters_before(0) == []
    resnet = FeatureExtractor("resnet18", (2, 3, 4), pretrained=False)
    names = {id(p): n for n, p in resnet.body.named_parameters()}
    assert sorted(names[id(p)] for p in resnet.parameters_before(2)) == sorted(
        n for n in names.values() if n.startswith(("conv1.", "bn1.", "layer1.")))
    with pytest.raises(ConfigError, match=r"has feature levels \[0, 1, 2, 3, 4\], not 6"):
        lite0.parameters_before(7)


def test_gradient_taps_cut_the_graph_at_a_level_with_the_same_gradient(lite0: FeatureExtractor) -> None:
    """The gradient at a tapped level equals the one a full graph gives there, and nothing before it is recorded."""
    two = FeatureExtractor("tf_efficientnet_lite0", (1, 4))
    two.requires_grad_(False)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        x = images.clone().requires_grad_(True)  # the whole graph, from the pixels
        level1, last = two(x)
        (expected,) = torch.autograd.grad(last.pow(2).sum(), level1)
        with two.gradient_taps(1) as taps:
            last = two(images)[-1]
        assert len(taps) == 1 and taps[0].is_leaf and taps[0].shape == level1.shape
        (tapped,) = torch.autograd.grad(last.pow(2).sum(), taps)
    torch.testing.assert_close(tapped, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    two(images)  # the hooks went when the block ended
    assert len(taps) == 1
    resnet = FeatureExtractor("resnet18", (4,), pretrained=False)
    with pytest.raises(ConfigError, match="is not a module output that can be tapped"):
        with resnet.gradient_taps(1):
            resnet(images)


def test_forward_after_a_level_gives_the_features_of_a_full_pass(lite0: FeatureExtractor) -> None:
    """clscnf's flows branch off a shared stage: from level 1's output, lite0's levels 2-4 as a full pass gives them."""
    deep = FeatureExtractor("tf_efficientnet_lite0", (0, 1, 2, 3, 4))
    deep.requires_grad_(False)
    lite0.requires_grad_(False)  # both folded, as at inference
    images = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        every = deep(images)
        for level in (0, 1):
            assert lite0.resumes_after(level)
            for got, want in zip(lite0.forward_after(level, every[level]), lite0(images), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert not lite0.resumes_after(2) and not lite0.resumes_after(-1)  # the first level it gives, a level that is not
    # a body that is not a chain of modules (torchvision's traced graph) and tiling get a full pass instead
    assert not FeatureExtractor("resnet18", (2, 3, 4), pretrained=False).resumes_after(1)
    assert not FeatureExtractor("tf_efficientnet_lite0", (2, 3, 4), tile=128, overlap=32).resumes_after(1)

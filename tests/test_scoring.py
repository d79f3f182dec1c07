"""Scores from maps: the separable smoothing is the 2-D Gaussian blur it replaced."""

import torch
from torchvision.transforms.functional import gaussian_blur

from defectflow.scoring import smooth


def test_separable_smoothing_equals_the_2d_gaussian_blur() -> None:
    torch.manual_seed(0)
    maps = torch.rand(3, 40, 24)  # not square: rows and columns must not be swapped
    maps[1, 5, 20] = 50.0  # a spike near a border: the reflected padding must match too
    kernel = 2 * int(4.0 * 2.0 + 0.5) + 1
    expected = gaussian_blur(maps[:, None], kernel_size=[kernel, kernel], sigma=[2.0, 2.0])[:, 0]
    assert torch.allclose(smooth(maps, 2.0), expected, atol=1e-5)


def test_smoothing_keeps_the_mass_of_an_impulse_and_zero_sigma_is_identity() -> None:
    maps = torch.zeros(1, 64, 64)
    maps[0, 32, 32] = 1.0
    smoothed = smooth(maps, 4.0)
    assert torch.isclose(smoothed.sum(), torch.tensor(1.0), atol=1e-5)
    assert smoothed[0, 32, 32] == smoothed.max() and smoothed[0, 32, 48] < smoothed[0, 32, 40]
    assert torch.equal(smooth(maps, 0.0), maps)

"""Scores from maps: the separable smoothing is the 2-D Gaussian blur it replaced; the image score rules."""

import torch
from torchvision.transforms.functional import gaussian_blur

from defectflow.scoring import footprint, image_scores, smooth


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


def test_top_score_is_the_mean_of_one_smoothing_footprint_of_highest_pixels() -> None:
    assert footprint(4.0) == 201 and footprint(1.0) == 13 and footprint(0.0) == 1  # pi (2 sigma)^2, at least one pixel
    maps = torch.zeros(2, 64, 64)
    maps[0, 10, 10] = 5.0  # one hot pixel: what a max ranks first
    maps[1, 20:30, 20:30] = 1.0  # a region of 100 pixels at 1
    top = image_scores(maps, "top", 100)
    torch.testing.assert_close(top, torch.tensor([0.05, 1.0]))
    assert image_scores(maps, "max").tolist() == [5.0, 1.0]
    torch.testing.assert_close(image_scores(maps, "top", 1), image_scores(maps, "max"))
    torch.testing.assert_close(image_scores(maps, "top", 10_000), image_scores(maps, "mean"))  # an area beyond the map: all of it

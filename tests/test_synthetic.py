from pathlib import Path

import numpy as np
import pytest
import torch

from defectflow.data.folder import AnomalyFolder, Sample
from defectflow.data.synthetic import (
    DefectSynthesizer, SyntheticBatches, TextureSource, build_validation_set, foreground_mask, perlin_mask, perlin_noise,
    sample_generator,
)
from defectflow.errors import DataError

from conftest import write_image


def test_perlin_noise_is_smooth_and_bounded() -> None:
    noise = perlin_noise(64, 64, 4, 4, torch.Generator().manual_seed(0))
    assert noise.shape == (64, 64) and noise.abs().max() <= 1.5
    assert noise.std() > 0.1
    # neighbouring pixels are close (gradient noise, not white noise)
    assert (noise[1:] - noise[:-1]).abs().mean() < 0.1 * noise.std() * 10
    lattice = noise[::16, ::16]  # zero at lattice points
    assert lattice.abs().max() < 1e-5


def test_masks_are_binary_and_vary_in_scale() -> None:
    sizes = []
    for seed in range(20):
        mask = perlin_mask(64, torch.Generator().manual_seed(seed))
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        sizes.append(mask.mean().item())
    assert max(sizes) > 0.05 and min(sizes) < max(sizes) / 2


def _image() -> torch.Tensor:
    image = torch.full((3, 64, 64), 0.9)
    image[:, 16:48, 16:48] = 0.2  # an object on a plain background
    return image


def test_blending_only_changes_pixels_inside_the_mask() -> None:
    synthesizer = DefectSynthesizer(TextureSource(64))
    for seed in range(5):
        sample = synthesizer(_image(), sample_generator(seed), force=True)
        outside = sample.mask[0] == 0
        assert torch.equal(sample.image[:, outside], _image()[:, outside])
        assert sample.mask.sum() > 0
        assert (sample.target <= sample.mask).all() and (sample.target[sample.mask == 0] == 0).all()
        beta = 1 - sample.target.max().item()
        assert 0.0 <= beta <= 0.8 + 1e-6


def test_no_defect_means_clean_image_and_zero_target() -> None:
    sample = DefectSynthesizer(TextureSource(64))(_image(), sample_generator(0), force=False)
    assert torch.equal(sample.image, _image()) and sample.target.sum() == 0


def test_foreground_keeps_defects_on_the_object() -> None:
    assert foreground_mask(_image())[16:48, 16:48].mean() > 0.9
    synthesizer = DefectSynthesizer(TextureSource(64), use_foreground=True)
    for seed in range(5):
        sample = synthesizer(_image(), sample_generator(seed), force=True)
        assert sample.mask[0, :8].sum() == 0 and sample.mask[0, :, :8].sum() == 0


def test_same_seed_same_defect_other_seed_other_defect() -> None:
    synthesizer = DefectSynthesizer(TextureSource(64, normal_images=torch.rand(3, 3, 64, 64)))
    a = synthesizer(_image(), sample_generator(3, 1, 2), force=True)
    b = synthesizer(_image(), sample_generator(3, 1, 2), force=True)
    c = synthesizer(_image(), sample_generator(3, 1, 3), force=True)
    assert torch.equal(a.image, b.image) and torch.equal(a.target, b.target)
    assert not torch.equal(a.image, c.image)


def test_texture_folder_source(tmp_path: Path) -> None:
    write_image(tmp_path / "dtd" / "images" / "banded" / "a.jpg", seed=1)
    source = TextureSource(32, tmp_path / "dtd")
    assert source.sample(sample_generator(0)).shape == (3, 32, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        TextureSource(32, tmp_path / "empty")


def test_validation_set_is_deterministic_half_defective_and_saved_in_mvtec_layout(tmp_path: Path) -> None:
    samples = [Sample(Path(f"/x/{i:03d}.png"), 0, "good") for i in range(6)]
    images = torch.stack([_image()] * 6)
    synthesizer = DefectSynthesizer(TextureSource(64))
    first = build_validation_set(samples, images, synthesizer, seed=5)
    second = build_validation_set(samples, images, synthesizer, seed=5)
    assert torch.equal(first.images, second.images) and torch.equal(first.masks, second.masks)
    assert first.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert first.masks[:3].sum() == 0 and all(m.sum() > 0 for m in first.masks[3:])
    first.save(tmp_path / "val")
    written = sorted(p.relative_to(tmp_path / "val").as_posix() for p in (tmp_path / "val").rglob("*.png"))
    assert written[:3] == [f"ground_truth/synthetic/{i:03d}_{i:03d}_mask.png" for i in (3, 4, 5)]
    assert len(written) == 9
    test = AnomalyFolder._scan_test(tmp_path / "val")
    assert [s.label for s in test] == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(np.array([s.mask_path is not None for s in test]), first.labels.astype(bool))


def test_stage_one_batches_do_not_depend_on_the_workers_that_made_them() -> None:
    """Every epoch shows each image once, with the defect its own generator (seed, epoch, index)
    draws; worker processes make the same batches, in the same order, as the training process."""
    images = torch.stack([_image() * (0.5 + 0.05 * i) for i in range(7)])
    synthesizer = DefectSynthesizer(TextureSource(64, normal_images=images))
    made = SyntheticBatches(images, synthesizer, seed=3, epochs=2, batch_size=3)
    assert len(made) == 2 * made.steps_per_epoch == 6
    for epoch in range(2):
        shown = torch.cat([made.batches[k][1] for k in range(epoch * 3, epoch * 3 + 3)])
        assert sorted(shown.tolist()) == list(range(7))
    epoch, index = made.batches[4]
    first = int(index[0])
    expected = synthesizer(images[first], sample_generator(3, epoch, first))
    torch.testing.assert_close(made[4][0][0], expected.image, rtol=0, atol=0)
    torch.testing.assert_close(made[4][1][0], expected.target, rtol=0, atol=0)
    here = list(torch.utils.data.DataLoader(_AsBytes(made), batch_size=None, num_workers=0))
    workers = list(torch.utils.data.DataLoader(_AsBytes(made), batch_size=None, num_workers=2))
    assert any(np.frombuffer(target, np.float32).any() for _, target in here)  # some defects were drawn
    differ = [k for k, (mine, theirs) in enumerate(zip(here, workers, strict=True)) if mine != theirs]
    assert not differ, f"worker processes made other images or targets in batches {differ}"


class _AsBytes(torch.utils.data.Dataset):
    """A dataset's tensors as bytes: what a worker made reaches the test through the pipe, not
    through torch's shared-memory tensor transport, which this test is not about (one CI run got
    a worker's batch with NaNs in 408 of 4096 target values and images that matched; not
    reproduced here, the transport is the suspect, not proven)."""

    def __init__(self, made: SyntheticBatches) -> None:
        self.made = made

    def __len__(self) -> int:
        return len(self.made)

    def __getitem__(self, k: int) -> tuple[bytes, ...]:
        return tuple(t.numpy().tobytes() for t in self.made[k])

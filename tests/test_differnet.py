"""DifferNet on a handful of real bottle images with tiny settings."""

from pathlib import Path

import numpy as np
import pytest
import torch

import defectflow
from defectflow.data.folder import AnomalyFolder
from defectflow.methods.differnet import rotations
import torchvision.transforms.v2.functional as TF

TINY = dict(input_size=128, meta_epochs=3, sub_epochs=4, augment_copies=2, test_rotations=2, vector_batch=8,
            subnet_width=128, coupling_blocks=4, lr=1e-3)


@pytest.fixture(scope="module")
def trained(small_bottle: AnomalyFolder) -> defectflow.Detector:
    return defectflow.create("differnet", **TINY).fit(small_bottle, progress=False, log_test=True)


def test_epoch_log_reports_last_and_best(trained) -> None:
    summary = trained.epoch_summary()
    assert len(trained.epoch_log) == 3 and len(summary["per_epoch"]) == 3
    assert summary["last"] == summary["per_epoch"][-1]
    assert summary["best"] == max(summary["per_epoch"]) == summary["per_epoch"][summary["best_epoch"] - 1]
    assert trained.epoch_log[-1]["nll"] < trained.epoch_log[0]["nll"]


def test_score_is_mean_squared_latent_over_rotations(trained, small_bottle: AnomalyFolder) -> None:
    from defectflow.data.folder import load_images
    import torchvision.transforms.v2.functional as TF

    model = trained.model
    images = load_images(small_bottle.test[:2], 128)
    with torch.no_grad():
        expected = torch.stack([
            torch.stack([model.flow(model.embed(TF.rotate(img[None], a)))[0].pow(2).mean() for a in rotations(2)]).mean()
            for img in images
        ])
    prediction = trained.predict(list(small_bottle.test[:2]), progress=False)
    np.testing.assert_allclose(prediction.scores, expected.numpy(), rtol=1e-4)
    assert rotations(4) == [0.0, 90.0, 180.0, 270.0]


def test_rotations_are_batched_in_few_forward_passes(trained, small_bottle: AnomalyFolder, monkeypatch) -> None:
    """Scoring 2 images at 4 rotations: the gradient pass (rotation 0) and one batched pass for the
    other 3 rotations, each of the model's 3 scales: 6 extractor calls, not 2 x 4 x 3 + 2."""
    import defectflow.methods.differnet as differnet
    from defectflow.data.folder import load_images

    model = trained.model
    images = load_images(small_bottle.test[:2], 128)
    monkeypatch.setattr(model, "test_rotations", 4)
    shapes = []
    original = model.extractor.forward
    monkeypatch.setattr(model.extractor, "forward", lambda x: shapes.append(tuple(x.shape)) or original(x))
    with torch.no_grad():
        out = model(images)
    assert len(shapes) == 6 and shapes[3][0] == 3 * 2
    with torch.no_grad():
        expected = torch.stack([model.latent_sq_norm(model.embed(TF.rotate(images, a))) for a in rotations(4)]).mean(0)
    torch.testing.assert_close(out["score"], expected, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr(differnet, "ROTATION_CHUNK", 4)  # chunked passes give the same vectors
    torch.testing.assert_close(model.embed_rotations(images, [0.0, 90.0, 180.0]),
                               torch.stack([model.embed(TF.rotate(images, a)) for a in (0.0, 90.0, 180.0)]), rtol=1e-4, atol=1e-5)


def test_defaults_are_cpu_practical_and_test_logging_opt_in(small_bottle: AnomalyFolder) -> None:
    config = defectflow.create("differnet").config
    assert (config.meta_epochs, config.test_rotations) == (4, 4)  # the paper: 24 and 64
    detector = defectflow.create("differnet", **{**TINY, "meta_epochs": 1}).fit(small_bottle, progress=False)
    assert "test_auroc" not in detector.epoch_log[0] and detector.epoch_summary() == {}


def test_vector_is_pooled_features_at_three_scales(trained) -> None:
    vector = trained.model.embed(torch.rand(2, 3, 128, 128))
    assert vector.shape == (2, 320 * 3)


def test_gradient_maps_and_detection(trained, small_bottle: AnomalyFolder) -> None:
    evaluation = trained.evaluate(small_bottle, progress=False)
    assert evaluation.prediction.maps.shape == (6, 128, 128)
    assert np.isfinite(evaluation.prediction.maps).all() and evaluation.prediction.maps.max() > 0
    assert evaluation.metrics["image_auroc"] >= 0.7


def test_save_load_and_selection_on_validation(trained, small_bottle: AnomalyFolder, tmp_path: Path) -> None:
    loaded = defectflow.load(trained.save(tmp_path / "m"))
    np.testing.assert_allclose(loaded.predict(list(small_bottle.test[:2]), progress=False).scores,
                               trained.predict(list(small_bottle.test[:2]), progress=False).scores, rtol=1e-5)
    chosen = defectflow.create("differnet", **{**TINY, "meta_epochs": 2}, select="validation", val_fraction=0.25)
    chosen.fit(small_bottle, progress=False)
    assert all("val_auroc" in r for r in chosen.epoch_log)
    assert {s.path for s in chosen.validation.sources}.isdisjoint({s.path for s in small_bottle.test})


def test_paper_backbone_alexnet_gives_768_d_vectors() -> None:
    """AlexNet weights cannot be fetched here: random weights check the shapes of the paper's setup."""
    detector = defectflow.create("differnet", backbone="alexnet", levels=(2,), pretrained=False, input_size=448,
                                 coupling_blocks=2, subnet_width=64)
    model = detector.build_model(pretrained=False)
    assert model.embed(torch.rand(2, 3, 448, 448)).shape == (2, 768)  # 448, 224 and 112 px, as in the paper


def test_map_is_the_gradient_at_level_1_features_and_earlier_checkpoints_keep_the_pixel_gradient(
        trained, small_bottle: AnomalyFolder, tmp_path: Path) -> None:
    from defectflow.checkpoint import read_checkpoint, save_checkpoint
    from defectflow.data.folder import load_images
    from defectflow.errors import ConfigError
    from defectflow.scoring import smooth

    assert trained.config.gradient_map == "features"
    with pytest.raises(ConfigError, match="use gradient_map input"):
        defectflow.create("differnet", tile_size=128)
    model = trained.model
    images = load_images(small_bottle.test[:2], 128)
    meta, state = read_checkpoint(trained.save(tmp_path / "new"))
    config = {k: v for k, v in meta["config"].items() if k != "gradient_map"}  # written before the option
    old = defectflow.load(save_checkpoint(tmp_path / "old", "differnet", config, state,
                                          extra={k: meta[k] for k in ("thresholds", "trained_on")}))
    assert old.config.gradient_map == "input" and old.model.gradient_map == "input"
    with torch.enable_grad():
        x = images.clone().requires_grad_(True)
        z, log_det = model.flow(model.embed(x))
        (grad,) = torch.autograd.grad((0.5 * z.pow(2).sum(dim=1) - log_det).sum(), x)
    pixels = smooth(grad.abs().sum(dim=1), model.sigma)
    torch.testing.assert_close(old.model.raw_map(images), pixels, rtol=1e-4, atol=1e-4 * pixels.max().item())
    features = model.raw_map(images)
    assert features.shape == pixels.shape and torch.isfinite(features).all()
    assert not torch.allclose(features, pixels, rtol=0.05)

"""The paper's system end to end on a handful of real bottle images with tiny settings."""

from pathlib import Path

import numpy as np
import pytest
import torch

import defectflow
from conftest import top_mean
from defectflow.checkpoint import read_checkpoint, save_checkpoint
from defectflow.data.folder import AnomalyFolder
from defectflow.errors import ConfigError
from defectflow.features.extractor import FeatureExtractor
from defectflow.methods.clscnf import FUSION_WEIGHTS

# single-cell flows: a few dozen steps on a handful of images do not fit the pooled border cells of
# neighbourhood means (benchmarks/README.md, *Flows on neighbourhood means*), and the flow head must find the defects
TINY = dict(input_size=128, frozen_epochs=1, joint_epochs=1, meta_epochs=1, sub_epochs=3, fiber_batch=256,
            val_fraction=0.25, batch_size=8, foreground=True, flow_neighbourhood=1)


@pytest.fixture(scope="module")
def trained(small_bottle: AnomalyFolder) -> defectflow.Detector:
    return defectflow.create("clscnf", **TINY, fusion="calibrated", position_reference="on").fit(small_bottle, progress=False)


def test_stage_one_fine_tunes_weights_but_not_batchnorm_statistics(trained) -> None:
    imagenet = FeatureExtractor("tf_efficientnet_lite0", trained.model.extractor.levels)
    before, after = imagenet.state_dict(), trained.model.extractor.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("weight" in k for k in changed)  # the joint epoch moved the extractor
    # from the shallowest flow level (2) up: the stem and stages 0-1 keep their ImageNet weights
    assert not any(k.startswith(("body.conv_stem", "body.bn1", "body.blocks.0.", "body.blocks.1.")) for k in changed)
    assert any(k.startswith("body.blocks.2.") for k in changed)
    assert not any("running_" in k for k in changed)  # BatchNorm statistics stayed frozen
    assert [r["joint"] for r in trained.classifier_history] == [False, True]
    assert trained.loss_history[-1] == trained.loss_history[-1]  # flows trained, finite


def test_validation_set_comes_from_held_out_training_images(trained, small_bottle: AnomalyFolder) -> None:
    validation = trained.validation
    assert len(validation.sources) == 4
    train_paths = {s.path for s in small_bottle.train}
    test_paths = {s.path for s in small_bottle.test}
    assert {s.path for s in validation.sources} <= train_paths
    assert not {s.path for s in validation.sources} & test_paths
    assert validation.labels.tolist() == [0, 0, 1, 1]


def test_tuned_fusion_weight_is_the_best_on_validation(trained) -> None:
    assert defectflow.create("clscnf").config.fusion == "calibrated"  # the paper's tuned weight is an option
    calibrated_thresholds = trained.thresholds
    trained.set_fusion("tuned")
    try:
        # the scores moved, and the operating thresholds with them: those the validation set gives the new fusion
        assert trained.thresholds == trained._choose_thresholds() != calibrated_thresholds
        weight = trained.model.fusion_weight.item()
        assert weight in FUSION_WEIGHTS
        assert trained.fusion_scores[weight] == max(trained.fusion_scores.values())
        assert trained.model.head_low.tolist() == [0, 0] and trained.model.head_high.tolist() == [1, 1]
        # the fused map's normal level follows the fusion: here the raw flow map plus weight x the classifier's
        moments = trained._normal_moments
        mean, sd = moments[0] + weight * moments[1], (moments[2] + weight ** 2 * moments[3] + 2 * weight * moments[4]
                                                        - (moments[0] + weight * moments[1]) ** 2).clamp_min(0).sqrt()
        torch.testing.assert_close(trained.model.fused_low, (mean + 2 * sd).clamp_min(0).float())
    finally:
        trained.set_fusion("calibrated")


def test_fused_map_is_the_sum_of_calibrated_heads_from_one_extractor_pass(trained, small_bottle: AnomalyFolder) -> None:
    calls = []
    model = trained.model
    handles = [e.register_forward_hook(lambda *args, e=e: calls.append(e)) for e in (model.extractor, model.flow_extractor)]
    prediction = trained.predict(list(small_bottle.test), progress=False)
    for handle in handles:
        handle.remove()
    assert calls == [model.extractor]  # 6 images, batch 8: one pass through the shallow stages feeds both heads
    flow, classifier = prediction.head_maps["flow"], prediction.head_maps["classifier"]
    assert trained.config.fusion == "calibrated" and trained.model.fusion_weight.item() == 1.0
    # each head's scale: median 0 and maximum 1 on the held-out images before their synthetic defects
    clean = trained.predict_images(trained.validation.clean)
    low, high = trained.model.head_low.numpy(), trained.model.head_high.numpy()
    for index, name in enumerate(("flow", "classifier")):
        assert low[index] == pytest.approx(np.median(clean.head_maps[name]), rel=1e-5, abs=1e-6)
        assert high[index] == pytest.approx(clean.head_maps[name].max(), rel=1e-5, abs=1e-6)
    expected = (flow - low[0]) / (high[0] - low[0]) + (classifier - low[1]) / (high[1] - low[1])
    np.testing.assert_allclose(prediction.maps, expected, rtol=1e-4, atol=1e-4)
    assert classifier.min() >= 0 and classifier.max() <= 1
    # the score: the mean of the highest 201 pixels (one smoothing footprint) of what lies above each
    # pixel's normal level of the fused map, mean + 2 sd of the fused maps of the training images the flows learned from
    held_out = {s.path for s in trained.validation.sources}
    kept = trained.predict([s for s in small_bottle.train if s.path not in held_out], progress=False).maps
    level = np.clip(kept.mean(0) + 2 * kept.std(0), 0, None)
    np.testing.assert_allclose(trained.model.fused_low.numpy(), level, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(prediction.scores, top_mean(prediction.maps - level, 201), rtol=1e-4, atol=1e-4)


def test_heads_find_real_defects(trained, small_bottle: AnomalyFolder) -> None:
    """Tiny training: the flow head already localises real defects; the fused map is scored too."""
    from defectflow.metrics import pixel_auroc

    evaluation = trained.evaluate(small_bottle, progress=False)
    assert pixel_auroc(evaluation.masks, evaluation.prediction.head_maps["flow"]) >= 0.8
    assert all(0.0 <= evaluation.metrics[m] <= 1.0 for m in ("image_auroc", "pixel_auroc", "pixel_aupr", "aupro"))


def test_save_load_whole_system(trained, small_bottle: AnomalyFolder, tmp_path: Path) -> None:
    loaded = defectflow.load(trained.save(tmp_path / "model"))
    assert loaded.model.fusion_weight.item() == trained.model.fusion_weight.item() and loaded.config.fusion == "calibrated"
    before = trained.predict(list(small_bottle.test), progress=False)
    after = loaded.predict(list(small_bottle.test), progress=False)
    np.testing.assert_allclose(after.maps, before.maps, rtol=1e-4, atol=1e-5)
    for head in ("flow", "classifier"):
        np.testing.assert_allclose(after.head_maps[head], before.head_maps[head], rtol=1e-4, atol=1e-5)
    # a checkpoint saved before the fused map had its own normal level scores as it did then: above
    # the flow head's level, on the flow map's scale in the fused map
    meta, state = read_checkpoint(tmp_path / "model")
    del state["fused_low"]
    old = defectflow.load(save_checkpoint(tmp_path / "old", "clscnf", meta["config"], state, extra={"thresholds": meta["thresholds"]}))
    model = old.model
    level = model.scorer.position_low / (model.head_high[0] - model.head_low[0])
    assert level.max() > 0
    predicted = old.predict(list(small_bottle.test), progress=False)
    np.testing.assert_allclose(predicted.scores, top_mean(predicted.maps - level.numpy(), 201), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="set_fusion needs the synthetic validation set"):
        loaded.set_fusion("tuned")  # without the validation set it would drop the saved calibration
    np.testing.assert_array_equal(loaded.model.head_high.numpy(), trained.model.head_high.numpy())


def test_flows_branch_off_the_untuned_stages_with_imagenet_weights(trained, small_bottle: AnomalyFolder) -> None:
    """The default: the flows see what a whole ImageNet extractor gives, computed from the stage-1 output the heads share."""
    model = trained.model
    imagenet = FeatureExtractor("tf_efficientnet_lite0", (2, 3, 4))
    assert all(torch.equal(v, imagenet.state_dict()[k]) for k, v in model.flow_extractor.state_dict().items())
    assert model.branch == (1, 1)  # tuned from level 2: level 1 (decoder output 1) keeps its ImageNet weights
    images = trained.validation.clean[:2]
    with torch.no_grad():
        for got, want in zip(model.flow_features(images, model.extractor(images)), imagenet(images), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # fine-tuning every stage leaves no ImageNet stage to branch from: the flows' extractor makes a whole pass
    assert defectflow.create("clscnf", tune_from_level=0).build_model(pretrained=False).branch is None
    # tuned from level 3: flow level 2 comes from the shared pass itself, the flows' extractor runs only the deeper stages
    later = defectflow.create("clscnf", **TINY, tune_from_level=3).build_model(pretrained=True)
    assert later.branch == (2, 2) and later.flow_index == (2,) and later.flow_extractor.levels == (3, 4)
    with torch.no_grad():
        for got, want in zip(later.flow_features(images, later.extractor(images)), imagenet(images), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # nothing the flows read is tuned: no extractor of their own at all
    untuned = defectflow.create("clscnf", tune_from_level=5).build_model(pretrained=False)
    assert untuned.flow_extractor is None and untuned.flow_index == (2, 3, 4)
    with pytest.raises(ConfigError, match="give both the same tune_from_level"):
        defectflow.create("clscnf", **TINY, tune_from_level=3).fit(small_bottle, progress=False, classifier_from=trained)


def test_shared_system_feeds_the_fine_tuned_features_to_the_flows(trained, small_bottle: AnomalyFolder, tmp_path: Path) -> None:
    donor = defectflow.load(trained.save(tmp_path / "model"))  # a saved stage 1 serves as well as a fresh one
    shared = defectflow.create("clscnf", **TINY, shared=True).fit(small_bottle, progress=False, classifier_from=donor)
    model = shared.model
    assert model.flow_extractor is None and model.branch is None
    assert all(torch.equal(v, trained.model.decoder.state_dict()[k]) for k, v in model.decoder.state_dict().items())
    images = trained.validation.clean[:2]
    with torch.no_grad():
        features = model.extractor(images)
        assert all(torch.equal(f, features[i]) for f, i in zip(model.flow_features(images, features), (2, 3, 4), strict=True))
    prediction = shared.predict(list(small_bottle.test[:2]), progress=False)
    assert prediction.maps.shape == (2, 128, 128)

"""The frame guard: frames that are not a normal part of the product never come out OK."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import defectflow
from defectflow.cli import main
from defectflow.data.folder import AnomalyFolder
from defectflow.heads.guard import CHECKS, FrameGuard

from conftest import SHARED

KOLEKTOR_GOOD = SHARED / "data" / "kolektorsdd" / "train" / "good"


def test_guard_is_two_sided() -> None:
    guard = FrameGuard(channels=4)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(0.5 + 0.2 * rng.standard_normal((20, 3, 32, 32))).float().clamp(0, 1)
    features = torch.from_numpy(rng.standard_normal((20, 4, 2, 2))).float()
    from defectflow.heads.guard import input_statistics

    stats, pooled = input_statistics(images), features.mean(dim=(2, 3))
    guard.calibrate(stats[:15], pooled[:15], stats[15:], pooled[15:])
    assert (guard(images, features) <= 1).all()  # the good frames it was calibrated on pass
    darker, brighter, flat = images * 0.3, (images + 0.6).clamp(0, 1), torch.full_like(images, 0.5)
    assert guard(darker, features)[:, CHECKS.index("brightness")].min() > 1
    assert guard(brighter, features)[:, CHECKS.index("brightness")].min() > 1
    assert guard(flat, features)[:, CHECKS.index("contrast")].min() > 1
    assert guard(images, features + 10)[:, CHECKS.index("features")].min() > 1
    # a colour product's frame in grey (a camera that lost its colour), and a grey product's frame in colour
    in_grey = images.mean(dim=1, keepdim=True).expand_as(images)
    assert guard(in_grey, features)[:, CHECKS.index("colour")].min() > 1
    grey_guard = FrameGuard(channels=4)
    grey_guard.calibrate(input_statistics(in_grey[:15]), pooled[:15], input_statistics(in_grey[15:]), pooled[15:])
    assert (grey_guard(in_grey, features) <= 1).all()
    assert grey_guard(images, features)[:, CHECKS.index("colour")].min() > 1
    # JPEG chroma noise of a few levels on a grey product is no fault (COLOUR_FLOOR)
    tinted = (in_grey + torch.tensor([2 / 255, 0.0, 0.0])[:, None, None]).clamp(0, 1)
    assert (grey_guard(tinted, features)[:, CHECKS.index("colour")] <= 1).all()
    assert (FrameGuard(channels=4)(flat, features) == 0).all()  # uncalibrated (an old checkpoint): says nothing


def _odd_frames(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    real = np.asarray(Image.open(good).convert("RGB"), dtype=np.float64)
    frames = {
        "black": np.zeros((900, 900, 3)), "white": np.full((900, 900, 3), 255.0), "grey": np.full((900, 900, 3), 128.0),
        "noise": rng.integers(0, 256, (900, 900, 3)).astype(np.float64), "underexposed": real * 0.25,
        "overexposed": np.clip(real * 3.0, 0, 255), "in grey": real.mean(axis=2, keepdims=True).repeat(3, axis=2),
    }
    paths = {}
    for name, array in frames.items():
        paths[name] = folder / f"{name}.png"
        Image.fromarray(array.round().astype(np.uint8)).save(paths[name])
    paths["another product"] = sorted(KOLEKTOR_GOOD.glob("*"))[0]
    return paths


TINY = {
    "cflow": dict(input_size=128, meta_epochs=1, sub_epochs=1, epoch_vectors=4000, fiber_batch=256, batch_size=8, val_fraction=0.25),
    "clscnf": dict(input_size=128, meta_epochs=1, sub_epochs=1, epoch_vectors=4000, fiber_batch=256, batch_size=8, val_fraction=0.25,
                   decoder_width=16, frozen_epochs=1, joint_epochs=1),
    "differnet": dict(input_size=128, meta_epochs=1, sub_epochs=2, augment_copies=2, test_rotations=2, subnet_width=128,
                      batch_size=8, val_fraction=0.25),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cflow", "clscnf", "differnet"])
def test_blank_noise_exposure_and_another_product_never_pass(method: str, small_bottle: AnomalyFolder, tmp_path: Path) -> None:
    detector = defectflow.create(method, **TINY[method]).fit(small_bottle, progress=False)
    good = [s.path for s in small_bottle.test if s.label == 0]
    odd = _odd_frames(tmp_path / "odd", good[0])
    prediction = detector.predict(good + list(odd.values()), progress=False)
    verdicts = dict(zip(["good"] * len(good) + list(odd), prediction.verdicts))
    assert not prediction.invalid[: len(good)].any(), prediction.frame[: len(good)]  # real good parts: no false alarm
    for name in odd:
        assert verdicts[name] != "OK", (name, prediction.frame)
    assert prediction.invalid[len(good):].all(), prediction.frame[len(good):]  # each flagged by the guard itself
    reasons = dict(zip(list(odd), prediction.frame_reasons[len(good):]))
    assert "contrast" in reasons["black"] and "brightness" in reasons["underexposed"] and "colour" in reasons["in grey"]

    if method == "cflow":  # the same through the command line, with the reason in scores.csv
        checkpoint = detector.save(tmp_path / "model")
        # a checkpoint saved before the colour check loads without it, and with the rest of its guard
        from defectflow.checkpoint import read_checkpoint

        meta, state = read_checkpoint(checkpoint)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "predates the frame guard" warning
            older = type(detector).from_checkpoint(meta, {k: v for k, v in state.items() if k != "guard.colour_range"}, "cpu")
        assert older.model.guard.colour_range.tolist() == [0.0, -1.0, 1.0]
        assert torch.equal(older.model.guard.centre, detector.model.guard.centre)
        assert "colour" in detector.predict([odd["in grey"]], progress=False).frame_reasons[0]
        assert "colour" not in older.predict([odd["in grey"]], progress=False).frame_reasons[0]
        assert main(["predict", str(odd["grey"]), str(good[0]), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "p"), "--quiet"]) == 0
        rows = list(csv.DictReader((tmp_path / "p" / "scores.csv").open()))
        assert rows[0]["decision"] == "INVALID" and "contrast" in rows[0]["frame"] and rows[1]["frame"] == ""

"""Bad inputs, damaged files and interruptions: each refused with a one-line message naming the
file or option and the fix (exit 2), or survived and reported (exit 1), never a traceback.

The corpus is built in tmp_path from a few real bottle images; one tiny checkpoint is trained per
module (input size 64) and shared.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import defectflow
from conftest import link_bottle_slice
from defectflow import methods
from defectflow.bench import RUN_FILE, RunRecord, find_checkpoints
from defectflow.checkpoint import CONFIG_FILE, config_digest
from defectflow.cli import main
from defectflow.data.folder import AnomalyFolder
from defectflow.data.images import image_size, read_image
from defectflow.errors import CheckpointError, ConfigError, DataError, TrainingError
from defectflow.thresholds import Thresholds

TINY = ["--input-size", "64", "--meta-epochs", "1", "--sub-epochs", "1", "--epoch-vectors", "2000", "--batch-size", "8", "--quiet"]
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def corpus(bottle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bottle/: 6 train and 4 test images with masks (symlinks); train_only/: train/good alone,
    with a macOS resource fork and a hidden file beside the images."""
    root = tmp_path_factory.mktemp("corpus")
    link_bottle_slice(bottle, root / "bottle")
    good = root / "train_only" / "train" / "good"
    good.mkdir(parents=True)
    for image in sorted((root / "bottle" / "train" / "good").iterdir()):
        (good / image.name).symlink_to(image.resolve())
    (good / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (good / ".hidden.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A cflow checkpoint trained on train_only (6 images, the default val_fraction) and what train printed on stderr."""
    out = tmp_path_factory.mktemp("trained") / "model"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(["train", "--data", str(corpus / "train_only"), "--out", str(out), *TINY])
    assert status == 0, stderr.getvalue()
    return out, stderr.getvalue()


def copy_checkpoint(source: Path, target: Path, edit=None, version: int = 2) -> Path:
    """A copy of a checkpoint whose config.json is changed by edit(meta); version 1 has no config checksum."""
    shutil.copytree(source, target)
    meta = json.loads((target / CONFIG_FILE).read_text())
    if edit is not None:
        edit(meta)
    if version == 1:
        meta.pop("config_sha256", None)
        meta["format_version"] = 1
    (target / CONFIG_FILE).write_text(json.dumps(meta))
    return target


def copy_without_a_mask(corpus: Path, tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A copy of corpus/bottle whose first mask is gone: (the copy, that mask's path, its bytes)."""
    data = tmp_path / "bottle"
    shutil.copytree(corpus / "bottle", data, symlinks=True)
    mask = sorted((data / "ground_truth" / "broken_large").iterdir())[0]
    whole = mask.read_bytes()
    mask.unlink()
    return data, mask, whole


def error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# -- options: refused before any work ----------------------------------------------------------------
BAD_OPTIONS = [
    (["--levels", "-1"], "levels"),
    (["--smoothing-sigma", "-1"], "smoothing_sigma must be at least 0"),
    (["--method", "clscnf", "--frozen-epochs", "-1"], "frozen_epochs must be at least 0"),
    (["--method", "clscnf", "--frozen-epochs", "0", "--joint-epochs", "0"], "untrained"),
    (["--device", "banana"], "device must be auto, cpu, cuda"),
    (["--seed", "-1"], "seed must be at least 0"),
    (["--num-workers", "-1"], "num_workers must be at least 0"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "0"], "lr must be positive"),
    (["--method", "clscnf", "--cls-lr=-1e-3"], "cls_lr must be positive"),
    (["--method", "differnet", "--lr", "nan"], "lr must be a finite number"),
    (["--condition-dim", "0"], "condition_dim must be a positive multiple of 4"),
    (["--flow-map-stride", "3"], "flow_map_stride must be 1, 2 or 4"),
    (["--flow-neighbourhood", "2"], "flow_neighbourhood must be an odd number"),
    (["--method", "clscnf", "--smoothing-sigma", "1"], "flow_map_stride 2 needs smoothing_sigma of at least 2"),
    (["--method", "clscnf", "--cls-batch-size", "0"], "cls_batch_size must be at least 1"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append((["--device", "cuda"], "use --device cpu"))


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_options_are_refused_before_training(options, message, corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model"
    assert main(["train", "--data", str(corpus / "bottle"), "--out", str(out), *options, "--quiet"]) == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_command_options_are_checked(corpus: Path, tmp_path: Path, capsys) -> None:
    synth = ["synth", "--data", str(corpus / "bottle")]
    for option, message in [(["--count", "0"], "--count must be 1 to 256"), (["--count", "100000"], "--count must be 1 to 256"),
                            (["--input-size", "0"], "--input-size must be a multiple of 32"),
                            (["--input-size", "50"], "--input-size must be a multiple of 32")]:
        assert main([*synth, "--out", str(tmp_path / "g.png"), *option]) == 2, option
        assert message in error_line(capsys)
    for out in (tmp_path / "grid", tmp_path / "grid.txt", tmp_path):  # no extension, another one, a folder
        assert main([*synth, "--out", str(out), "--overwrite"]) == 2, out
        assert "must be the path of a .png file" in error_line(capsys)
    inside = corpus / "bottle" / "train" / "good" / "grid.png"
    assert main([*synth, "--out", str(inside), "--count", "1", "--input-size", "64"]) == 2
    assert "is read as data" in error_line(capsys) and not inside.exists()
    bench = ["bench", "--dataset", "folder", "--methods", "cflow", "--out", str(tmp_path / "b"), "--quiet"]
    assert main([*bench, "--root", str(corpus), "--runs", "0"]) == 2
    assert "runs must be at least 1" in error_line(capsys)
    assert main([*bench, "--root", str(tmp_path / "missing")]) == 2
    err = error_line(capsys)
    assert "--root" in err and "missing is not a folder" in err and "/all" not in err
    options = tmp_path / "opts.json"
    options.write_text(json.dumps({"cflow": {"meta_epoch": 1}}))
    assert main([*bench, "--root", str(corpus), "--options", str(options)]) == 2
    err = error_line(capsys)
    assert str(options) in err and "'meta_epoch' is not an option of cflow" in err


def test_python_api_wrong_types_and_empty_inputs(trained) -> None:
    with pytest.raises(ConfigError, match="input_size must be of type"):
        defectflow.create("cflow", input_size="64")
    with pytest.raises(ConfigError, match="meta_epochs must be of type int"):
        defectflow.create("cflow", meta_epochs=1.5)
    with pytest.raises(ConfigError, match="levels must be of type tuple"):
        defectflow.create("cflow", levels=("2",))
    with pytest.raises(DataError, match="No images given to fit"):
        defectflow.create("cflow").fit([])
    with pytest.raises(DataError, match="No images given to predict"):
        defectflow.load(trained[0]).predict([])


# -- train and run check their output and data before training -----------------------------------------
def test_train_refuses_its_out_before_training(corpus: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(methods.Detector, "fit", no_training)
    data = ["--data", str(corpus / "bottle")]
    (tmp_path / "empty").mkdir()
    assert main(["train", *data, "--out", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "already exists" in error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert main(["train", *data, "--out", str(tmp_path / "file"), "--overwrite", "--quiet"]) == 2
    assert "is a file" in error_line(capsys)
    assert main(["train", *data, "--out", str(tmp_path / "file" / "model"), "--quiet"]) == 2
    assert "is a file, not a folder" in error_line(capsys)
    inside = corpus / "bottle" / "test" / "model"  # its images would be read as test images next time
    assert main(["train", *data, "--out", str(inside), "--quiet"]) == 2
    assert "lies inside" in error_line(capsys) and not inside.exists()
    monkeypatch.setattr("defectflow.files.os.access", lambda path, mode: False)  # a read-only parent (root ignores chmod)
    assert main(["train", *data, "--out", str(tmp_path / "new"), "--quiet"]) == 2
    assert "not writable" in error_line(capsys)
    assert main(["run", *data, "--out", str(tmp_path / "new"), "--quiet"]) == 2
    assert "not writable" in error_line(capsys)


def test_a_texture_folder_that_is_not_there_is_refused_before_training_even_where_unused(corpus: Path, tmp_path: Path,
                                                                                          capsys, monkeypatch) -> None:
    monkeypatch.setattr(methods.Detector, "_fit", lambda *a, **k: pytest.fail("trained before checking --texture-dir"))
    missing = tmp_path / "dtd"
    for method in ("cflow", "clscnf"):  # cflow without a validation set never makes a synthetic defect
        assert main(["train", "--method", method, "--data", str(corpus / "bottle"), "--out", str(tmp_path / method),
                     "--texture-dir", str(missing), "--val-fraction", "0", *TINY]) == 2
        assert f"Folder not found: {missing}" in error_line(capsys)
        assert not (tmp_path / method).exists()


def test_run_checks_test_images_and_masks_before_training(corpus: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(methods.Detector, "fit", lambda *a, **k: pytest.fail("trained before checking the test split"))
    data, mask, whole = copy_without_a_mask(corpus, tmp_path)
    Image.new("L", (100, 100)).save(mask)
    assert main(["run", "--data", str(data), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = error_line(capsys)
    assert str(mask) in err and "100x100" in err and "size of their image" in err
    mask.write_bytes(whole[: len(whole) // 2])  # its header is whole: only decoding finds it
    assert main(["run", "--data", str(data), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert f"Cannot read mask {mask}" in error_line(capsys)
    mask.unlink()
    assert main(["run", "--data", str(data), "--out", str(tmp_path / "run2"), "--quiet"]) == 2
    assert "No mask for defective image" in error_line(capsys)
    shutil.rmtree(data / "ground_truth")
    broken = sorted((data / "test" / "good").iterdir())[0]
    broken.unlink()
    broken.write_bytes(b"GIF89a nothing")
    assert main(["run", "--data", str(data), "--out", str(tmp_path / "run3"), "--quiet"]) == 2
    assert f"Cannot read image {broken}" in error_line(capsys)
    (tmp_path / "run4").write_text("a file")
    assert main(["run", "--data", str(corpus / "bottle"), "--out", str(tmp_path / "run4"), "--quiet"]) == 2
    assert "is a file" in error_line(capsys)


def test_run_keeps_the_model_when_evaluation_fails_and_overwrite_replaces_everything(corpus: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "run"
    args = ["run", "--data", str(corpus / "bottle"), "--out", str(out), "--val-fraction", "0.34", *TINY]

    def broken_evaluate(self, *a, **k):
        raise DataError("evaluation broke")

    with monkeypatch.context() as patch:
        patch.setattr(methods.Detector, "evaluate", broken_evaluate)
        assert main(args) == 2
    assert "evaluation broke" in error_line(capsys)
    first = defectflow.load(out / "model")  # the trained model was saved before evaluating
    stale = out / "pictures" / "FP" / "stale.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier run")
    (out / "results.json").write_text("{}")
    (out / "notes.txt").write_text("mine")  # not written by defectflow: kept

    assert main(args) == 2
    assert "not empty" in error_line(capsys)
    assert main([*args, "--overwrite", "--seed", "1"]) == 0
    assert not stale.exists() and (out / "notes.txt").read_text() == "mine" and json.loads((out / "results.json").read_text())["config"]["seed"] == 1
    assert defectflow.load(out / "model").config.seed == 1 and first.config.seed == 0
    assert (out / "report.html").is_file()


def test_overwrite_removes_only_defectflow_outputs_and_never_what_the_command_reads(trained, corpus: Path, tmp_path: Path,
                                                                                   capsys) -> None:
    from defectflow.workflow import OWNER_FILE, prepare_output

    # a folder the user made, with entries named like outputs: refused, not emptied
    mine = tmp_path / "mine"
    (mine / "pictures").mkdir(parents=True)
    (mine / "pictures" / "holiday.png").write_bytes(b"mine")
    (mine / "report.html").write_text("<html>mine</html>")
    with pytest.raises(DataError, match="did not record writing there"):
        prepare_output(mine, "x", overwrite=True)
    assert (mine / "pictures" / "holiday.png").exists() and (mine / "report.html").exists()
    # defectflow's own output: replaced, the user's other files kept
    ours = prepare_output(tmp_path / "ours", "x")
    (ours / "results.json").write_text("{}")
    (ours / "notes.txt").write_text("mine")
    assert prepare_output(ours, "x", overwrite=True) == ours and (ours / OWNER_FILE).is_file()
    assert prepare_output(tmp_path / "failed", "x") and prepare_output(tmp_path / "failed", "x")  # only its owner file: empty
    assert not (ours / "results.json").exists() and (ours / "notes.txt").read_text() == "mine"

    # the checkpoint a command reads, inside the output it would replace: refused, the model kept
    run = prepare_output(tmp_path / "run", "x")
    shutil.copytree(trained[0], run / "model")
    (run / "results.json").write_text("{}")
    image = str(next((corpus / "bottle" / "test" / "good").iterdir()))
    args = ["--checkpoint", str(run / "model"), "--out", str(run), "--overwrite", "--quiet"]
    assert main(["predict", image, *args]) == 2
    assert "which this command reads: --overwrite would delete" in error_line(capsys)
    assert main(["eval", "--data", str(corpus / "bottle"), *args]) == 2
    assert "which this command reads" in error_line(capsys)
    assert defectflow.load(run / "model").config == defectflow.load(trained[0]).config
    # an output inside the data's scanned folders would be read back as data; inside the checkpoint, changes it
    inside = corpus / "bottle" / "test" / "results"
    assert main(["eval", "--checkpoint", str(trained[0]), "--data", str(corpus / "bottle"), "--out", str(inside), "--quiet"]) == 2
    assert "lies inside" in error_line(capsys) and not inside.exists()
    assert main(["predict", image, "--checkpoint", str(trained[0]), "--out", str(trained[0] / "predictions"), "--quiet"]) == 2
    assert "lies inside" in error_line(capsys) and not (trained[0] / "predictions").exists()


# -- few images, train-only folders, eval without --data ----------------------------------------------
def test_train_on_train_good_only_warns_about_missing_thresholds(trained, corpus: Path, tmp_path: Path, capsys) -> None:
    path, stderr = trained
    assert "defectflow: warning: only 6 training images" in stderr and "Traceback" not in stderr
    meta = json.loads((path / CONFIG_FILE).read_text())
    assert meta["thresholds"] is None and Path(meta["trained_on"]["root"]).is_absolute()
    assert meta["trained_on"]["root"] == str((corpus / "train_only").absolute())
    images = corpus / "bottle" / "test" / "good"
    assert main(["predict", str(images), "--checkpoint", str(path), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "only 6 training images" in out and "--val-fraction 0)" not in out


def test_hidden_and_resource_fork_files_are_not_images(corpus: Path) -> None:
    folder = AnomalyFolder.scan(corpus / "train_only", require_test=False)
    assert len(folder.train) == 6 and not any(s.path.name.startswith(".") for s in folder.train)


def test_eval_without_data_uses_the_recorded_root(trained, corpus: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    # an older (version 1) checkpoint that recorded a relative root: relative to the checkpoint folder
    old = tmp_path / "checkpoints" / "old"
    relative = os.path.relpath(corpus / "bottle", old)
    copy_checkpoint(trained[0], old, lambda meta: meta.update(trained_on={"category": "bottle", "root": relative}), version=1)
    monkeypatch.chdir(tmp_path)  # not where the relative path starts
    assert main(["eval", "--checkpoint", str(old), "--out", str(tmp_path / "e"), "--no-pictures", "--quiet"]) == 0
    assert f"on {corpus / 'bottle'} (the data it was trained on" in capsys.readouterr().out
    # a folder of `train` checkpoints: no training times, the summary still comes out
    assert main(["eval", "--checkpoint", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "all"), "--quiet"]) == 0
    assert "1 of 1 checkpoints evaluated" in capsys.readouterr().out
    assert json.loads((tmp_path / "all" / "summary.json").read_text())["summary"]["cflow"]["bottle"]["train_seconds"] is None

    # evaluation scores test images only: a folder of test/ and ground_truth/ alone is enough for eval, not for train
    held = tmp_path / "held"
    for part in ("test", "ground_truth"):
        shutil.copytree(corpus / "bottle" / part, held / part, symlinks=True)
    assert main(["eval", "--checkpoint", str(trained[0]), "--data", str(held), "--out", str(tmp_path / "h"), "--no-pictures",
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "h" / "results.json").read_text())["results"]["held"]["aupro"] is not None
    assert main(["train", "--data", str(held), "--out", str(tmp_path / "m"), *TINY]) == 2
    assert "not in the MVTec AD layout" in error_line(capsys)


def test_eval_checks_masks_before_scoring_and_before_making_its_output(trained, corpus: Path, tmp_path: Path, capsys,
                                                                        monkeypatch) -> None:
    monkeypatch.setattr(methods.Detector, "evaluate", lambda *a, **k: pytest.fail("scored before checking the masks"))
    data, mask, whole = copy_without_a_mask(corpus, tmp_path)
    mask.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "e"
    assert main(["eval", "--checkpoint", str(trained[0]), "--data", str(data), "--out", str(out), "--quiet"]) == 2
    assert f"Cannot read mask {mask}" in error_line(capsys)
    assert not out.exists()


# -- images that cannot be read ------------------------------------------------------------------------
def test_predict_scores_every_readable_image_and_reports_the_rest(trained, corpus: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    images.mkdir()
    real = sorted((corpus / "bottle" / "test" / "broken_large").iterdir())[0]
    shutil.copy(real, images / "good.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (images / "truncated.png").write_bytes(real.read_bytes()[:3000])
    (images / "._good.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    picture = Image.open(real).convert("RGB").resize((90, 60))
    for mode in ("L", "P", "RGBA", "LA", "I;16"):
        (picture.convert("L").convert(mode) if mode == "I;16" else picture.convert(mode)).save(images / f"mode_{mode.replace(';', '')}.png")
    picture.convert("CMYK").save(images / "cmyk.jpg")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(images / "tiny.png")
    out = tmp_path / "pred"
    assert main(["predict", str(images), "--checkpoint", str(trained[0]), "--out", str(out), "--quiet"]) == 1
    err = error_line(capsys)
    assert "corrupt.png" in err and "truncated.png" in err and "2 image(s) could not be read" in err
    rows = {Path(r["path"]).name: r for r in csv.DictReader((out / "scores.csv").open())}
    assert "._good.png" not in rows and len(rows) == 10
    assert {name for name, r in rows.items() if r["error"]} == {"corrupt.png", "truncated.png"}
    assert all(float(r["score"]) == float(r["score"]) for r in rows.values() if not r["error"])
    assert len(list((out / "heatmaps").glob("*.png"))) == 8


def test_api_predict_records_failures_and_takes_arrays(trained, corpus: Path, tmp_path: Path) -> None:
    detector = defectflow.load(trained[0])
    real = sorted((corpus / "bottle" / "test" / "good").iterdir())[0]
    (tmp_path / "bad.png").write_bytes(b"nope")
    rgb = np.asarray(Image.open(real).convert("RGB").resize((80, 80)))
    inputs = [rgb, rgb.mean(axis=2) / 255.0, Image.fromarray(rgb), tmp_path / "bad.png", real]
    prediction = detector.predict(inputs, progress=False)
    assert [str(p) for p in prediction.paths] == ["<array 0>", "<array 1>", "<array 2>", str(real)]
    assert list(prediction.failed) == [tmp_path / "bad.png"] and "Cannot read image" in prediction.failed[tmp_path / "bad.png"]
    assert len(prediction.scores) == 4 and prediction.maps.shape == (4, 64, 64)
    assert abs(prediction.scores[0] - prediction.scores[2]) < 1e-5  # the same picture as uint8 array and as PIL image
    with pytest.raises(DataError, match=r"<array 0>.*\[0, 1\]"):
        detector.predict([rgb.astype(np.float32)], progress=False)  # 0-255 floats
    with pytest.raises(DataError, match="<array 0>.*H x W"):
        detector.predict([np.zeros((4, 4, 4, 4))], progress=False)


def test_image_safety_limits(corpus: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    real = sorted((corpus / "bottle" / "train" / "good").iterdir())[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # the bottle's 900x900 is a "bomb" now
    with pytest.raises(DataError, match=f"{real.name}.*more pixels than PIL reads safely"):
        read_image(real)
    monkeypatch.undo()
    # EXIF orientation 6 (rotate 90 degrees): a 90x60 file is a 60x90 picture
    wide = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(real).convert("RGB").resize((90, 60)).save(wide, exif=exif)
    assert image_size(wide) == (60, 90) and read_image(wide).shape == (3, 90, 60)
    # a training image of 1x1 px
    data = tmp_path / "small"
    shutil.copytree(corpus / "train_only", data, symlinks=True)
    Image.new("RGB", (1, 1)).save(data / "train" / "good" / "icon.png")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    err = error_line(capsys)
    assert "icon.png is 1x1 px" in err and "at least 32 px" in err


# -- checkpoints ----------------------------------------------------------------------------------------
def _set_option(meta, key, value):
    meta["config"][key] = value


DAMAGE = [
    ("edited", lambda m: _set_option(m, "smoothing_sigma", 0.0), 2, "changed after it was saved"),
    ("v1 missing option", lambda m: m["config"].pop("lr"), 1, "lacks the options ['lr']"),
    ("v1 wrong type", lambda m: _set_option(m, "meta_epochs", "two"), 1, "meta_epochs must be of type int"),
    ("v1 bad value", lambda m: _set_option(m, "levels", [-1]), 1, "levels are backbone stages"),
    ("v1 no method", lambda m: m.pop("method"), 1, "lacks method"),
    ("v1 config is a list", lambda m: m.update(config=[1, 2]), 1, "config should be a JSON dict"),
    ("v1 bad thresholds", lambda m: m.update(thresholds={"image": "x"}), 1, "thresholds are malformed"),
    ("v1 NaN threshold", lambda m: m.update(thresholds={"image": float("nan"), "pixel": 0.5, "rule": "far"}), 1, "thresholds must be finite numbers"),
]


@pytest.mark.parametrize("edit, version, message", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_checkpoints_are_refused(edit, version, message, trained, tmp_path: Path, capsys) -> None:
    broken = copy_checkpoint(trained[0], tmp_path / "broken", edit, version)
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        defectflow.load(broken)
    assert main(["predict", str(tmp_path), "--checkpoint", str(broken), "--out", str(tmp_path / "p"), "--quiet"]) == 2
    err = error_line(capsys)
    assert message in err and str(broken) in err


def test_a_diverged_model_never_passes_a_frame_and_is_neither_kept_nor_loaded(trained, corpus: Path, tmp_path: Path, capsys) -> None:
    """NaN compares false with everything: a NaN score or threshold would let every frame pass as OK."""
    out = tmp_path / "diverged"
    assert main(["train", "--data", str(corpus / "bottle"), "--out", str(out), *TINY, "--val-fraction", "0.5", "--lr", "100"]) == 2
    assert "diverged" in error_line(capsys) and not out.exists()
    detector = defectflow.load(trained[0])
    with torch.no_grad():
        next(detector.model.scorer.flows.parameters()).fill_(float("nan"))
    detector.thresholds = Thresholds(image=0.5, pixel=0.5, rule="far")
    image = sorted((corpus / "bottle" / "train" / "good").iterdir())[0]  # one the frame guard passes
    prediction = detector.predict([image], progress=False)
    assert np.isnan(prediction.scores).all() and prediction.verdicts == ["INVALID"] and prediction.defective.all()
    assert prediction.frame_reasons == ["score is not a number"]
    saved = detector.save(tmp_path / "nan")
    with pytest.raises(CheckpointError, match="hold NaN or infinite values"):
        defectflow.load(saved)
    with pytest.raises(TrainingError, match="not finite"):
        detector._check_finite()
    with pytest.raises(ConfigError, match="not trained"):
        detector.predict([image], progress=False)


def test_version_1_checkpoints_still_load(trained, tmp_path: Path) -> None:
    old = copy_checkpoint(trained[0], tmp_path / "old", version=1)
    assert defectflow.load(old).config.input_size == (64, 64)
    meta = json.loads((trained[0] / CONFIG_FILE).read_text())
    assert meta["format_version"] == 2 and meta["config_sha256"] == config_digest(meta)


def test_weights_of_another_model_do_not_fit(corpus: Path, tmp_path: Path, capsys) -> None:
    import timm
    from safetensors.torch import save_file

    other = tmp_path / "lite2.safetensors"
    save_file(timm.create_model("tf_efficientnet_lite2", pretrained=False).state_dict(), str(other))
    assert main(["train", "--data", str(corpus / "bottle"), "--out", str(tmp_path / "m"), "--weights", str(other), "--quiet"]) == 2
    err = error_line(capsys)
    assert "does not fit tf_efficientnet_lite0" in err and "Download" not in err


def test_ctrl_c_is_one_line_and_130(corpus: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(methods.Detector, "fit", interrupted)
    assert main(["train", "--data", str(corpus / "bottle"), "--out", str(tmp_path / "m"), "--quiet"]) == 130
    assert capsys.readouterr().err == "defectflow: interrupted\n"


# -- killed commands leave nothing half-written that passes for finished ---------------------------------
def test_bench_killed_at_random_times_resumes_cleanly(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    args = ["bench", "--dataset", "folder", "--root", str(corpus / "bottle"), "--methods", "cflow", "--runs", "1",
            "--out", str(out), "--pictures", "none", "--val-fraction", "0.34", *TINY]
    rng = random.Random()
    start = time.monotonic()
    for _ in range(3):
        if time.monotonic() - start > 20:  # bounded: at most 3 kills and about half a minute
            break
        process = subprocess.Popen([sys.executable, "-m", "defectflow.cli", *args], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(SRC)})
        try:
            process.wait(timeout=rng.uniform(2.0, 9.0))  # from start-up to saving and reporting the run
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        # whatever is there now is either finished and whole, or not taken as finished
        for record_file in out.rglob(RUN_FILE):
            record = RunRecord.read(record_file)
            assert record is not None and record.status == "ok"
            defectflow.load(record_file.parent / "model")
        for checkpoint in find_checkpoints(out) if out.is_dir() else []:
            defectflow.load(checkpoint)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 of 1 runs finished" in printed
    assert RunRecord.read(out / "cflow" / "bottle" / "run-0" / RUN_FILE).status == "ok"
    # the same bench folder on other data is refused, and a failed category makes the exit status 1
    other = tmp_path / "elsewhere" / "bottle"
    shutil.copytree(corpus / "bottle", other, symlinks=True)
    assert main([*args[:4], str(other), *args[5:]]) == 2
    assert "was made on" in error_line(capsys)
    record_file = out / "cflow" / "bottle" / "run-0" / RUN_FILE  # as an older defectflow wrote it: no data root
    record_file.write_text(json.dumps({k: v for k, v in json.loads(record_file.read_text()).items() if k != "data_root"}))
    assert main(args) == 0
    assert "1 finished run(s) do not record their data" in capsys.readouterr().out
    assert main(["bench", "--dataset", "folder", "--root", str(corpus), "--categories", "nope", "--methods", "cflow",
                 "--out", str(tmp_path / "b2"), "--pictures", "none", *TINY]) == 1
    assert "Category folder not found" in capsys.readouterr().out


def test_export_prints_a_command_that_works(trained, corpus: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    for out in (tmp_path, tmp_path / "model"):  # a folder, no .onnx: refused before the export, with the fix
        assert main(["export", "--checkpoint", str(trained[0]), "--out", str(out), "--overwrite", "--quiet"]) == 2
        assert "must be the path of an .onnx file" in error_line(capsys)
    onnx = tmp_path / "elsewhere" / "x.onnx"
    assert main(["export", "--checkpoint", str(trained[0]), "--out", str(onnx), "--int8", "--quiet"]) == 0
    printed = capsys.readouterr().out
    command = printed.split("`")[1].split()
    assert command[0] == "defectflow" and command[-1] == "IMAGES..."
    # too few images for a validation set: the INT8 check falls back on the calibration (training) images
    assert "INT8 vs fp32 on 6 training images (no test image)" in printed and (tmp_path / "elsewhere" / "x-int8.xml").is_file()
    assert "fitted again on its own INT8 features" in printed  # a cflow model: its INT8 flows are its own
    images = corpus / "bottle" / "test" / "good"
    assert main([*command[1:-1], str(images), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    int8 = [*command[1:-1], "--backend", "openvino-int8"]
    assert main([*int8, str(images), "--out", str(tmp_path / "q"), "--quiet"]) == 0
    # the ONNX file gone and its INT8 model still there: that is replaced only when asked
    onnx.unlink()
    before = (tmp_path / "elsewhere" / "x-int8.xml").read_bytes()
    assert main(["export", "--checkpoint", str(trained[0]), "--out", str(onnx), "--int8", "--quiet"]) == 2
    assert "x-int8.xml already exists" in error_line(capsys) and not onnx.exists()
    assert (tmp_path / "elsewhere" / "x-int8.xml").read_bytes() == before

"""ONNX export: the exported graph gives the same maps and scores as PyTorch, through `predict`."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

import defectflow
from defectflow.cli import main
from defectflow.data.folder import AnomalyFolder
from defectflow.errors import CheckpointError, ConfigError
from defectflow.export import export_onnx

TINY = {
    "cflow": dict(input_size=64, meta_epochs=1, sub_epochs=2, fiber_batch=256, batch_size=8, val_fraction=0.25, levels=(3, 4)),
    "clscnf": dict(input_size=64, meta_epochs=1, sub_epochs=2, fiber_batch=256, batch_size=8, val_fraction=0.25,
                   levels=(3, 4), decoder_levels=(2, 3, 4), decoder_width=16, frozen_epochs=1, joint_epochs=1),
}


def _close(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference relative to the values' scale (maps of a tiny model can be large)."""
    return float(np.abs(a - b).max() / max(1.0, np.abs(a).max()))


@pytest.mark.parametrize("method", ["cflow", "clscnf"])
def test_onnx_gives_the_same_maps_as_pytorch(method: str, small_bottle: AnomalyFolder, tmp_path: Path) -> None:
    detector = defectflow.create(method, **TINY[method]).fit(small_bottle, progress=False)
    checkpoint = detector.save(tmp_path / "model")
    export_onnx(defectflow.load(checkpoint), checkpoint)

    torch_run = defectflow.load(checkpoint).predict(small_bottle, progress=False)
    onnx_run = defectflow.load(checkpoint, backend="onnx").predict(small_bottle, progress=False)
    assert _close(torch_run.maps, onnx_run.maps) < 1e-4
    assert _close(torch_run.scores, onnx_run.scores) < 1e-4
    assert set(onnx_run.head_maps) == set(torch_run.head_maps)
    for name in torch_run.head_maps:
        assert _close(torch_run.head_maps[name], onnx_run.head_maps[name]) < 1e-4
    np.testing.assert_array_equal(torch_run.defective, onnx_run.defective)

    # the same `predict` command, either backend
    for backend in ("torch", "onnx"):
        out = tmp_path / backend
        images = small_bottle.test[0].path.parent
        assert main(["predict", str(images), "--checkpoint", str(checkpoint), "--backend", backend, "--out", str(out), "--quiet"]) == 0
    rows = {b: list(csv.DictReader((tmp_path / b / "scores.csv").open())) for b in ("torch", "onnx")}
    assert [r["decision"] for r in rows["torch"]] == [r["decision"] for r in rows["onnx"]]

    # an export from other weights is refused: change the weights, then put the old export back beside them
    kept = {name: (checkpoint / name).read_bytes() for name in ("model.onnx", "model.onnx.json")}
    with pytest.raises(CheckpointError, match="already exists"):
        export_onnx(defectflow.load(checkpoint), checkpoint)
    changed = defectflow.load(checkpoint)
    with torch.no_grad():
        next(changed.model.parameters()).add_(0.01)
    changed.save(checkpoint, overwrite=True)  # replaces the folder: the old export goes with it
    assert not (checkpoint / "model.onnx").exists()
    for name, data in kept.items():
        (checkpoint / name).write_bytes(data)
    with pytest.raises(CheckpointError, match="export it again"):
        defectflow.load(checkpoint, backend="onnx")
    (checkpoint / "model.onnx.json").unlink()
    with pytest.raises(CheckpointError, match="defectflow export"):
        defectflow.load(checkpoint, backend="onnx")


def test_differnet_export_is_refused_with_the_reason(tmp_path: Path, small_bottle: AnomalyFolder) -> None:
    detector = defectflow.create("differnet", input_size=64, meta_epochs=1, sub_epochs=1, augment_copies=1, test_rotations=1,
                                 subnet_width=32, coupling_blocks=2, val_fraction=0.0)
    detector.fit(small_bottle.train[:4], progress=False, log_test=False)
    checkpoint = detector.save(tmp_path / "model")
    with pytest.raises(ConfigError, match="gradient"):
        export_onnx(defectflow.load(checkpoint), checkpoint)

import json
from pathlib import Path

import pytest
import torch

from defectflow.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_checkpoint, save_checkpoint
from defectflow.errors import CheckpointError

STATE = {"a": torch.arange(6.0).view(2, 3), "b.c": torch.ones(4)}


def test_round_trip(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt", "cflow", {"lr": 0.1}, STATE)
    meta, state = read_checkpoint(path)
    assert meta["method"] == "cflow" and meta["config"] == {"lr": 0.1} and meta["format_version"] == 1
    assert torch.equal(state["a"], STATE["a"]) and torch.equal(state["b.c"], STATE["b.c"])
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_never_overwrites_without_asking(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt", "cflow", {"lr": 0.1}, STATE)
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        save_checkpoint(path, "cflow", {"lr": 0.2}, STATE)
    assert read_checkpoint(path)[0]["config"] == {"lr": 0.1}
    save_checkpoint(path, "cflow", {"lr": 0.2}, STATE, overwrite=True)
    assert read_checkpoint(path)[0]["config"] == {"lr": 0.2}


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a defectflow checkpoint"):
        save_checkpoint(precious, "cflow", {}, STATE, overwrite=True)
    assert (precious / "holiday.jpg").exists()


def test_truncated_weights_are_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt", "cflow", {}, STATE)
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(path)


def test_flipped_byte_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt", "cflow", {}, STATE)
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "config_text, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"format": "someone-else", "format_version": 1}), "not a defectflow checkpoint"),
        (json.dumps({"format": "defectflow-checkpoint", "format_version": 99}), "format version 99"),
    ],
)
def test_foreign_or_future_config_is_refused(tmp_path: Path, config_text: str, message: str) -> None:
    path = save_checkpoint(tmp_path / "ckpt", "cflow", {}, STATE)
    (path / CONFIG_FILE).write_text(config_text)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_missing_pieces(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_checkpoint(tmp_path / "empty")
    path = save_checkpoint(tmp_path / "ckpt", "cflow", {}, STATE)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_checkpoint(path)

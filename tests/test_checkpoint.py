import json
import os
import stat
from pathlib import Path

import pytest
import torch

from defectflow.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_checkpoint, save_checkpoint
from defectflow.errors import CheckpointError

STATE = {"a": torch.arange(6.0).view(2, 3), "b.c": torch.ones(4)}


def test_round_trip(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt", "cflow", {"lr": 0.1}, STATE)
    meta, state = read_checkpoint(path)
    assert meta["method"] == "cflow" and meta["config"] == {"lr": 0.1} and meta["format_version"] == 2
    assert torch.equal(state["a"], STATE["a"]) and torch.equal(state["b.c"], STATE["b.c"])
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging folder left behind


def test_permissions_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "ckpt", "cflow", {}, STATE)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # tempfile.mkdtemp made it 0700
    assert {stat.S_IMODE((path / name).stat().st_mode) for name in (CONFIG_FILE, WEIGHTS_FILE)} == {0o644}


def test_edited_config_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt", "cflow", {"lr": 0.1}, STATE)
    meta = json.loads((path / CONFIG_FILE).read_text())
    meta["config"]["lr"] = 0.5
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="changed after it was saved"):
        read_checkpoint(path)


def test_version_1_still_loads_and_its_layout_is_checked(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "ckpt", "cflow", {"lr": 0.1}, STATE)
    meta = json.loads((path / CONFIG_FILE).read_text())
    del meta["config_sha256"]
    meta["format_version"] = 1
    (path / CONFIG_FILE).write_text(json.dumps(meta))
    assert read_checkpoint(path)[0]["config"] == {"lr": 0.1}
    for key, value, message in [("config", None, "config should be a JSON dict"), ("method", 3, "method should be a JSON str"),
                                ("trained_on", {"root": 1}, "trained_on should name"), ("thresholds", [1], "thresholds should be")]:
        broken = {**meta, key: value}
        (path / CONFIG_FILE).write_text(json.dumps(broken))
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(path)
    (path / CONFIG_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "weights_sha256"}))
    with pytest.raises(CheckpointError, match="lacks weights_sha256"):
        read_checkpoint(path)


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
        (json.dumps({"format": "defectflow-checkpoint", "format_version": "2"}), "format version '2'"),  # a string, not 2
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
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file; a checkpoint is the folder"):
        read_checkpoint(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_checkpoint(tmp_path / "empty")
    path = save_checkpoint(tmp_path / "ckpt", "cflow", {}, STATE)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_checkpoint(path)


def test_configs_written_before_an_option_load_with_the_behaviour_they_had() -> None:
    from defectflow.methods import ClsCNFConfig

    written = ClsCNFConfig().to_json()
    older = {k: v for k, v in written.items() if k not in ("tune_from_level", "flow_map_stride", "flow_neighbourhood")}
    config = ClsCNFConfig.from_json(older)
    assert config.tune_from_level == 0 and config.flow_map_stride == 1  # the whole extractor tuned, full-size flow map
    assert config.flow_neighbourhood == 1 and ClsCNFConfig().flow_neighbourhood == 3  # flows on single cells, as then
    assert ClsCNFConfig.from_json(written) == ClsCNFConfig()
    with pytest.raises(CheckpointError, match="flow_map_stride must be"):
        ClsCNFConfig.from_json({**written, "flow_map_stride": 3})

from pathlib import Path

import pytest

from defectflow.data.elpv import prepare_elpv
from defectflow.data.folder import AnomalyFolder
from defectflow.errors import DataError


def test_elpv_task_in_mvtec_layout(tmp_path: Path) -> None:
    root = prepare_elpv(tmp_path / "elpv", n_train=10, n_test_good=4, n_test_defective=5)
    folder = AnomalyFolder.scan(root)
    assert len(folder.train) == 10 and not folder.has_masks
    assert sorted(s.label for s in folder.test) == [0] * 4 + [1] * 5
    names = [s.path.name for s in (*folder.train, *folder.test)]
    assert len(set(names)) == len(names)  # train and test never share a cell
    stamp = (root / "train" / "good" / folder.train[0].path.name).stat().st_mtime_ns
    assert prepare_elpv(tmp_path / "elpv", n_train=10, n_test_good=4, n_test_defective=5) == root
    assert (root / "train" / "good" / folder.train[0].path.name).stat().st_mtime_ns == stamp  # reused


def test_elpv_refuses_a_foreign_folder_and_impossible_sizes(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(DataError, match="not made by defectflow"):
        prepare_elpv(tmp_path / "mine")
    with pytest.raises(DataError, match="functional"):
        prepare_elpv(tmp_path / "big", n_train=10_000)

"""Whole-dataset runs: resume, failures kept apart, mean ± std aggregation, re-evaluation, HTML."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import link_bottle_slice
from defectflow.bench import RunRecord, aggregate, evaluate_saved, resolve_categories, run_bench
from defectflow.errors import ConfigError

TINY = {"cflow": dict(input_size=128, meta_epochs=1, sub_epochs=1, fiber_batch=512, batch_size=8, val_fraction=0.5)}


@pytest.fixture(scope="module")
def dataset(bottle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two categories: a slice of the real bottle (symlinks), and one whose training image is corrupt."""
    root = tmp_path_factory.mktemp("dataset")
    link_bottle_slice(bottle, root / "bottle")
    shutil.copytree(root / "bottle", root / "cracked", symlinks=True)
    bad = sorted((root / "cracked" / "train" / "good").iterdir())[0]
    bad.unlink()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture(scope="module")
def bench(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RunRecord], list[str]]:
    out = tmp_path_factory.mktemp("bench") / "b"
    lines: list[str] = []
    records = run_bench(out, "folder", dataset, ["all"], ["cflow"], runs=2, options=TINY, progress=False, log=lines.append)
    return out, records, lines


def test_failures_are_isolated_and_reported(bench) -> None:
    out, records, _ = bench
    status = {(r.category, r.run): r.status for r in records}
    assert status == {("bottle", 0): "ok", ("bottle", 1): "ok", ("cracked", 0): "failed", ("cracked", 1): "failed"}
    failed = next(r for r in records if r.category == "cracked")
    assert "cracked" in failed.error and "DataError" in failed.error
    summary = (out / "summary.md").read_text()
    assert "## Failed runs" in summary and "cracked" in summary
    data = json.loads((out / "summary.json").read_text())
    assert data["summary"]["cflow"]["bottle"]["runs_ok"] == 2
    assert [r["seed"] for r in data["runs"] if r["category"] == "bottle"] == [0, 1]
    bottle_row = next(line for line in summary.splitlines() if line.startswith("| bottle"))
    assert "±" in bottle_row
    assert (out / "cflow" / "bottle" / "run-0" / "model" / "model.safetensors").is_file()
    assert (out / "cflow" / "bottle" / "run-0" / "pictures").is_dir()  # pictures for the first run only
    assert not (out / "cflow" / "bottle" / "run-1" / "pictures").exists()
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,category,image_auroc_mean,image_auroc_std")
    assert any(line.startswith("cflow,bottle,") for line in csv_lines)


def test_resume_redoes_only_unfinished_runs(bench, dataset: Path) -> None:
    out, _, _ = bench
    finished = out / "cflow" / "bottle" / "run-0" / "run.json"
    stamp = finished.stat().st_mtime_ns
    (out / "cflow" / "bottle" / "run-1" / "run.json").unlink()  # as if interrupted during run 1
    lines: list[str] = []
    records = run_bench(out, "folder", dataset, ["all"], ["cflow"], runs=2, options=TINY, progress=False, log=lines.append)
    assert "4 runs, 1 already finished, 3 to do" in lines[0]
    assert [line for line in lines if line.startswith("[")] == [
        "[1/3] cflow on bottle, run 1 (seed 1)", "[2/3] cflow on cracked, run 0 (seed 0)", "[3/3] cflow on cracked, run 1 (seed 1)"]
    assert finished.stat().st_mtime_ns == stamp
    assert sum(r.status == "ok" for r in records) == 2

    with pytest.raises(ConfigError, match=r"other options \(meta_epochs 1 there, 2 now\)"):  # says which
        run_bench(out, "folder", dataset, ["bottle"], ["cflow"], runs=1, options={"cflow": {**TINY["cflow"], "meta_epochs": 2}},
                  progress=False, log=lines.append)


def test_aggregate_mean_and_std_over_runs() -> None:
    def record(category: str, run: int, auroc: float) -> RunRecord:
        return RunRecord("m", category, run, "ok", metrics={"image_auroc": auroc, "pixel_auroc": None, "pixel_aupr": None, "aupro": None},
                         train_seconds=10.0 * (run + 1), ms_per_image=5.0)

    records = [record("a", 0, 0.9), record("a", 1, 0.8), record("b", 0, 1.0), record("b", 1, 0.6),
               RunRecord("m", "b", 2, "failed", error="boom")]
    rows = aggregate(records)["m"]
    assert rows["a"]["metrics"]["image_auroc"]["mean"] == pytest.approx(0.85)
    assert rows["a"]["metrics"]["image_auroc"]["std"] == pytest.approx(0.0707107, rel=1e-5)  # sample std of 0.9, 0.8
    assert rows["b"]["runs_failed"] == 1 and rows["a"]["metrics"]["pixel_auroc"] is None
    # average: per-run means over categories 0.95 and 0.70 -> mean 0.825, std 0.1767767
    assert rows["average"]["metrics"]["image_auroc"]["mean"] == pytest.approx(0.825)
    assert rows["average"]["metrics"]["image_auroc"]["std"] == pytest.approx(0.1767767, rel=1e-5)
    assert rows["average"]["train_seconds"]["mean"] == pytest.approx(15.0)


def test_eval_of_a_whole_bench_folder(bench, tmp_path: Path) -> None:
    out, _, _ = bench
    records = evaluate_saved(out, tmp_path / "again", progress=False, log=lambda _: None)
    assert sorted((r.category, r.run, r.status) for r in records) == [("bottle", 0, "ok"), ("bottle", 1, "ok")]
    first = json.loads((out / "cflow" / "bottle" / "run-0" / "results.json").read_text())["results"]["bottle"]
    again = next(r for r in records if r.run == 0).metrics
    assert again == pytest.approx(first)  # the same model scores the same
    assert (tmp_path / "again" / "summary.md").is_file()


def test_named_dataset_categories_missing_fail_alone(tmp_path: Path) -> None:
    (tmp_path / "bottle" / "train" / "good").mkdir(parents=True)
    found = dict(resolve_categories("mvtec", tmp_path, ["bottle", "cable"]))
    assert found["bottle"] == tmp_path / "bottle"
    assert "download" in str(found["cable"])


def test_report_renders_in_headless_chromium(bench, tmp_path: Path) -> None:
    out, _, _ = bench
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs it (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    text = (out / "report.html").read_text()
    assert "src=\"http" not in text and "src=\"/" not in text  # self-contained: nothing fetched
    # a copy that writes how many of its images decoded into the title, read back from the DOM
    probe = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
             "document.title='rendered '+i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>")
    page = tmp_path / "probe.html"
    page.write_text(text.replace("</head>", probe + "</head>", 1))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    images = text.count("<img ")
    assert images >= 8  # curves and per-image panels
    assert f"<title>rendered {images}/{images}</title>" in dom
    assert "Failed runs" in dom and "bottle" in dom

"""The bench on Ray (a 2-CPU local instance started here): the same tables as the local
executor, resume after the driver is killed, a killed worker's run tried again or reported, and
a clear error without Ray."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import link_bottle_slice
from defectflow.bench import RunRecord, run_bench
from defectflow.bench_ray import RaySettings
from defectflow.cli import main
from defectflow.errors import ConfigError
from test_bench import TINY

CATEGORIES = ("bottle", "bottle2")


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray with 2 CPUs in this process: benches here use it, drivers in subprocesses join it."""
    if os.environ.get("CI"):
        import ray  # CI installs the ray extra: a missing Ray fails there instead of skipping
    else:
        ray = pytest.importorskip("ray", reason="pip install 'defectflow[ray]' for the Ray executor tests")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(bottle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two categories, each a slice of the real bottle (symlinks)."""
    root = tmp_path_factory.mktemp("dataset")
    for name in CATEGORIES:
        link_bottle_slice(bottle, root / name)
    return root


@pytest.fixture(scope="module")
def local(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RunRecord]]:
    """The reference: the same bench with the local executor, on one torch thread as each Ray run here
    (1 CPU each): the same sums in the same order, so the same results."""
    out = tmp_path_factory.mktemp("local") / "b"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return out, run_bench(out, "folder", dataset, ["all"], ["cflow"], runs=2, options=TINY, progress=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)


def metrics(records: list[RunRecord]) -> dict[tuple[str, int], dict]:
    return {(r.category, r.run): r.metrics for r in records if r.status == "ok"}


def files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def metric_columns(out: Path) -> list[list[str]]:
    """summary.csv without the time columns, which differ between any two runs."""
    return [line.split(",")[:10] for line in (out / "summary.csv").read_text().splitlines()]


def test_ray_bench_gives_the_local_tables(ray_cluster, local, dataset: Path, tmp_path: Path) -> None:
    local_out, local_records = local
    out = tmp_path / "b"
    lines: list[str] = []
    records = run_bench(out, "folder", dataset, ["all"], ["cflow"], runs=2, options=TINY, progress=False, log=lines.append,
                        executor="ray", ray_settings=RaySettings(ship_results=True))  # files go through the driver
    assert len(local_records) == 4 and all(r.status == "ok" for r in local_records)
    assert metrics(records) == metrics(local_records)  # same seeds, same results
    assert metric_columns(out) == metric_columns(local_out)
    assert files(out) == files(local_out)  # run folders, run.json, tables, report.html: the same outputs
    assert (out / "report.html").read_text().count("<img ") == (local_out / "report.html").read_text().count("<img ")
    assert sum(line.startswith("  started cflow on ") for line in lines) == 4
    assert lines[-1] == "bench: 4 done, 0 failed, 0 running, 0 waiting"


def test_resume_after_the_driver_is_killed(ray_cluster, local, dataset: Path, tmp_path: Path) -> None:
    """A driver in a subprocess joins this test's Ray, is killed once run 0 is finished, and run again."""
    out = tmp_path / "b"
    options = tmp_path / "options.json"
    options.write_text(json.dumps(TINY))
    # 1.5 CPUs of 2: one run at a time, so the kill lands between runs; still one torch thread, as locally
    command = [sys.executable, "-m", "defectflow.cli", "bench", "--dataset", "folder", "--root", str(dataset), "--categories", "bottle",
               "--methods", "cflow", "--runs", "2", "--out", str(out), "--options", str(options), "--quiet", "--executor", "ray",
               "--address", ray_cluster.get_runtime_context().gcs_address, "--cpus-per-run", "1.5"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished = out / "cflow" / "bottle" / "run-0" / "run.json"
    deadline = time.monotonic() + 240
    while not finished.exists():
        assert driver.poll() is None and time.monotonic() < deadline, "the driver ended before finishing a run"
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    stamp = finished.stat().st_mtime_ns
    # Ray may have started run 1 before the kill: the driver's death ends it, and its worker may
    # have recorded it failed; either way it is not finished, and the tables are not written
    second = RunRecord.read(out / "cflow" / "bottle" / "run-1" / "run.json")
    assert (second is None or second.status == "failed") and not (out / "summary.md").exists()

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "2 runs, 1 already finished, 1 to do" in again.stdout  # a failed run is done again
    assert finished.stat().st_mtime_ns == stamp  # a finished run is never redone
    records = [RunRecord.read(out / "cflow" / "bottle" / f"run-{k}" / "run.json") for k in range(2)]
    assert metrics(records) == {key: value for key, value in metrics(local[1]).items() if key[0] == "bottle"}


def test_a_killed_worker_costs_only_its_run(ray_cluster, local, dataset: Path, tmp_path: Path) -> None:
    """Run 0's worker is killed on every try: reported failed after 1 + max_retries tries.
    Run 1's worker is killed on its first try only: tried again, with the local results."""
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        started = re.match(r"  started cflow on bottle, run (\d) .* \(pid (\d+)\)(, try \d)?$", line)
        if started and (started[1] == "0" or started[3] is None):
            os.kill(int(started[2]), signal.SIGKILL)  # a Ray worker of this test's own instance

    # pictures of every run: each run lasts a few seconds longer (the metrics are the same), so a kill
    # lands while its run is still going
    records = run_bench(tmp_path / "b", "folder", dataset, ["bottle"], ["cflow"], runs=2, options=TINY, pictures="all",
                        progress=False, log=log, executor="ray", ray_settings=RaySettings(max_retries=1))
    status = {r.run: r for r in records}
    assert status[0].status == "failed" and "after 2 tries" in status[0].error
    assert RunRecord.read(tmp_path / "b" / "cflow" / "bottle" / "run-0" / "run.json").status == "failed"
    assert status[1].status == "ok" and status[1].metrics == metrics(local[1])[("bottle", 1)]
    assert any(line.startswith("  started cflow on bottle, run 1") and line.endswith(", try 2") for line in lines)
    assert "## Failed runs" in (tmp_path / "b" / "summary.md").read_text()


def test_missing_ray_is_a_clear_error(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ConfigError, match=re.escape("pip install 'defectflow[ray]'")):
        run_bench(tmp_path / "b", "folder", dataset, ["all"], ["cflow"], options=TINY, log=lambda _: None, executor="ray")
    assert not list(tmp_path.glob("b/cflow/*/run-*"))  # nothing started
    assert main(["bench", "--dataset", "folder", "--root", str(dataset), "--out", str(tmp_path / "c"), "--cpus-per-run", "2"]) == 2
    assert "Ray settings (--cpus-per-run) need --executor ray" in capsys.readouterr().err

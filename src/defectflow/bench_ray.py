"""The bench on a Ray cluster: each category x method x run is one Ray task.

Ray is optional (`pip install 'defectflow[ray]'`) and imported only here, only when asked for.
The driver (the `defectflow bench` process) plans the bench, settles finished runs and writes
the tables, as with the local executor; a task runs bench.execute_run, the same body the local
executor runs, so a seed gives the same results wherever it ran.

Where a run's files go: a task that sees --out (the driver's token file is there: a shared
filesystem, or the driver's own machine) writes its run folder there; one that does not (or
every task, with ship_results) writes into a temporary folder and returns the files, and the
driver writes them under --out, run.json last. A worker that dies costs only its run: Ray runs it
again up to max_retries times, then the driver records it failed. A run's own error (bad data, a
bad option) is recorded as failed at once, as locally, never retried.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

from .bench import RUN_FILE, RunRecord, RunSpec, execute_run
from .errors import ConfigError
from .files import atomic_write_text
from .memory import keep_freed_memory

# written into --out by the driver; a task that reads the same token shares the driver's filesystem
TOKEN_FILE = ".defectflow-driver"


@dataclass(frozen=True)
class RaySettings:
    """How the bench uses Ray. address None: RAY_ADDRESS, else the cluster `ray start` made on
    this machine, else a local Ray instance for the bench's duration (or the Ray this process
    has already joined)."""

    address: str | None = None
    cpus_per_run: float = 1.0  # also the run's torch threads (whole, at least 1): concurrent runs share no core
    gpus_per_run: float = 0.0
    max_retries: int = 2  # extra tries of a run whose worker died (its own errors are never retried)
    ship_results: bool = False  # return every run's files to the driver even when the workers see --out

    def __post_init__(self) -> None:
        if self.cpus_per_run <= 0:
            raise ConfigError(f"--cpus-per-run must be positive, got {self.cpus_per_run}")
        if self.gpus_per_run < 0:
            raise ConfigError(f"--gpus-per-run must be 0 or more, got {self.gpus_per_run}")
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries must be 0 or more, got {self.max_retries}")


def import_ray() -> ModuleType:
    """Ray, or an error that says how to get it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'defectflow[ray]' "
                          "(on the driver and every worker), or use --executor local.") from None
    return ray


# how often the driver looks for started and finished runs: a start is logged (and a worker's pid
# known) within this, so it stays well under the shortest run (a few seconds)
POLL_SECONDS = 0.2


class _Board:
    """A Ray actor where each task says it started, and where (host, pid): the driver's count of
    running runs and its status lines; Ray alone does not tell a queued task from a running one."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str, int]] = []

    def started(self, index: int, host: str, pid: int) -> None:
        self.events.append((index, host, pid))

    def take(self) -> list[tuple[int, str, int]]:
        events, self.events = self.events, []
        return events


def _run_task(spec: RunSpec, index: int, out: str, token: str, ship: bool, threads: int,
              board: Any) -> tuple[RunRecord, list[str], dict[str, bytes] | None]:
    """One run on a worker: (record, its log lines, and its files when they must be shipped)."""
    import ray
    import torch

    board.started.remote(index, socket.gethostname(), os.getpid())  # no ray.get: a blocked task gives back its CPU
    if not ray.get_gpu_ids():  # Ray leaves a task without GPUs every GPU: device auto must mean the CPU it reserved
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(threads)
    keep_freed_memory()  # a worker is a process of its own: as under the CLI (memory.py)
    lines: list[str] = []
    marker = Path(out) / TOKEN_FILE
    if not ship and marker.is_file() and marker.read_text() == token:
        return execute_run(spec, spec.folder(Path(out)), False, lines.append), lines, None
    with tempfile.TemporaryDirectory(prefix="defectflow-run-") as tmp:
        run_dir = Path(tmp) / "run"
        record = execute_run(spec, run_dir, False, lines.append)
        files = {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    shown = str(spec.folder(Path(out)))  # where the driver will write them, not the worker's temporary folder
    return record, [line.replace(str(run_dir), shown) for line in lines], files


def _write_shipped(run_dir: Path, record: RunRecord, files: dict[str, bytes]) -> None:
    """A run's files from a worker, written under --out with run.json last: a folder without it is unfinished."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    for relative, data in files.items():
        if relative != RUN_FILE:
            path = run_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    record.write(run_dir / RUN_FILE)


def _lost(spec: RunSpec, run_dir: Path, exc: Exception, tries: int) -> RunRecord:
    """The record of a run whose task never returned (its worker or node died every try)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    record = RunRecord(spec.method, spec.category, spec.run, "failed", seed=spec.seed, config=spec.config,
                       data_root=spec.data_root, error=f"{type(exc).__name__} after {tries} tries: {first}")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "error.txt", str(exc))
    record.write(run_dir / RUN_FILE)
    return record


def run_on_ray(todo: Sequence[RunSpec], out: Path, settings: RaySettings, log: Callable[[str], None]) -> Iterator[RunRecord]:
    """Run every spec as a Ray task; yields each record as its run finishes, after its folder is
    complete under out. Logs each run's start (host, pid, try) and end, and the counts after each."""
    ray = import_ray()
    if not todo:
        return
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=settings.address)
        except (ConnectionError, RuntimeError) as exc:  # no cluster at the address; GCS unreachable or not started
            where = settings.address or os.environ.get("RAY_ADDRESS") or "this machine"
            raise ConfigError(f"Ray could not join or start a cluster ({where}): {str(exc).rstrip('.')}. Start one with "
                              "`ray start --head` (see the README) and give its address with --address.") from None
    resources = ray.cluster_resources()
    log(f"bench: Ray cluster with {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; "
        f"{settings.cpus_per_run:g} CPUs, {settings.gpus_per_run:g} GPUs per run")
    out.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    atomic_write_text(out / TOKEN_FILE, token)
    board = ray.remote(num_cpus=0)(_Board).remote()
    task = ray.remote(_run_task).options(
        num_cpus=settings.cpus_per_run, num_gpus=settings.gpus_per_run, max_retries=settings.max_retries, retry_exceptions=False)
    threads = max(1, int(settings.cpus_per_run))
    pending = {task.remote(spec, i, str(out), token, settings.ship_results, threads, board): i for i, spec in enumerate(todo)}
    tries: Counter[int] = Counter()
    counts: Counter[str] = Counter()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            events = ray.get(board.take.remote())
            for i, host, pid in events:
                tries[i] += 1
                log(f"  started {todo[i].title} on {host} (pid {pid})" + (f", try {tries[i]}" if tries[i] > 1 else ""))
            for ref in ready:
                i = pending.pop(ref)
                spec, run_dir = todo[i], todo[i].folder(out)
                try:
                    record, lines, files = ray.get(ref)
                except ray.exceptions.RayError as exc:  # its worker died every try, or the task could not start
                    record, files = _lost(spec, run_dir, exc, max(tries[i], 1)), None
                    lines = [f"  FAILED: {record.error} (details in {run_dir / 'error.txt'})"]
                if files is not None:
                    _write_shipped(run_dir, record, files)
                counts[record.status] += 1
                log(f"[{sum(counts.values())}/{len(todo)}] {spec.title}: {record.status}")
                for line in lines:
                    log(line)
                yield record
            if events or ready:
                running = len({i for i in tries if i in pending.values()})
                log(f"bench: {counts['ok']} done, {counts['failed']} failed, {running} running, "
                    f"{len(pending) - running} waiting")
    finally:
        ray.kill(board)
        if started_here:
            ray.shutdown()
        (out / TOKEN_FILE).unlink(missing_ok=True)

"""Whole-dataset runs: every category x method x seed, resumable, failures kept apart.

Layout of a bench folder:

    <out>/<method>/<category>/run-<k>/run.json   the record of one run (written last, atomically)
                                      model/     its checkpoint
                                      results.json, pictures/, curves/
    <out>/summary.md|csv|json, <out>/report.html

A run whose run.json says "ok" is finished and never redone; a run without one (interrupted) or
a failed one is started again from scratch. Run k trains with seed + k. The runs go one after
another in this process, or as tasks on a Ray cluster (bench_ray); execute_run does each either way.
"""

from __future__ import annotations

import json
import shutil
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from . import methods
from .checkpoint import CONFIG_FILE, FORMAT
from .data.folder import AnomalyFolder
from .data.named import DATASETS, category_root
from .errors import ConfigError, DataError
from .files import atomic_open, atomic_write_text
from .htmlreport import table, write_html
from .metrics import METRIC_NAMES, METRIC_TITLES
from .report import NOT_AVAILABLE, markdown_table
from .workflow import folder_section, report_evaluation, train_and_evaluate

RUN_FILE = "run.json"
PICTURE_CHOICES = ("first", "all", "none")
EXECUTORS = ("local", "ray")

if TYPE_CHECKING:
    from .bench_ray import RaySettings


@dataclass
class RunRecord:
    method: str
    category: str
    run: int
    status: str  # "ok" or "failed"
    seed: int | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    train_seconds: float | None = None
    ms_per_image: float | None = None
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None  # the category folder it ran on, absolute: a resumed bench must use the same data

    @classmethod
    def read(cls, path: Path) -> "RunRecord | None":
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # missing or unreadable: the run is not finished

    def write(self, path: Path) -> None:
        """Atomically: a run.json is either complete or absent."""
        atomic_write_text(path, json.dumps(asdict(self), indent=2))


# -- which categories -----------------------------------------------------------------------------
def resolve_categories(dataset: str, root: str | Path, categories: Sequence[str]) -> list[tuple[str, Path | DataError]]:
    """(name, folder) per category, or (name, error) for one that can't be found: it fails alone."""
    root = Path(root)
    if dataset != "folder" and dataset not in DATASETS:
        raise ConfigError(f"Unknown dataset {dataset!r}: choose one of folder, {', '.join(DATASETS)}.")
    if not root.is_dir():  # not a category named "all" that is missing: the whole root is
        raise DataError(f"--root {root} is not a folder; point --root at the folder that holds the categories.")
    every = list(categories) == ["all"]
    if dataset == "folder":
        if (root / "train").is_dir() and every:
            return [(root.name, root)]
        names = sorted(p.name for p in root.iterdir() if (p / "train").is_dir() and not p.name.startswith(".")) if every else list(categories)
        if not names:
            raise DataError(f"No category folders (with a train/ folder) in {root}.")
        return [(name, root / name if (root / name).is_dir() else DataError(f"Category folder not found: {root / name}")) for name in names]
    names = list(DATASETS[dataset]) if every else list(categories)
    found: list[tuple[str, Path | DataError]] = []
    for name in names:
        try:
            found.append((name, category_root(dataset, root, name)))
        except DataError as exc:
            found.append((name, exc))
    return found


# -- running ----------------------------------------------------------------------------------------
def _config_json(method: str, options: dict[str, Any], seed: int) -> dict[str, Any]:
    """The run's full config as run.json stores it (JSON has lists where the config has tuples)."""
    return json.loads(json.dumps(methods.create(method, **{**options, "seed": seed}).config.to_json()))


@dataclass(frozen=True)
class RunSpec:
    """One category x method x run still to do: all a worker needs to train and record it
    (plain data, so it can be shipped to another process or machine)."""

    method: str
    category: str
    run: int
    seed: int
    data: Path | DataError  # the category folder, or why it could not be found: the run fails alone
    options: dict[str, Any]  # the method's options, seed included
    config: dict[str, Any]
    data_root: str | None
    pictures: bool

    @property
    def title(self) -> str:
        return f"{self.method} on {self.category}, run {self.run} (seed {self.seed})"

    def folder(self, out: Path) -> Path:
        return out / self.method / self.category / f"run-{self.run}"


def execute_run(spec: RunSpec, run_dir: Path, progress: bool, log: Callable[[str], None]) -> RunRecord:
    """Train, evaluate and record one run in run_dir (emptied first: an interrupted or failed
    run starts again from scratch). The one body of every executor, so a run's results do not
    depend on where it ran; the run's own failure is recorded, not raised."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    record = RunRecord(spec.method, spec.category, spec.run, "failed", seed=spec.seed, config=spec.config, data_root=spec.data_root)
    try:
        if isinstance(spec.data, Exception):
            raise spec.data
        folder = AnomalyFolder.scan(spec.data)
        detector = methods.create(spec.method, **spec.options)
        evaluation, text, train_seconds = train_and_evaluate(
            detector, folder, run_dir, progress, pictures=spec.pictures, html=False, keep_validation=False)
        log(text)
        if evaluation.prediction.failed:
            log(f"  {len(evaluation.prediction.failed)} test image(s) could not be read and were left out: "
                + "; ".join(evaluation.prediction.failed.values()))
        record.status, record.metrics = "ok", evaluation.metrics
        record.train_seconds, record.ms_per_image = train_seconds, evaluation.ms_per_image
    except Exception as exc:  # noqa: BLE001 - one failing run must not lose the others
        record.error = f"{type(exc).__name__}: {exc}"
        atomic_write_text(run_dir / "error.txt", traceback.format_exc())
        log(f"  FAILED: {record.error} (details in {run_dir / 'error.txt'})")
    record.write(run_dir / RUN_FILE)
    return record


def _run_locally(todo: Sequence[RunSpec], out: Path, progress: bool, log: Callable[[str], None]) -> Iterator[RunRecord]:
    """One run after another in this process."""
    for index, spec in enumerate(todo, 1):
        log(f"[{index}/{len(todo)}] {spec.title}")
        yield execute_run(spec, spec.folder(out), progress, log)


def run_bench(
    out: str | Path,
    dataset: str,
    root: str | Path,
    categories: Sequence[str],
    method_names: Sequence[str],
    runs: int = 1,
    options: dict[str, dict[str, Any]] | None = None,
    pictures: str = "first",
    progress: bool = True,
    log: Callable[[str], None] = print,
    executor: str = "local",
    ray_settings: RaySettings | None = None,
) -> list[RunRecord]:
    """Train and evaluate every (category, method, run) not finished yet; returns all records
    (finished earlier or now) and writes the summary files.

    executor "local" runs them one after another here; "ray" as tasks on a Ray cluster
    (settings in ray_settings, see bench_ray), with the same results and the same folder."""
    out = Path(out)
    options = options or {}
    if runs < 1:
        raise ConfigError(f"runs must be at least 1, got {runs}")
    if pictures not in PICTURE_CHOICES:
        raise ConfigError(f"pictures must be one of {PICTURE_CHOICES}, got {pictures!r}")
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if ray_settings is not None and executor != "ray":
        raise ConfigError("Ray settings (--address, --cpus-per-run, ...) apply to --executor ray only.")
    unknown = sorted(set(method_names) - set(methods.METHODS)) + sorted(set(options) - set(method_names))
    if unknown:
        raise ConfigError(f"Unknown or unused method(s) {unknown}: --methods takes {', '.join(methods.METHODS)}, "
                          "and --options may only name methods that run.")
    found = resolve_categories(dataset, root, categories)
    data_roots = {name: str(path.absolute()) if isinstance(path, Path) else None for name, path in found}
    plan = [(m, name, path, k) for name, path in found for m in method_names for k in range(runs)]
    base_seed = {m: int(options.get(m, {}).get("seed", 0)) for m in method_names}
    configs = {m: {k: _config_json(m, options.get(m, {}), base_seed[m] + k) for k in range(runs)} for m in method_names}

    # settle what is finished before training anything, and refuse a folder made with other options
    finished: dict[tuple[str, str, int], RunRecord] = {}
    for method, name, _, k in plan:
        record = RunRecord.read(out / method / name / f"run-{k}" / RUN_FILE)
        if record is not None and record.status == "ok":
            asked = configs[method][k]
            differ = [f"{key} {record.config.get(key)!r} there, {asked.get(key)!r} now"
                      for key in sorted(set(record.config) | set(asked)) if record.config.get(key) != asked.get(key)]
            if differ:
                raise ConfigError(
                    f"{out / method / name / f'run-{k}'} was made with other options ({'; '.join(differ)}); continue it "
                    "with the same options (or those of the defectflow version that made it), or choose another --out."
                )
            if None not in (record.data_root, data_roots[name]) and record.data_root != data_roots[name]:
                raise ConfigError(
                    f"{out / method / name / f'run-{k}'} was made on {record.data_root}, not on {data_roots[name]}; "
                    "continue it with the same --root (and --dataset), or choose another --out."
                )
            finished[(method, name, k)] = record
    todo = [
        RunSpec(method, name, k, base_seed[method] + k, path, {**options.get(method, {}), "seed": base_seed[method] + k},
                configs[method][k], data_roots[name], pictures == "all" or (pictures == "first" and k == 0))
        for method, name, path, k in plan if (method, name, k) not in finished
    ]
    log(f"bench: {len(plan)} runs, {len(finished)} already finished, {len(todo)} to do; results in {out}")
    legacy = sum(record.data_root is None for record in finished.values())
    if legacy:  # written before run.json recorded it: nothing to compare, so say what is assumed
        log(f"bench: {legacy} finished run(s) do not record their data (older defectflow); kept as made on {root}")

    if executor == "ray":
        from .bench_ray import RaySettings, run_on_ray

        done = run_on_ray(todo, out, ray_settings or RaySettings(), log)
    else:
        done = _run_locally(todo, out, progress, log)
    for record in done:
        finished[(record.method, record.category, record.run)] = record
    records = [finished[(m, name, k)] for m, name, _, k in plan]
    write_summary(out, records, f"defectflow bench: {dataset} {root}")
    return records


# -- aggregation ------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float | None]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]  # e.g. no training time for a checkpoint from `train`
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "n": len(values)}


def aggregate(records: Sequence[RunRecord]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method, per category and for the average over categories: mean and std over runs of
    each metric, mean training seconds and ms/image, runs finished and failed.

    The average row's std is over runs of the per-run average over categories (the form papers
    report), using the run indices that finished in every category.
    """
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for method in dict.fromkeys(r.method for r in records):
        mine = [r for r in records if r.method == method]
        rows: dict[str, dict[str, Any]] = {}
        categories = list(dict.fromkeys(r.category for r in mine))
        for category in categories:
            ok = [r for r in mine if r.category == category and r.status == "ok"]
            rows[category] = {
                "metrics": {m: _mean_std([r.metrics[m] for r in ok if r.metrics.get(m) is not None]) for m in METRIC_NAMES},
                "train_seconds": _mean_std([r.train_seconds for r in ok]),
                "ms_per_image": _mean_std([r.ms_per_image for r in ok]),
                "runs_ok": len(ok),
                "runs_failed": sum(1 for r in mine if r.category == category and r.status != "ok"),
            }
        complete = [k for k in sorted({r.run for r in mine})
                    if all(any(r.category == c and r.run == k and r.status == "ok" for r in mine) for c in categories)]

        def per_run_average(key: Callable[[RunRecord], float | None]) -> dict[str, float] | None:
            averages = []
            for k in complete:
                values = [key(r) for r in mine if r.run == k and r.status == "ok"]
                values = [v for v in values if v is not None]
                if values:
                    averages.append(float(np.mean(values)))
            return _mean_std(averages)

        if len(categories) > 1:
            rows["average"] = {
                "metrics": {m: per_run_average(lambda r, m=m: r.metrics.get(m)) for m in METRIC_NAMES},
                "train_seconds": per_run_average(lambda r: r.train_seconds),
                "ms_per_image": per_run_average(lambda r: r.ms_per_image),
                "runs_ok": len(complete),
                "runs_failed": sum(1 for r in mine if r.status != "ok"),
            }
        summary[method] = rows
    return summary


def _cell(stat: dict[str, float] | None, scale: float = 100.0, digits: int = 2) -> str:
    if stat is None:
        return NOT_AVAILABLE
    text = f"{scale * stat['mean']:.{digits}f}"
    return text + (f" ± {scale * stat['std']:.{digits}f}" if stat["n"] > 1 else "")


SUMMARY_HEADER = ["Category", *(METRIC_TITLES[m] for m in METRIC_NAMES), "Train s", "ms/img", "runs"]


def summary_rows(rows: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [
        [name, *(_cell(row["metrics"][m]) for m in METRIC_NAMES), _cell(row["train_seconds"], 1.0, 1),
         _cell(row["ms_per_image"], 1.0, 1), f"{row['runs_ok']}" + (f" (+{row['runs_failed']} failed)" if row["runs_failed"] else "")]
        for name, row in rows.items()
    ]


def failures(records: Sequence[RunRecord]) -> list[list[str]]:
    return [[r.method, r.category, str(r.run), r.error or ""] for r in records if r.status != "ok"]


def write_summary(out: Path, records: Sequence[RunRecord], title: str) -> dict[str, Any]:
    """summary.md, summary.csv, summary.json and report.html for a bench (or a re-evaluation)."""
    summary = aggregate(records)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "Metrics in %, mean ± std over runs (seeds); times are means.", ""]
    for method, rows in summary.items():
        lines += [f"## {method}", "", markdown_table(SUMMARY_HEADER, summary_rows(rows)), ""]
    failed = failures(records)
    if failed:
        lines += ["## Failed runs", "", markdown_table(["Method", "Category", "Run", "Error"], failed), ""]
    atomic_write_text(out / "summary.md", "\n".join(lines))

    with atomic_open(out / "summary.csv", "w") as handle:
        columns = [f"{m}_{s}" for m in METRIC_NAMES for s in ("mean", "std")]
        handle.write(",".join(["method", "category", *columns, "train_seconds", "ms_per_image", "runs_ok", "runs_failed"]) + "\n")
        for method, rows in summary.items():
            for category, row in rows.items():
                stats = [row["metrics"][m] for m in METRIC_NAMES]
                values = [("" if st is None else f"{st[s]:.6f}") for st in stats for s in ("mean", "std")]
                times = ["" if row[k] is None else f"{row[k]['mean']:.3f}" for k in ("train_seconds", "ms_per_image")]
                handle.write(",".join([method, category, *values, *times, str(row["runs_ok"]), str(row["runs_failed"])]) + "\n")
    data = {"summary": summary, "failures": [asdict(r) for r in records if r.status != "ok"], "runs": [asdict(r) for r in records]}
    atomic_write_text(out / "summary.json", json.dumps(data, indent=2))

    sections = [table(SUMMARY_HEADER, summary_rows(rows)).replace("<table>", f"<h2>{method}</h2><table>", 1) for method, rows in summary.items()]
    if failed:
        sections.append("<h2>Failed runs</h2>" + table(["Method", "Category", "Run", "Error"], failed))
    for record in records:
        run_dir = out / record.method / record.category / f"run-{record.run}"
        if record.status == "ok" and (run_dir / "curves").is_dir():
            sections.append(folder_section(run_dir, f"{record.method} on {record.category}, run {record.run}"))
    write_html(out / "report.html", title, sections)
    return data


# -- re-evaluating saved models ---------------------------------------------------------------------
def find_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders at or below root (folders whose config.json is a defectflow checkpoint)."""
    root = Path(root)
    found = []
    for config in sorted(root.rglob(CONFIG_FILE)):
        if any(part.startswith(".") for part in config.relative_to(root).parts):
            continue  # a half-written checkpoint (hidden staging folder) or another hidden folder
        try:
            if json.loads(config.read_text()).get("format") == FORMAT:
                found.append(config.parent)
        except (ValueError, OSError, AttributeError):
            continue
    return found


def evaluate_saved(
    checkpoints: str | Path,
    out: str | Path,
    dataset: str | None = None,
    root: str | Path | None = None,
    pictures: bool = False,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[RunRecord]:
    """Evaluate every checkpoint below `checkpoints` on its category's test split: the category
    each was trained on, under --dataset/--root when given, else where it was trained."""
    out = Path(out)
    found = find_checkpoints(checkpoints)
    if not found:
        raise DataError(f"No defectflow checkpoints found in {checkpoints}.")
    records = []
    for index, path in enumerate(found, 1):
        relative = path.relative_to(checkpoints) if path != Path(checkpoints) else Path(".")
        run_dir = out / relative.parent if relative.name == "model" else out / relative
        record = RunRecord("?", "?", 0, "failed")
        try:
            detector = methods.load(path, device=device)
            trained_on = detector.trained_on or {}
            category = trained_on.get("category")
            if category is None:
                raise DataError(f"{path} does not record the category it was trained on; evaluate it with --data.")
            record.method, record.category = detector.method, category
            record.run = int(run_dir.name.split("-")[-1]) if run_dir.name.startswith("run-") else 0
            record.seed, record.config = detector.config.seed, detector.config.to_json()
            if dataset is not None:
                folder_path = category_root(dataset, root, category) if dataset != "folder" else Path(root) / category
            else:
                folder_path = Path(trained_on["root"])
            log(f"[{index}/{len(found)}] {detector.method} from {path} on {folder_path}")
            evaluation = detector.evaluate(AnomalyFolder.scan(folder_path), progress=progress)
            run_dir.mkdir(parents=True, exist_ok=True)
            bench_record = RunRecord.read(path.parent / RUN_FILE)
            train_seconds = bench_record.train_seconds if bench_record is not None else None
            report_evaluation(detector, evaluation, run_dir, pictures=pictures, train_seconds=train_seconds, html=False)
            record.status, record.metrics = "ok", evaluation.metrics
            record.train_seconds, record.ms_per_image = train_seconds, evaluation.ms_per_image
        except Exception as exc:  # noqa: BLE001 - one bad checkpoint must not lose the others
            record.error = f"{type(exc).__name__}: {exc} ({path})"
            log(f"  FAILED: {record.error}")
        records.append(record)
    write_summary(out, records, f"defectflow eval: checkpoints in {checkpoints}")
    return records

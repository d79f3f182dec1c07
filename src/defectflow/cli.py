"""The `defectflow` command: a thin layer over the Python API (create, fit, evaluate, save, load)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from . import methods
from .backends import BACKENDS, int8_files
from .bench import EXECUTORS, evaluate_saved, find_checkpoints, run_bench
from .bench_ray import RaySettings
from .checkpoint import CONFIG_FILE, check_target
from .data import download as downloads
from .data.elpv import prepare_elpv
from .data.folder import AnomalyFolder, fitted_size, samples_from_paths, scanned_folders
from .data.images import load_image
from .data.synthetic import DefectSynthesizer, TextureSource, sample_generator
from .data.named import DATASETS, category_root
from .errors import CheckpointError, DefectflowError, DefectflowWarning
from .export import ONNX_FILE, export_int8, export_onnx
from .files import containing
from .memory import keep_freed_memory
from .metrics import METRIC_NAMES, METRIC_TITLES
from .report import markdown_table, save_synthetic_grid, write_heatmaps, write_predictions
from .workflow import prepare_output, report_evaluation, train_and_evaluate


# -- options generated from the methods' config dataclasses ----------------------------------
def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One flag per config field of every method; defaults are listed per method where they differ."""
    group = parser.add_argument_group("method options (each method takes its own; see --method)")
    fields: dict[str, tuple[dataclasses.Field, Any, dict[str, Any]]] = {}
    for name, detector in methods.METHODS.items():
        hints = typing.get_type_hints(detector.config_class)
        for f in dataclasses.fields(detector.config_class):
            fields.setdefault(f.name, (f, hints[f.name], {}))[2][name] = f.default
    for name, (f, hint, defaults) in fields.items():
        shown = ", ".join(f"{m} {v}" for m, v in defaults.items()) if len(set(map(str, defaults.values()))) > 1 else next(iter(defaults.values()))
        text = f"{f.metadata.get('help', '')} (default: {shown})"
        flag = "--" + name.replace("_", "-")
        if hint is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(hint) is tuple:
            group.add_argument(flag, type=typing.get_args(hint)[0], nargs="+", default=None, help=text)
        else:
            kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if typing.get_args(hint) else hint
            group.add_argument(flag, type=kind, default=None, help=text)


def _given_options(args: argparse.Namespace) -> dict[str, Any]:
    every = {f.name for d in methods.METHODS.values() for f in dataclasses.fields(d.config_class)}
    return {name: (tuple(v) if isinstance(v, list) else v) for name, v in vars(args).items() if name in every and v is not None}


def _own_options(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(methods.METHODS[method].config_class)}


def _config_overrides(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The options given on the command line; one the method does not have is an error."""
    given = _given_options(args)
    foreign = sorted(set(given) - _own_options(method))
    if foreign:
        flags = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise DefectflowError(f"{flags} is not an option of --method {method}.")
    return given


def _bench_options(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per-method options: the --options file, then command-line flags for every method that has them."""
    per_method: dict[str, dict[str, Any]] = {}
    if args.options is not None:
        try:
            per_method = json.loads(Path(args.options).read_text())
        except (OSError, ValueError) as exc:
            raise DefectflowError(f"Cannot read --options {args.options}: {exc}") from None
        if not isinstance(per_method, dict) or not all(isinstance(v, dict) for v in per_method.values()):
            raise DefectflowError(f"--options {args.options} must be a JSON object of method -> {{option: value}}.")
        for method, given in per_method.items():
            if method not in methods.METHODS:
                raise DefectflowError(f"--options {args.options} names the method {method!r}; methods are {', '.join(methods.METHODS)}.")
            unknown = sorted(set(given) - _own_options(method))
            if unknown:
                raise DefectflowError(f"--options {args.options}: {', '.join(map(repr, unknown))} is not an option of {method} "
                                      f"(see `defectflow run --method {method} --help`; options use underscores, e.g. meta_epochs).")
        per_method = {m: {k: tuple(v) if isinstance(v, list) else v for k, v in o.items()} for m, o in per_method.items()}
    given = _given_options(args)
    unused = sorted(name for name in given if not any(name in _own_options(m) for m in args.methods))
    if unused:
        raise DefectflowError(f"{', '.join('--' + n.replace('_', '-') for n in unused)} is not an option of any of {args.methods}.")
    for method in args.methods:
        per_method.setdefault(method, {}).update({k: v for k, v in given.items() if k in _own_options(method)})
    return {m: o for m, o in per_method.items() if o or m in args.methods}


# -- data selection --------------------------------------------------------------------------
def _add_data_options(parser: argparse.ArgumentParser, default_elpv: bool = False) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", type=Path, help="a category folder in the MVTec AD layout")
    group.add_argument("--dataset", choices=["folder", *DATASETS], help="a named dataset under --root")
    group.add_argument("--root", type=Path, help="folder holding the named dataset's categories")
    group.add_argument("--category", help="category of the named dataset, e.g. bottle or 01")
    if default_elpv:
        group.add_argument(
            "--elpv", choices=["mono", "poly"], default="mono",
            help="built-in default when no data is given: solar cells of this type from elpv-dataset",
        )


def _folder(args: argparse.Namespace, require_test: bool = True, require_train: bool = True) -> AnomalyFolder:
    """The category the arguments name; training alone needs only train/good, evaluation only test/."""
    if args.data is not None:
        return AnomalyFolder.scan(args.data, require_test=require_test, require_train=require_train)
    if args.dataset is not None:
        if args.root is None:
            raise DefectflowError("--dataset needs --root (and --category for mvtec/btad).")
        return AnomalyFolder.scan(category_root(args.dataset, args.root, args.category), require_test=require_test,
                                  require_train=require_train)
    if getattr(args, "elpv", None):
        print(f"No data given: using the built-in elpv solar-cell task ({args.elpv} cells).")
        return AnomalyFolder.scan(prepare_elpv(cell_type=args.elpv))
    raise DefectflowError("Give the data: --data DIR, or --dataset mvtec|btad --root DIR --category NAME.")


def _given_or_trained_on(args: argparse.Namespace, detector, require_test: bool = True,
                         require_train: bool = True) -> tuple[AnomalyFolder, bool]:
    """The category the data options name, else the one the checkpoint was trained on; and whether it was the latter."""
    recorded = args.data is None and args.dataset is None
    if recorded:
        if detector.trained_on is None:
            raise DefectflowError(f"{args.checkpoint} does not record the data it was trained on; give --data.")
        args.data = Path(detector.trained_on["root"])
    return _folder(args, require_test=require_test, require_train=require_train), recorded


# -- commands ----------------------------------------------------------------------------------
def _report_failed(failed: dict[Path, str], where: str) -> int:
    """Print the images that could not be read; the exit status: 1 when there were some."""
    for path, reason in failed.items():
        print(f"FAILED {path}: {reason}", file=sys.stderr)
    if failed:
        print(f"defectflow: {len(failed)} image(s) could not be read and were left out (listed in {where}).", file=sys.stderr)
    return 1 if failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    detector = methods.create(args.method, **_config_overrides(args, args.method))  # options first: the data may be a download
    folder = _folder(args)
    out = prepare_output(args.out, f"{args.method}-{folder.name}", args.overwrite, reads=[folder.root],
                         not_inside=scanned_folders(folder.root))
    check_target(out / "model", overwrite=True)  # a folder named model that is not a checkpoint: refused before training
    evaluation, table, _ = train_and_evaluate(detector, folder, out, progress=not args.quiet)
    print(table)
    print(f"Results, pictures and the model are in {out}; open {out / 'report.html'} in a browser")
    return _report_failed(evaluation.prediction.failed, out / "results.json")


def _outside_data(out: Path, folder: AnomalyFolder, why: str) -> None:
    """Refuse an output path inside the folders a category is read from."""
    container = containing(out, scanned_folders(folder.root))
    if container is not None:
        raise DefectflowError(f"--out {out} lies inside {container}, which is read as data ({why}); choose an --out outside it.")


def cmd_train(args: argparse.Namespace) -> None:
    detector = methods.create(args.method, **_config_overrides(args, args.method))
    check_target(args.out, args.overwrite)  # before training, not after it
    folder = _folder(args, require_test=False)
    _outside_data(args.out, folder, "its images would be read as the category's")
    start = time.perf_counter()
    detector.fit(folder, progress=not args.quiet)
    path = detector.save(args.out, overwrite=args.overwrite)
    if detector.validation is not None:
        detector.validation.save(path / "validation")
        print(f"Synthetic validation set (MVTec layout) written to {path / 'validation'}")
    print(f"Trained {args.method} on {folder.root} in {time.perf_counter() - start:.1f} s; saved to {path}")


def cmd_eval(args: argparse.Namespace) -> int:
    if args.checkpoint.is_dir() and not (args.checkpoint / CONFIG_FILE).exists() and find_checkpoints(args.checkpoint):
        if args.data is not None:
            raise DefectflowError("--data names one category; for a folder of checkpoints use --dataset and --root, or neither.")
        if args.dataset is not None and args.root is None:
            raise DefectflowError("--dataset needs --root.")
        data = [args.root] if args.root is not None else []
        out = prepare_output(args.out, "eval-all", args.overwrite, reads=[args.checkpoint, *data])
        records = evaluate_saved(args.checkpoint, out, args.dataset, args.root, bool(args.pictures), args.device, progress=not args.quiet)
        print((out / "summary.md").read_text())
        print(f"{sum(r.status == 'ok' for r in records)} of {len(records)} checkpoints evaluated; summary in {out}")
        return 0 if all(r.status == "ok" for r in records) else 1
    detector = _inference_detector(args)
    folder, recorded = _given_or_trained_on(args, detector, require_train=False)  # only the test images are scored
    print(f"Evaluating {args.checkpoint} on {folder.root}" + (" (the data it was trained on; --data for other data)" if recorded else ""))
    folder.check_test_split()  # a bad mask is found now, not after scoring, and leaves no output folder behind
    out = prepare_output(args.out, f"eval-{folder.name}", args.overwrite, reads=[args.checkpoint, folder.root, *_onnx(args)],
                         not_inside=[args.checkpoint, *scanned_folders(folder.root)])
    evaluation = detector.evaluate(folder, progress=not args.quiet)
    pictures = args.pictures is not False
    print(report_evaluation(detector, evaluation, out, pictures=pictures))
    print(f"Results written to {out}" + (f"; open {out / 'report.html'} in a browser" if pictures else ""))
    return _report_failed(evaluation.prediction.failed, out / "results.json")


RAY_FLAGS = {"address": "--address", "cpus_per_run": "--cpus-per-run", "gpus_per_run": "--gpus-per-run",
             "max_retries": "--max-retries", "ship_results": "--ship-results"}


def _ray_settings(args: argparse.Namespace) -> RaySettings | None:
    """The --executor ray settings given; None for the local executor (which refuses them)."""
    given = {name: getattr(args, name) for name in RAY_FLAGS if getattr(args, name) not in (None, False)}
    if args.executor != "ray":
        if given:
            raise DefectflowError(f"Ray settings ({', '.join(RAY_FLAGS[n] for n in given)}) need --executor ray.")
        return None
    return RaySettings(**given)


def cmd_bench(args: argparse.Namespace) -> int:
    records = run_bench(
        args.out, args.dataset, args.root, args.categories, args.methods, args.runs, _bench_options(args),
        pictures=args.pictures, progress=not args.quiet, executor=args.executor, ray_settings=_ray_settings(args),
    )
    print((args.out / "summary.md").read_text())
    failed = [r for r in records if r.status != "ok"]
    print(f"{len(records) - len(failed)} of {len(records)} runs finished" + (f", {len(failed)} failed (see above)" if failed else "")
          + f"; tables and report.html in {args.out}")
    return 1 if failed else 0


def _onnx(args: argparse.Namespace) -> list[Path]:
    """The exported model a command reads, where --onnx names one outside the checkpoint."""
    return [Path(args.onnx)] if getattr(args, "onnx", None) else []


def _inference_detector(args: argparse.Namespace):
    """The checkpoint loaded for predict or eval with the chosen backend and batch size."""
    detector = methods.load(args.checkpoint, device=args.device, backend=args.backend, onnx=args.onnx)
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise DefectflowError(f"--batch-size must be at least 1, got {args.batch_size}")
        detector.config.batch_size = args.batch_size
    return detector


def cmd_predict(args: argparse.Namespace) -> int:
    detector = _inference_detector(args)
    samples = samples_from_paths(args.images)
    out = prepare_output(args.out, "predict", args.overwrite, reads=[args.checkpoint, *_onnx(args), *(s.path for s in samples)],
                         not_inside=[args.checkpoint])
    prediction = detector.predict(samples, progress=not args.quiet)
    names = [f"{i:05d}_{Path(p).stem}" for i, p in enumerate(prediction.paths)]
    write_predictions(out, prediction, names)
    verdicts = prediction.verdicts or [""] * len(prediction.paths)
    for verdict, path, score, reason in zip(verdicts, prediction.paths, prediction.scores, prediction.frame_reasons):
        note = f"  (frame unlike the training images: {reason})" if reason else ""
        print(f"{verdict:7s} {score:10.4f}  {path}{note}")
    if prediction.thresholds is None:
        why = detector.threshold_note or "it was trained with --val-fraction 0 or on too few images to hold out a validation set"
        print(f"This checkpoint has no operating thresholds: {why}. Scores only, no OK/DEFECT.")
    else:
        print(f"{verdicts.count('DEFECT')} of {len(verdicts)} images DEFECT at image threshold {prediction.thresholds.image:.4f} "
              f"({prediction.thresholds.rule}), {verdicts.count('INVALID')} INVALID; defect regions in {out / 'regions'}")
    write_heatmaps(out / "heatmaps", prediction, detector.image_size, names)
    print(f"Scores and heatmaps written to {out}")
    return _report_failed(prediction.failed, out / "scores.csv")


def cmd_export(args: argparse.Namespace) -> None:
    detector = methods.load(args.checkpoint, device="cpu")
    if args.int8:  # the calibration data is found, and the INT8 files checked, before the slow export
        folder, _ = _given_or_trained_on(args, detector, require_test=False)
        present = [p for p in int8_files(args.out if args.out is not None else args.checkpoint / ONNX_FILE) if p.exists()]
        if present and not args.overwrite:
            raise CheckpointError(f"{present[0]} already exists; pass --overwrite to replace the INT8 model.")
    path = export_onnx(detector, args.checkpoint, args.out, overwrite=args.overwrite)
    custom = "" if path == Path(args.checkpoint) / ONNX_FILE else f" --onnx {path}"
    print(f"Exported {detector.method} to {path}; run it with "
          f"`defectflow predict --backend onnx --checkpoint {args.checkpoint}{custom} IMAGES...` (or --backend openvino)")
    if args.int8:
        int8, check = export_int8(detector, args.checkpoint, folder, path, args.calibration_images, progress=not args.quiet)
        print(int8_report(check))
        print(f"INT8 model written to {int8}; run it with --backend openvino-int8")


def int8_report(check: dict) -> str:
    """export --int8's check as printed: fp32 vs INT8 OpenVINO on the data calibration was given."""
    lines = [f"INT8 vs fp32 on {check['images']} {check['data']} (no test image): largest score difference "
             f"{check['max_score_diff']:.4g}, largest map difference {check['max_map_diff']:.4g} (relative)"]
    if check.get("flows_fitted_on_int8"):
        lines.append("the INT8 model's flows, frame guard and thresholds were fitted again on its own INT8 features "
                     "(the checkpoint is unchanged); its thresholds are in the INT8 model's JSON")
    if "same_decisions" in check:
        lines.append(f"same OK/DEFECT decision on {check['same_decisions']} of {check['images']} images")
    if "fp32" in check:
        rows = [[METRIC_TITLES[m], f"{100 * check['fp32'][m]:.2f}", f"{100 * check['int8'][m]:.2f}",
                 f"{100 * (check['int8'][m] - check['fp32'][m]):+.2f}"] for m in METRIC_NAMES if check["fp32"][m] is not None]
        lines.append(markdown_table(["metric", "fp32", "INT8", "change (points)"], rows))
    return "\n".join(lines)


SYNTH_MAX_COUNT = 256  # one picture: more samples than this make a grid nobody can read


def cmd_synth(args: argparse.Namespace) -> None:
    if not 1 <= args.count <= SYNTH_MAX_COUNT:
        raise DefectflowError(f"--count must be 1 to {SYNTH_MAX_COUNT} (samples in one picture), got {args.count}")
    if args.seed < 0:
        raise DefectflowError(f"--seed must be at least 0, got {args.seed}")
    if args.input_size < 32 or args.input_size % 32:
        raise DefectflowError(f"--input-size must be a multiple of 32, at least 32 (as for training), got {args.input_size}")
    if args.out.suffix.lower() != ".png" or args.out.is_dir():
        raise DefectflowError(f"--out {args.out} must be the path of a .png file to write, e.g. {args.out.with_suffix('.png').name}.")
    if args.out.exists() and not args.overwrite:
        raise DefectflowError(f"{args.out} already exists; choose another --out or pass --overwrite.")
    folder = _folder(args, require_test=False)
    _outside_data(args.out, folder, "the picture would become a training or test image")
    train = folder.train
    size = fitted_size(train, args.input_size)
    images = torch.stack([load_image(s.path, size) for s in train[: max(args.count, 8)]])
    source = TextureSource(size, args.texture_dir, normal_images=images)
    synthesizer = DefectSynthesizer(source, use_foreground=args.foreground)
    samples = [
        synthesizer(images[i % len(images)], sample_generator(args.seed, i), force=True) for i in range(args.count)
    ]
    print(f"{args.count} synthetic defects written to {save_synthetic_grid(args.out, samples)}")


def cmd_download(args: argparse.Namespace) -> None:
    root = downloads.fetch(args.name, args.root, url=args.url, sha256=args.sha256, progress=not args.quiet)
    print(f"{args.name} is ready in {root}")


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=list(BACKENDS), default="torch",
                        help="torch; onnx: the exported model.onnx with onnxruntime; openvino: the same file with OpenVINO; "
                             "openvino-int8: its INT8 model (export --int8). See `export`")
    parser.add_argument("--onnx", type=Path, help="with an exported backend: an ONNX file exported with `export --out` "
                                                  "(default: <checkpoint>/model.onnx)")
    parser.add_argument("--batch-size", type=int, help="images per inference run (default: the checkpoint's batch_size; "
                                                       "1 for the lowest latency per image)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defectflow", description="Unsupervised visual anomaly detection.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        return sub

    run = command("run", cmd_run, "train and evaluate one category; write metrics, pictures, report.html and the model")
    run.add_argument("--method", choices=list(methods.METHODS), default="cflow", help="detection method")
    run.add_argument("--out", type=Path, help="output folder (default: runs/<method>-<data>-<time>)")
    run.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    _add_data_options(run, default_elpv=True)
    _add_config_options(run)

    train = command("train", cmd_train, "train on a category's normal images and save a checkpoint")
    train.add_argument("--method", choices=list(methods.METHODS), default="cflow", help="detection method")
    train.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    train.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    _add_data_options(train)
    _add_config_options(train)

    bench = command("bench", cmd_bench, "train and evaluate every category x method x seed; resumable; mean ± std tables")
    bench.add_argument("--dataset", choices=["folder", *DATASETS], required=True,
                       help="named dataset, or folder: --root holds category folders in the MVTec layout")
    bench.add_argument("--root", type=Path, required=True, help="folder holding the categories")
    bench.add_argument("--categories", nargs="+", default=["all"], help="category names, or all (default)")
    bench.add_argument("--methods", nargs="+", choices=list(methods.METHODS), default=list(methods.METHODS), help="methods to run")
    bench.add_argument("--runs", type=int, default=1, help="runs (seeds seed, seed+1, ...) per category and method")
    bench.add_argument("--out", type=Path, required=True, help="bench folder; run the same command again to continue it")
    bench.add_argument("--options", type=Path, help='JSON file of per-method options, e.g. {"cflow": {"meta_epochs": 2}}')
    bench.add_argument("--pictures", choices=["first", "all", "none"], default="first",
                       help="per-image panels and curves for the first run of each category, every run, or none")
    bench.add_argument("--executor", choices=list(EXECUTORS), default="local",
                       help="local: one run after another here (default); ray: each run a task on a Ray cluster "
                            "(pip install 'defectflow[ray]')")
    cluster = bench.add_argument_group("--executor ray")
    cluster.add_argument("--address", help="Ray cluster to join, e.g. HEAD:6379 (default: RAY_ADDRESS, else the cluster "
                                           "`ray start` made here, else a local Ray instance for this bench)")
    cluster.add_argument("--cpus-per-run", type=float, help=f"CPUs each run reserves, and its torch threads (default {RaySettings.cpus_per_run:g})")
    cluster.add_argument("--gpus-per-run", type=float, help=f"GPUs each run reserves, may be fractional (default {RaySettings.gpus_per_run:g})")
    cluster.add_argument("--max-retries", type=int, help=f"tries again of a run whose worker died (default {RaySettings.max_retries})")
    cluster.add_argument("--ship-results", action="store_true",
                         help="send every run's files back to the driver to write under --out, even when workers see "
                              "--out (without it they are sent only by workers that do not)")
    _add_config_options(bench)

    evaluate = command("eval", cmd_eval, "evaluate a checkpoint, or every checkpoint in a folder (e.g. a bench), on its test images")
    evaluate.add_argument("--checkpoint", type=Path, required=True,
                          help="checkpoint folder from `train`, or a folder of them (a bench folder) to evaluate all")
    evaluate.add_argument("--out", type=Path, help="results folder (default: runs/eval-<data>-<time>)")
    evaluate.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    evaluate.add_argument("--pictures", action=argparse.BooleanOptionalAction, default=None,
                          help="write per-image panels, curves and report.html (default: on for one checkpoint, off for a folder)")
    evaluate.add_argument("--device", help="override the checkpoint's device (cpu, cuda)")
    _add_inference_options(evaluate)
    _add_data_options(evaluate)

    predict = command("predict", cmd_predict, "score images or folders of images with a checkpoint")
    predict.add_argument("images", nargs="+", type=Path, help="image files or folders")
    predict.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder from `train`")
    predict.add_argument("--out", type=Path, help="output folder (default: runs/predict-<time>)")
    predict.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    predict.add_argument("--device", help="override the checkpoint's device (cpu, cuda)")
    _add_inference_options(predict)

    export = command("export", cmd_export, "export a checkpoint's whole inference path to ONNX (cflow, clscnf)")
    export.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder from `train`")
    export.add_argument("--out", type=Path, help="ONNX file to write (default: <checkpoint>/model.onnx, what --backend onnx reads)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing ONNX file (and its INT8 model)")
    export.add_argument("--int8", action="store_true",
                        help="also write an OpenVINO INT8 model beside it (model-int8.xml), calibrated on the training images "
                             "and the synthetic validation set (never test images), and print its metrics against fp32 there")
    export.add_argument("--calibration-images", type=int, default=64, help="with --int8: training images to calibrate on")
    _add_data_options(export)

    synth = command("synth", cmd_synth, "write a picture of synthetic defects on a category's training images")
    synth.add_argument("--out", type=Path, required=True, help="PNG file to write")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    synth.add_argument("--count", type=int, default=8, help="number of samples in the grid")
    synth.add_argument("--input-size", type=int, default=256, help="short side in pixels (the long side keeps the images' aspect ratio)")
    synth.add_argument("--texture-dir", help="texture images (e.g. DTD); default: textures made here")
    synth.add_argument("--foreground", action="store_true", help="defects on the object only")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    _add_data_options(synth)

    fetch = command("download", cmd_download, "download and unpack MVTec AD, BTAD or DTD (needs internet)")
    fetch.add_argument("name", choices=list(downloads.ARCHIVES), help="dataset to fetch")
    fetch.add_argument("--root", type=Path, required=True, help="folder to unpack into")
    fetch.add_argument("--url", help="another address for the archive (a mirror)")
    fetch.add_argument("--sha256", help="checksum of the archive at --url")
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """defectflow's own warnings on one line, without the source location."""
    if issubclass(category, DefectflowWarning):
        print(f"defectflow: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done; 1 done, but some images or runs failed (listed); 2 an error (one line,
    naming what to fix); 130 interrupted (Ctrl-C)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "backend", "torch") == "torch" and args.handler is not cmd_export:
        keep_freed_memory()  # PyTorch's large tensors reuse freed memory (memory.py); the exported runtimes ran slower with it
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.handler(args) or 0
    except DefectflowError as exc:
        print(f"defectflow: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the command had to write or read: name it instead of a traceback
        print(f"defectflow: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("defectflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

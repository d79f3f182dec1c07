"""The `defectflow` command: a thin layer over the Python API (create, fit, evaluate, save, load)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
import typing
from pathlib import Path
from typing import Any, Sequence

from . import methods
from .data import download as downloads
from .data.elpv import prepare_elpv
from .data.folder import AnomalyFolder, samples_from_paths
from .data.named import DATASETS, category_root
from .errors import DefectflowError
from .report import write_heatmaps
from .workflow import prepare_output, report_evaluation, train_and_evaluate


# -- options generated from the methods' config dataclasses ----------------------------------
def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One flag per config field of every method (a field shared by several appears once)."""
    group = parser.add_argument_group("method options (defaults shown; each method uses its own)")
    seen: set[str] = set()
    for detector in methods.METHODS.values():
        hints = typing.get_type_hints(detector.config_class)
        for f in dataclasses.fields(detector.config_class):
            if f.name in seen:
                continue
            seen.add(f.name)
            flag = "--" + f.name.replace("_", "-")
            text = f"{f.metadata.get('help', '')} (default: {f.default})"
            hint = hints[f.name]
            if hint is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
            elif typing.get_origin(hint) is tuple:
                group.add_argument(flag, type=int, nargs="+", default=None, help=text)
            else:
                kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if typing.get_args(hint) else hint
                group.add_argument(flag, type=kind, default=None, help=text)


def _config_overrides(args: argparse.Namespace, method: str) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(methods.METHODS[method].config_class)}
    return {name: (tuple(v) if isinstance(v, list) else v) for name, v in vars(args).items() if name in fields and v is not None}


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


def _folder(args: argparse.Namespace) -> AnomalyFolder:
    if args.data is not None:
        return AnomalyFolder.scan(args.data)
    if args.dataset is not None:
        if args.root is None:
            raise DefectflowError("--dataset needs --root (and --category for mvtec/btad).")
        return AnomalyFolder.scan(category_root(args.dataset, args.root, args.category))
    if getattr(args, "elpv", None):
        print(f"No data given: using the built-in elpv solar-cell task ({args.elpv} cells).")
        return AnomalyFolder.scan(prepare_elpv(cell_type=args.elpv))
    raise DefectflowError("Give the data: --data DIR, or --dataset mvtec|btad --root DIR --category NAME.")


# -- commands ----------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> None:
    folder = _folder(args)
    detector = methods.create(args.method, **_config_overrides(args, args.method))
    out = prepare_output(args.out, f"{args.method}-{folder.name}", args.overwrite)
    _, table = train_and_evaluate(detector, folder, out, progress=not args.quiet)
    detector.save(out / "model")
    print(table)
    print(f"Results, heatmaps and the model are in {out}")


def cmd_train(args: argparse.Namespace) -> None:
    folder = _folder(args)
    detector = methods.create(args.method, **_config_overrides(args, args.method))
    start = time.perf_counter()
    detector.fit(folder, progress=not args.quiet)
    path = detector.save(args.out, overwrite=args.overwrite)
    print(f"Trained {args.method} on {folder.root} in {time.perf_counter() - start:.1f} s; saved to {path}")


def cmd_eval(args: argparse.Namespace) -> None:
    detector = methods.load(args.checkpoint, device=args.device)
    folder = _folder(args)
    out = prepare_output(args.out, f"eval-{folder.name}", args.overwrite)
    evaluation = detector.evaluate(folder, progress=not args.quiet)
    print(report_evaluation(detector, evaluation, out, heatmaps=args.heatmaps))
    print(f"Results written to {out}")


def cmd_predict(args: argparse.Namespace) -> None:
    detector = methods.load(args.checkpoint, device=args.device)
    samples = samples_from_paths(args.images)
    prediction = detector.predict(samples, progress=not args.quiet)
    out = prepare_output(args.out, "predict", args.overwrite)
    with (out / "scores.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score"])
        for path, score in zip(prediction.paths, prediction.scores):
            writer.writerow([str(path), f"{score:.6f}"])
            print(f"{score:10.4f}  {path}")
    names = [f"{i:05d}_{Path(p).stem}" for i, p in enumerate(prediction.paths)]
    write_heatmaps(out / "heatmaps", prediction, detector.config.input_size, names)
    print(f"Scores and heatmaps written to {out}")


def cmd_download(args: argparse.Namespace) -> None:
    root = downloads.fetch(args.name, args.root, url=args.url, sha256=args.sha256, progress=not args.quiet)
    print(f"{args.name} is ready in {root}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defectflow", description="Unsupervised visual anomaly detection.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        return sub

    run = command("run", cmd_run, "train and evaluate one category, write metrics, heatmaps and the model")
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

    evaluate = command("eval", cmd_eval, "evaluate a checkpoint on a category's test images (JSON, CSV, table)")
    evaluate.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder from `train`")
    evaluate.add_argument("--out", type=Path, help="results folder (default: runs/eval-<data>-<time>)")
    evaluate.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    evaluate.add_argument("--heatmaps", action=argparse.BooleanOptionalAction, default=True, help="write heatmap overlays")
    evaluate.add_argument("--device", help="override the checkpoint's device (cpu, cuda)")
    _add_data_options(evaluate)

    predict = command("predict", cmd_predict, "score images or folders of images with a checkpoint")
    predict.add_argument("images", nargs="+", type=Path, help="image files or folders")
    predict.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder from `train`")
    predict.add_argument("--out", type=Path, help="output folder (default: runs/predict-<time>)")
    predict.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    predict.add_argument("--device", help="override the checkpoint's device (cpu, cuda)")

    fetch = command("download", cmd_download, "download and unpack MVTec AD, BTAD or DTD (needs internet)")
    fetch.add_argument("name", choices=list(downloads.ARCHIVES), help="dataset to fetch")
    fetch.add_argument("--root", type=Path, required=True, help="folder to unpack into")
    fetch.add_argument("--url", help="another address for the archive (a mirror)")
    fetch.add_argument("--sha256", help="checksum of the archive at --url")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except DefectflowError as exc:
        print(f"defectflow: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

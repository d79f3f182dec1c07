"""Export of the whole inference path: ONNX (fp32) and, optionally, an OpenVINO INT8 model.

The exported graph takes images (N x 3 x H x W, values in [0, 1], any batch size N) and returns
the calibrated, fused anomaly map, the image score, and each head's map: extractor, heads,
fusion and normalisation all inside, so a line computer needs onnxruntime or OpenVINO and
nothing of PyTorch (backends.py runs them).

Each exported file lives beside a small JSON that records the SHA-256 of the weights it was
exported from and of its own files: a checkpoint retrained or replaced after export is refused
instead of silently giving the old model's scores.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from .backends import (EXPORT_FORMAT, EXPORT_VERSION, META_DIGEST, ONNX_FILE, OPENVINO_CONFIG, OpenVinoBackend,
                       OpenVinoInt8Backend, int8_files, int8_path, meta_path, openvino_core)
from .checkpoint import CONFIG_FILE
from .data.folder import AnomalyFolder, Sample, load_images
from .data.synthetic import ValidationSet
from .errors import CheckpointError, ConfigError, DataError, DefectflowWarning
from .files import atomic_write_text, json_digest, sha256_of
from .methods.base import hold_out
from .metrics import METRIC_NAMES, compute_metrics
from .scoring import image_scores

ONNX_OPSET = 18
INT8_WARN_DROP = 0.005  # a metric 0.5 points under fp32 on the calibration check is worth a warning


class InferenceGraph(nn.Module):
    """The model's dict output as a fixed tuple (map, score, heads...), the score computed in-graph."""

    def __init__(self, model: nn.Module, score_rule: tuple[str, int], outputs: list[str]) -> None:
        super().__init__()
        self.model = model
        self.score_rule = score_rule
        self.outputs = outputs

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = dict(self.model(images))
        out.setdefault("score", image_scores(out["map"], *self.score_rule))
        return tuple(out[name] for name in self.outputs)


def write_meta(checkpoint: Path, path: Path, files: list[Path], outputs: list[str], input_size, **extra) -> None:
    """path's meta JSON: the weights it came from, its files' checksums and its own (backends.read_export_meta checks them)."""
    meta = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION,
            "weights_sha256": json.loads((checkpoint / CONFIG_FILE).read_text())["weights_sha256"],
            "files": {f.name: sha256_of(f) for f in files}, "outputs": outputs, "input_size": list(input_size), **extra}
    meta[META_DIGEST] = json_digest(meta, META_DIGEST)
    atomic_write_text(meta_path(path), json.dumps(meta, indent=2))


def export_onnx(detector, checkpoint: str | Path, path: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the detector (loaded from `checkpoint`) as ONNX with a dynamic batch axis; default
    path: <checkpoint>/model.onnx."""
    checkpoint = Path(checkpoint)
    path = Path(path) if path is not None else checkpoint / ONNX_FILE
    if path.suffix.lower() != ".onnx" or path.is_dir():
        raise ConfigError(f"--out {path} must be the path of an .onnx file to write, e.g. {path.with_suffix('.onnx').name}.")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; pass --overwrite to replace it.")
    if detector.method == "differnet":
        raise ConfigError(
            "DifferNet cannot be exported to ONNX: its map is the gradient of the flow's likelihood with respect "
            "to the input pixels, which an ONNX inference graph cannot compute. Export cflow or clscnf."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs = write_inference_graph(detector, path)
    write_meta(checkpoint, path, [path], outputs, detector.image_size)
    return path


def write_inference_graph(detector, path: Path) -> list[str]:
    """The detector's inference graph as ONNX at `path`; returns its output names."""
    model = detector._require_model().eval().cpu()
    with torch.no_grad():
        names = list(model(torch.rand(2, 3, *detector.image_size)))
    outputs = ["map", "score", *(n for n in names if n not in ("map", "score"))]
    write_graph(InferenceGraph(model, detector.config.score_rule, outputs).eval(), path, outputs, detector.image_size)
    detector.model.to(detector.device)
    return outputs


def write_graph(module: nn.Module, path: Path, outputs: list[str], size: tuple[int, int]) -> None:
    """`module` (images -> tuple of tensors) as ONNX with a dynamic batch axis."""
    example = torch.rand(2, 3, *size)  # batch 2: torch.export would fix a batch axis of size 1
    with torch.no_grad():
        torch.onnx.export(
            module, (example,), str(path), input_names=["images"], output_names=outputs, opset_version=ONNX_OPSET,
            dynamo=True, external_data=False, verbose=False, dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
        )


class CompiledExtractor(nn.Module):
    """A compiled OpenVINO extractor graph in the place of a model's extractor: images -> feature maps."""

    def __init__(self, run: Callable[[np.ndarray], list[np.ndarray]]) -> None:
        super().__init__()
        self.run = run

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        out = self.run(np.ascontiguousarray(images.cpu().numpy(), dtype=np.float32))
        return [torch.from_numpy(np.array(value)).to(images.device) for value in out]


def calibration_data(detector, folder: AnomalyFolder, count: int,
                     progress: bool = False) -> tuple[torch.Tensor, ValidationSet | None, list[Sample]]:
    """(training images, validation set or None, kept samples) for INT8 calibration, never a test
    image: up to `count` of the training images fit() kept, the synthetic validation set fit()
    built from the held-out ones (made again, identically, from the same images and seed), and
    every sample fit() kept (what the flows are fitted again on)."""
    c = detector.config
    held_out, kept = hold_out(list(folder.train), c.val_fraction, c.seed)
    if not kept:
        raise DataError(f"{folder.root} has no training images (train/good) to calibrate INT8 on.")
    picks = kept[:: max(1, len(kept) // count)][:count]
    validation = detector._validation_set(held_out, progress) if held_out else None
    return load_images(picks, detector.image_size, progress), validation, kept


def export_int8(detector, checkpoint: str | Path, folder: AnomalyFolder, onnx: str | Path | None = None,
                count: int = 64, progress: bool = False) -> tuple[Path, dict]:
    """Quantize the inference graph to INT8 with NNCF, calibrated on `folder`'s training images
    and the synthetic validation set, and write it beside the ONNX file (model-int8.xml/.bin).

    Only the CNN extractor is quantized: the heads stay fp32 (quantizing the flows too turned
    bottle's image AUROC on the validation set from 100 to 50). INT8 moves the extractor's
    features by far more than the flows tolerate when they were fitted on fp32 features, so the
    flows and what is calibrated after them (clscnf's fusion), the frame guard and the thresholds
    are fitted again on the INT8 extractor's features of the training images (RefitFlows.refit_on)
    and that model is what is quantized; the thresholds go into the INT8 model's JSON (with
    flows_fitted_on_int8, which INT8 exports of earlier versions lack). The checkpoint is not changed.
    Returns (path, check): the metrics of fp32 and INT8 OpenVINO on the synthetic validation set
    (its defects and masks, each model's thresholds), or on the calibration images (score
    differences only) when the model was trained without one; a drop is warned of."""
    try:
        with quiet_nncf(progress):
            import nncf
        import openvino as ov
    except ImportError:
        raise ConfigError("export --int8 needs the openvino and nncf packages: pip install openvino nncf") from None
    checkpoint = Path(checkpoint)
    onnx = Path(onnx) if onnx is not None else checkpoint / ONNX_FILE
    fp32 = OpenVinoBackend(checkpoint, onnx)  # checks the ONNX export is current
    train, validation, kept = calibration_data(detector, folder, count, progress)
    images = torch.cat([train, validation.images]) if validation is not None else train
    samples = nncf.Dataset([images[i:i + 1].numpy() for i in range(len(images))])
    model = quantize(onnx, samples, len(images), progress)
    detector.validation = validation
    extractor = CompiledExtractor(extractor_part(model, onnx, detector, images[:1]))
    deployed = detector.refit_on(extractor, kept, progress)
    with tempfile.TemporaryDirectory() as scratch:
        graph = Path(scratch) / ONNX_FILE
        write_inference_graph(deployed, graph)
        # the extractor is quantized as before: its quantizers see the same images through the same operations
        model = quantize(graph, samples, len(images), progress)
        probe = images[:4].numpy()
        moved = max(float(np.abs(a - b).max() / max(1.0, np.abs(a).max()))
                    for a, b in zip(extractor.run(probe), extractor_part(model, graph, deployed, images[:1])(probe)))
    if moved > 1e-4:
        warnings.warn(f"The INT8 extractor of {int8_path(onnx)} came out different from the one the flows were fitted on "
                      f"(features moved by {moved:.2g} relative); check the printed INT8 check.", DefectflowWarning, stacklevel=2)
    thresholds = {} if deployed.thresholds is None else {"thresholds": deployed.thresholds.to_json()}
    path = int8_path(onnx)
    ov.save_model(model, str(path), compress_to_fp16=False)
    files = int8_files(onnx)[:2]  # the model's files; write_meta adds the meta beside them
    meta = dict(calibration_images=len(images), flows_fitted_on_int8=True, **thresholds)
    # written twice: the INT8 backend that the check runs refuses files without a current meta
    write_meta(checkpoint, path, files, fp32.outputs, detector.image_size, **meta)
    check = {**int8_check(detector, fp32, OpenVinoInt8Backend(checkpoint, onnx), train, validation),
             "flows_fitted_on_int8": meta["flows_fitted_on_int8"]}
    write_meta(checkpoint, path, files, fp32.outputs, detector.image_size, **meta, check=check)
    return path, check


@contextmanager
def quiet_nncf(progress: bool) -> Iterator[None]:
    """NNCF's output as the command asked: its notes (its logger) and its progress bars (drawn on
    rich's console) only with progress; never the warning torch prints when NNCF, importing or
    quantizing, loads torch's extension builder on a machine without CUDA ("No CUDA runtime is
    found, using CUDA_HOME=..."): nothing here compiles a CUDA extension."""
    import rich

    cpp_extension = logging.getLogger("torch.utils.cpp_extension")
    only_errors = lambda record: record.levelno >= logging.ERROR  # noqa: E731 - a filter, not a level: torch resets levels on import
    console = rich.get_console()
    quiet = console.quiet
    cpp_extension.addFilter(only_errors)
    console.quiet = quiet or not progress
    try:
        import nncf  # under the filter: its first import is one that warns

        level = nncf.nncf_logger.level
        nncf.set_log_level(level if progress else logging.ERROR)
        try:
            yield
        finally:
            nncf.set_log_level(level)
    finally:
        console.quiet = quiet
        cpp_extension.removeFilter(only_errors)


def quantize(onnx: Path, samples, count: int, progress: bool):
    """The ONNX graph's OpenVINO model with NNCF's INT8 quantizers on the extractor only."""
    with quiet_nncf(progress):
        import nncf

        model = openvino_core().read_model(str(onnx))
        kept = nncf.IgnoredScope(names=outside_extractor(onnx, model), validate=False)
        return nncf.quantize(model, samples, subset_size=count, ignored_scope=kept)


def extractor_part(model, onnx: Path, detector, example: torch.Tensor):
    """`model` (the OpenVINO model of the exported graph, quantized or not) compiled to give the
    extractor's feature maps, level by level: the tensors that cross from the extractor's
    operations to the heads', matched to the levels by their shapes on `example`."""
    import onnx as onnx_format

    nodes = onnx_format.load(str(onnx), load_external_data=False).graph.node
    made_by = {tensor: (node, port) for node in nodes if in_extractor(node) for port, tensor in enumerate(node.output)}
    crossing = dict.fromkeys(t for node in nodes if not in_extractor(node) for t in node.input if t in made_by)
    clone = model.clone()
    ops = {op.get_friendly_name(): op for op in clone.get_ops()}
    ports = [ops[made_by[t][0].name].output(made_by[t][1]) if made_by[t][0].name in ops else ops[t].output(0) for t in crossing]
    first = len(clone.outputs)
    clone.add_outputs(ports)
    compiled = openvino_core().compile_model(clone, "CPU", OPENVINO_CONFIG)
    with torch.no_grad():
        wanted = [tuple(f.shape) for f in detector._require_model().extractor(example.to(detector.device))]
    shapes = [tuple(v.shape) for v in list(compiled(example.numpy()).values())[first:]]
    order = [shapes.index(shape) for shape in wanted if shapes.count(shape) == 1]
    if len(order) != len(wanted):
        raise ConfigError(f"{onnx}: the extractor's feature maps {wanted} cannot be told apart in the graph ({shapes}).")

    def run(array: np.ndarray) -> list[np.ndarray]:
        values = list(compiled(array).values())[first:]
        return [values[i] for i in order]

    return run


def in_extractor(node) -> bool:
    """Whether an ONNX node comes from the model's extractor (torch.onnx records each node's module path)."""
    return "/model.extractor" in next((p.value for p in node.metadata_props if p.key == "namespace"), "")


def outside_extractor(onnx: Path, model) -> list[str]:
    """Names of the OpenVINO model's operations that are not the CNN extractor's, from the module
    path torch.onnx records on each ONNX node (OpenVINO names an operation after its ONNX node or output)."""
    import onnx as onnx_format

    outside = set()
    for node in onnx_format.load(str(onnx), load_external_data=False).graph.node:
        if not in_extractor(node):
            outside.update([node.name, *node.output])
    return [op.get_friendly_name() for op in model.get_ops() if op.get_friendly_name() in outside]


def int8_check(detector, fp32, int8, train: torch.Tensor, validation) -> dict:
    """fp32 vs INT8 on the data calibration was given: the four metrics and decisions on the
    validation set, and the largest score and map differences; warns when a metric drops."""
    images = validation.images if validation is not None else train
    runs, own = {}, detector.thresholds
    for name, backend in (("fp32", fp32), ("int8", int8)):
        detector.backend, detector.thresholds = backend, backend.thresholds or own
        runs[name] = detector.predict_images(images)
    detector.backend, detector.thresholds = None, own
    scale = max(1.0, float(np.abs(runs["fp32"].maps).max()))
    check = {"images": len(images), "data": "synthetic validation set" if validation is not None else "training images",
             "max_score_diff": float(np.abs(runs["fp32"].scores - runs["int8"].scores).max()),
             "max_map_diff": float(np.abs(runs["fp32"].maps - runs["int8"].maps).max()) / scale}
    if runs["fp32"].defective is not None:
        check["same_decisions"] = int((runs["fp32"].defective == runs["int8"].defective).sum())
    if validation is not None:
        masks = validation.masks.numpy() > 0
        for name, run in runs.items():
            check[name] = compute_metrics(validation.labels, run.scores, masks, run.maps)
        changes = {m: check["int8"][m] - check["fp32"][m] for m in METRIC_NAMES if check["fp32"][m] is not None}
        if any(c < -INT8_WARN_DROP for c in changes.values()):
            warnings.warn("INT8 scores worse than fp32 on the synthetic validation set ("
                          + ", ".join(f"{m} {100 * c:+.2f} points" for m, c in changes.items() if c < -INT8_WARN_DROP)
                          + "); prefer --backend openvino (fp32) if that matters.", DefectflowWarning, stacklevel=2)
    return check

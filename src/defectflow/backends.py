"""Inference backends: what runs a checkpoint's inference graph in `predict` and `eval`.

A backend takes a batch of images (N x 3 x H x W in [0, 1]) and returns the same dict of
tensors the PyTorch model does (map, score, frame, each head's map), so the rest of predict,
thresholds and metrics are shared. The exported ones run the graph `defectflow export` wrote
beside the checkpoint, after checking it was exported from the weights the checkpoint holds now.
Every backend uses torch's thread count (OMP_NUM_THREADS, torch.set_num_threads), so one knob
sets the cores inference takes, whichever backend runs it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from .checkpoint import CONFIG_FILE
from .errors import CheckpointError, ConfigError
from .files import json_digest, sha256_of
from .thresholds import Thresholds

ONNX_FILE = "model.onnx"
EXPORT_FORMAT = "defectflow-export"
EXPORT_VERSION = 3  # 3: the meta JSON checksummed (meta_sha256); 2: dynamic batch; 1 took one image per run
META_DIGEST = "meta_sha256"


class Backend(Protocol):
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


def meta_path(path: Path) -> Path:
    """The JSON beside an exported file that records what it was exported from."""
    return path.parent / (path.name + ".json")


def int8_path(onnx: Path) -> Path:
    """Where `export --int8` writes the INT8 model of an ONNX file: model.onnx -> model-int8.xml (+ .bin)."""
    return onnx.with_name(onnx.stem + "-int8.xml")


def int8_files(onnx: Path) -> list[Path]:
    """Every file `export --int8` writes for an ONNX file: the INT8 model (.xml, .bin) and its meta."""
    path = int8_path(onnx)
    return [path, path.with_suffix(".bin"), meta_path(path)]


def export_command(checkpoint: Path, onnx: Path, int8: bool) -> str:
    custom = f" --out {onnx}" if onnx != checkpoint / ONNX_FILE else ""
    return f"defectflow export --checkpoint {checkpoint}{custom}{' --int8' if int8 else ''} --overwrite"


def read_export_meta(checkpoint: Path, path: Path, onnx: Path, int8: bool) -> dict:
    """The meta JSON of an exported file, after checking that the file and its companions match
    their checksums and were exported from the weights `checkpoint` holds now."""
    meta_file, again = meta_path(path), export_command(checkpoint, onnx, int8)
    if not path.is_file() or not meta_file.is_file():
        raise CheckpointError(f"{path} (or {meta_file.name}) not found: run `{again}` first.")
    try:
        meta = json.loads(meta_file.read_text())
        weights = json.loads((checkpoint / CONFIG_FILE).read_text()).get("weights_sha256")
        outputs = [str(name) for name in meta["outputs"]]
        files = dict(meta.get("files", {}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{meta_file} is damaged ({exc!r}); run `{again}`.") from None
    if meta.get("weights_sha256") != weights:
        raise CheckpointError(f"{path} was exported from other weights than {checkpoint} now holds; export it again: `{again}`.")
    if meta.get("format") != EXPORT_FORMAT or meta.get("version") != EXPORT_VERSION:
        raise CheckpointError(f"{path} was exported by another version of defectflow (export format {meta.get('version')!r}; "
                              f"this one reads {EXPORT_VERSION}); export it again: `{again}`.")
    if meta.get(META_DIGEST) != json_digest(meta, META_DIGEST):
        raise CheckpointError(f"{meta_file} was changed after the export (its checksum {META_DIGEST} does not match): the "
                              f"thresholds and checks of an exported model cannot be edited; export it again: `{again}`.")
    for name, digest in files.items():
        if not (path.parent / name).is_file() or sha256_of(path.parent / name) != digest:
            raise CheckpointError(f"{path.parent / name} does not match its checksum in {meta_file}: the file is corrupt or "
                                  f"was replaced; run `{again}`.")
    meta["outputs"] = outputs
    return meta


class ExportedBackend:
    """An exported graph (checked against the checkpoint) run on numpy arrays; subclasses load and run it."""

    int8 = False

    def __init__(self, checkpoint: str | Path, onnx: str | Path | None = None) -> None:
        checkpoint = Path(checkpoint)
        onnx = Path(onnx) if onnx is not None else checkpoint / ONNX_FILE
        path = int8_path(onnx) if self.int8 else onnx
        meta = read_export_meta(checkpoint, path, onnx, self.int8)
        self.outputs: list[str] = meta["outputs"]
        # an INT8 model whose flows were fitted on its own features has its own operating thresholds
        self.thresholds = Thresholds.from_json(meta["thresholds"]) if "thresholds" in meta else None
        self.run = self.load(path)

    def load(self, path: Path) -> Callable[[np.ndarray], list[np.ndarray]]:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        array = np.ascontiguousarray(images.cpu().numpy(), dtype=np.float32)
        return {name: torch.from_numpy(value) for name, value in zip(self.outputs, self.run(array))}


class OnnxRuntimeBackend(ExportedBackend):
    """model.onnx with onnxruntime (CUDA when present)."""

    def load(self, path: Path) -> Callable[[np.ndarray], list[np.ndarray]]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        session = ort.InferenceSession(str(path), options, providers=providers)
        return lambda array: session.run(self.outputs, {"images": array})


def openvino_core():
    try:
        import openvino as ov
    except ImportError:
        raise ConfigError("--backend openvino needs the openvino package: pip install openvino") from None
    return ov.Core()


# fp32 arithmetic on CPUs whose default would be bf16 (those with AMX): the parity of maps and
# scores with PyTorch holds only in fp32; bf16 moved this repository's flow maps by far more.
OPENVINO_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


class OpenVinoBackend(ExportedBackend):
    """model.onnx with OpenVINO on the CPU, tuned for latency (one request at a time, as a line runs)."""

    def load(self, path: Path) -> Callable[[np.ndarray], list[np.ndarray]]:
        core = openvino_core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                      {**OPENVINO_CONFIG, "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        request = compiled.create_infer_request()
        ports = [compiled.output(name) for name in self.outputs]

        def run(array: np.ndarray) -> list[np.ndarray]:
            results = request.infer({0: array})
            return [np.array(results[port]) for port in ports]  # a copy: the request reuses its output buffers

        return run


class OpenVinoInt8Backend(OpenVinoBackend):
    """The INT8 model `export --int8` quantized from model.onnx (model-int8.xml), with OpenVINO."""

    int8 = True


BACKENDS: dict[str, type[ExportedBackend] | None] = {
    "torch": None, "onnx": OnnxRuntimeBackend, "openvino": OpenVinoBackend, "openvino-int8": OpenVinoInt8Backend,
}

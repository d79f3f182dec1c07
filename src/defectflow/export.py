"""ONNX export of the whole inference path, and an onnxruntime backend for `predict`.

The exported graph takes images (N x 3 x H x W, values in [0, 1]) and returns the calibrated,
fused anomaly map, the image score, and each head's map: extractor, heads, fusion and
normalisation all inside, so a line computer needs onnxruntime and nothing of PyTorch.

The ONNX file lives in the checkpoint folder beside a small JSON that records the SHA-256 of
the weights it was exported from: a checkpoint retrained or replaced after export is refused
instead of silently giving the old model's scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import CONFIG_FILE
from .errors import CheckpointError, ConfigError
from .files import atomic_write_text, sha256_of
from .scoring import image_scores

ONNX_FILE = "model.onnx"
ONNX_META = "model.onnx.json"
ONNX_OPSET = 18


class InferenceGraph(nn.Module):
    """The model's dict output as a fixed tuple (map, score, heads...), the score computed in-graph."""

    def __init__(self, model: nn.Module, reduction: str, outputs: list[str]) -> None:
        super().__init__()
        self.model = model
        self.reduction = reduction
        self.outputs = outputs

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = dict(self.model(images))
        out.setdefault("score", image_scores(out["map"], self.reduction))
        return tuple(out[name] for name in self.outputs)


def export_onnx(detector, checkpoint: str | Path, path: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the detector (loaded from `checkpoint`) as ONNX; default path: <checkpoint>/model.onnx."""
    checkpoint = Path(checkpoint)
    path = Path(path) if path is not None else checkpoint / ONNX_FILE
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists; pass --overwrite to replace it.")
    if detector.method == "differnet":
        raise ConfigError(
            "DifferNet cannot be exported to ONNX: its map is the gradient of the flow's likelihood with respect "
            "to the input pixels, which an ONNX inference graph cannot compute. Export cflow or clscnf."
        )
    model = detector._require_model().eval().cpu()
    size = detector.image_size
    example = torch.rand(1, 3, *size)  # one image per run, as on an inspection line
    with torch.no_grad():
        names = list(model(example))
    outputs = ["map", "score", *(n for n in names if n not in ("map", "score"))]
    graph = InferenceGraph(model, detector.config.image_score, outputs).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            graph, (example,), str(path), input_names=["images"], output_names=outputs, opset_version=ONNX_OPSET,
            dynamo=True, external_data=False, verbose=False,
        )
    meta = {"weights_sha256": json.loads((checkpoint / CONFIG_FILE).read_text())["weights_sha256"],
            "onnx_sha256": sha256_of(path), "outputs": outputs, "input_size": list(size)}
    atomic_write_text(path.parent / (path.name + ".json"), json.dumps(meta, indent=2))
    detector.model.to(detector.device)
    return path


class OnnxBackend:
    """Runs an exported graph with onnxruntime; returns the same dict of tensors as the torch model."""

    def __init__(self, checkpoint: str | Path, path: str | Path | None = None) -> None:
        import onnxruntime as ort

        checkpoint = Path(checkpoint)
        path = Path(path) if path is not None else checkpoint / ONNX_FILE
        meta_path = path.parent / (path.name + ".json")
        if not path.is_file() or not meta_path.is_file():
            raise CheckpointError(f"{path} (or {meta_path.name}) not found: run `defectflow export --checkpoint {checkpoint}"
                                  + (f" --out {path}" if path != checkpoint / ONNX_FILE else "") + "` first.")
        try:
            meta = json.loads(meta_path.read_text())
            weights = json.loads((checkpoint / CONFIG_FILE).read_text()).get("weights_sha256")
            outputs = [str(name) for name in meta["outputs"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{meta_path} is damaged ({exc!r}); export again.") from None
        if meta.get("weights_sha256") != weights:
            raise CheckpointError(f"{path} was exported from other weights than {checkpoint} now holds; export it again.")
        if meta.get("onnx_sha256") != sha256_of(path):
            raise CheckpointError(f"{path} does not match its checksum in {meta_path}: the file is corrupt or was replaced.")
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.outputs = outputs

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The graph takes one image at a time; a batch is run image by image."""
        array = np.ascontiguousarray(images.cpu().numpy(), dtype=np.float32)
        runs = [self.session.run(self.outputs, {"images": array[i:i + 1]}) for i in range(len(array))]
        return {name: torch.from_numpy(np.concatenate([r[j] for r in runs])) for j, name in enumerate(self.outputs)}

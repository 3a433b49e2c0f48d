"""The model file behind the service's peers, run the way a user's own app would run it: one session of
the file's runtime, opened directly (no ``model.runtime`` runner, no batching, no thread sharing).

``open_session(path, runtime, threads)`` -> ``EngineSession``: ``session(images)`` takes preprocessed
Tensor[B, 3, S, S] float32 and returns the stage the file stops at (``RefineDetOutput`` for a raw ONNX
export or a checkpoint, ``DecodedOutput`` for a decoded one), which ``model.postprocess.PostProcessor``
finishes with ``session.anchors``. Runtimes (``RUNTIMES``):

- ``onnxruntime``: ``onnxruntime.InferenceSession`` on the CPU provider (``threads`` intra-op threads,
  None: its default, one per core);
- ``openvino``: ``openvino.Core().compile_model(path, "CPU")`` (``INFERENCE_NUM_THREADS``), one infer
  request per calling thread (a request runs one inference at a time);
- ``torch``: a checkpoint, eager PyTorch (``torch.set_num_threads``).

An ONNX file needs its manifest (``<file>.json``) for the config, anchors and output names, as every
artifact of this project has.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model.anchors import generate_anchors
from model.artifacts import file_kind, read_manifest
from model.config import RefineDetConfig
from model.errors import UserError
from model.network import RefineDetOutput
from model.postprocess import DecodedOutput, ModelOutput

RUNTIMES = ("onnxruntime", "openvino", "torch")


class EngineSession:
    """``config``, ``anchors`` Tensor[A, 4] cxcywh, ``runtime``, ``precision``; call with images."""

    def __init__(
        self,
        run: Callable[[np.ndarray], list[np.ndarray]],
        config: RefineDetConfig,
        outputs: str,
        runtime: str,
        precision: str,
    ) -> None:
        self._run = run
        self.config = config
        self.outputs = outputs
        self.runtime = runtime
        self.precision = precision
        self.anchors = generate_anchors(config)

    def __call__(self, images: Tensor) -> ModelOutput:
        tensors = [torch.from_numpy(np.asarray(t)).float() for t in self._run(images.contiguous().numpy())]
        return RefineDetOutput(*tensors) if self.outputs == "raw" else DecodedOutput(*tensors)


def default_runtime(path: Path) -> str:
    """``torch`` for a checkpoint, else ``onnxruntime``."""
    return "torch" if file_kind(path) == "checkpoint" else "onnxruntime"


def open_session(path: str | Path, runtime: str | None = None, threads: int | None = None) -> EngineSession:
    """One session of ``path`` on ``runtime`` (default: ``default_runtime``) with ``threads`` threads."""
    path = Path(path)
    runtime = runtime or default_runtime(path)
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime takes {', '.join(RUNTIMES)}, got {runtime!r}")
    if (runtime == "torch") != (file_kind(path) == "checkpoint"):
        raise UserError(f"{path}: a checkpoint runs on torch, an ONNX model on onnxruntime or openvino")
    if runtime == "torch":
        return _torch_session(path, threads)
    manifest = read_manifest(path, verify_hash=False)
    names = list(manifest.output_names)
    opener = _onnxruntime if runtime == "onnxruntime" else _openvino
    run = opener(path, manifest.input_name, names, threads)
    return EngineSession(run, manifest.config, manifest.outputs, runtime, manifest.precision)


def _onnxruntime(path: Path, input_name: str, names: list[str], threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(names, {input_name: x})


def _openvino(path: Path, input_name: str, names: list[str], threads: int | None):
    try:
        import openvino as ov
    except ImportError:
        raise UserError("--runtime openvino needs openvino: pip install openvino") from None
    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    outputs = [compiled.output(n) for n in names]
    local = threading.local()

    def run(x: np.ndarray) -> list[np.ndarray]:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        result = request.infer({input_name: x})
        return [result[o] for o in outputs]

    return run


def _torch_session(path: Path, threads: int | None) -> EngineSession:
    from model.checkpoint import load_model

    model, _ = load_model(path, map_location="cpu")
    model.requires_grad_(False).eval()
    if threads:
        torch.set_num_threads(threads)

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            return [t.numpy() for t in model(torch.from_numpy(x))]

    return EngineSession(run, model.config, "raw", "torch", "fp32")

"""Choosing and building the inference backend from the settings.

``auto`` follows the artifact's kind (``model.artifacts.file_kind``, the project's one table of model
files): an engine -> tensorrt (CUDA), ONNX -> onnxruntime (its CUDA provider where installed and a GPU
is visible, else CPU), a checkpoint -> torch (CUDA with fp16 + CUDA graphs where a GPU is visible, else
CPU). No model given: the project's default checkpoint, or an untrained default model until one ships
(``model.zoo``). Which artifact to serve in the first place (exporting to ONNX or building an engine
first) is decided above this package, by ``deploy.prepare``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from model.artifacts import file_kind
from model.errors import UserError
from service.backends.base import Backend, ModelInfo
from service.settings import Settings

log = logging.getLogger("refinedet.service")
# model file kind -> the backend that runs it
BACKEND_FOR_KIND = {"checkpoint": "torch", "onnx": "onnxruntime", "tensorrt": "tensorrt"}


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "torch" | "onnxruntime" | "tensorrt"
    artifact: Path | None  # None: the untrained default model
    device: str  # "cpu" | "cuda"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def ort_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def resolve_backend(settings: Settings) -> BackendChoice:
    """Pick backend, artifact and device; raises UserError naming the problem and the fix."""
    from model.zoo import default_checkpoint

    path = settings.model if settings.model is not None else default_checkpoint()
    if path is not None and not path.is_file():
        raise UserError(
            f"model file not found: {path} (pass --model with a .pth checkpoint, .onnx model or .plan engine)"
        )
    kind = BACKEND_FOR_KIND[file_kind(path)] if path is not None else "torch"
    backend = kind if settings.backend == "auto" else settings.backend
    if backend != kind and not (backend == "openvino" and kind == "onnxruntime"):  # OpenVINO runs ONNX too
        raise UserError(
            f"--backend {backend} cannot serve {path} (a {kind} artifact); use --backend auto or {kind}"
        )
    if settings.device == "cuda" and not cuda_available():
        raise UserError("--device cuda but no CUDA GPU is visible to PyTorch; use --device cpu")
    if backend == "tensorrt":
        if settings.device == "cpu" or not cuda_available():
            raise UserError(
                "TensorRT engines run on a CUDA GPU only and none is usable here; serve the .onnx model instead"
            )
        return BackendChoice(backend, path, "cuda")
    if backend == "openvino":
        if settings.device == "cuda":
            raise UserError(
                "--backend openvino runs on the CPU only; use --device cpu or --backend onnxruntime"
            )
        return BackendChoice(backend, path, "cpu")
    if backend == "onnxruntime":
        use_cuda = settings.device == "cuda" or (
            settings.device == "auto" and cuda_available() and ort_has_cuda()
        )
        return BackendChoice(backend, path, "cuda" if use_cuda else "cpu")
    return BackendChoice(backend, path, settings.resolved_device())


def create_backend(settings: Settings, choice: BackendChoice | None = None) -> Backend:
    """An unloaded backend for ``settings`` (call ``load()`` then ``warmup()``)."""
    import torch

    choice = choice or resolve_backend(settings)
    device = torch.device(choice.device)
    threads = settings.engine_threads() if device.type == "cpu" else None
    if threads is not None:
        set_torch_threads(threads)
    if choice.backend == "torch":
        from service.backends.torch import TorchBackend

        return TorchBackend(
            choice.artifact, device, settings.batch_limit(choice.device), settings.fp16, settings.channels_last,
            settings.cuda_graphs, settings.model_name, settings.fuse_postprocess,
        )  # fmt: skip
    from service.backends.artifact import OnnxRuntimeBackend, OpenVinoBackend, TensorRTBackend

    assert choice.artifact is not None
    limit = settings.batch_limit(choice.device)
    if choice.backend == "openvino":
        cache = settings.cache_dir / "openvino"
        return OpenVinoBackend(choice.artifact, device, limit, settings.model_name, threads, cache)
    if choice.backend == "onnxruntime":
        return OnnxRuntimeBackend(choice.artifact, device, limit, settings.model_name, threads)
    return TensorRTBackend(choice.artifact, device, limit, settings.model_name)


def set_torch_threads(threads: int) -> None:
    """PyTorch's intra-op threads for this process (the engine thread's network, pre- and post-processing
    on a CPU) and one inter-op thread (the service never runs ops concurrently inside one call)."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or inter-op work already ran in this process
        torch.set_num_interop_threads(1)
    log.info("CPU engine threads: %d (PyTorch intra-op; ONNX Runtime intra-op likewise)", threads)


def load_backend(settings: Settings) -> Backend:
    """Resolve, build, load and warm up the backend the settings describe (blocking)."""
    backend = create_backend(settings)
    backend.load()
    backend.warmup(settings.warmup_iterations)
    return backend


__all__ = ["Backend", "BackendChoice", "ModelInfo", "create_backend", "load_backend", "resolve_backend"]

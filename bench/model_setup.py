"""What the model benchmark times, built from one checkpoint.

- ``checkpoint_at_size``: the same weights in a network rebuilt at another input size (RefineDet's
  VGG-16 / ResNet networks are fully convolutional; the anchors follow the rebuilt config), saved as a
  checkpoint so every backend loads it the way the service does.
- ``make_backend``: a loaded, warmed-up ``service.backends`` backend for one benchmark row kind:
  ``torch-eager`` (the naive baseline: fp32, contiguous, no graphs), ``torch`` (the service's fast path:
  fp16 / channels-last / one CUDA graph per batch size on CUDA), ``onnxruntime`` and ``tensorrt``
  (exported with ``conversion``), ``onnxruntime-int8`` (the export quantized like
  ``refinedet export onnx --int8``, on the CPU).
- ``Trunk``: the bare VGG-16 trunk (``VGG16Body.features``: conv1_1 .. conv5_3 + ReLUs) on the same fast
  path, the floor the detector is compared with.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.checkpoint import atomic_torch_save, load_model, read_checkpoint, save_checkpoint
from model.config import RefineDetConfig
from model.network import build_model
from model.preprocess import load_image, preprocess
from model.runtime.base import ArtifactRunner
from service.backends.artifact import OnnxRuntimeBackend
from service.backends.base import Backend, synchronize
from service.backends.torch import capture_cuda_graph

# In the order they run: the fast path and its floor first, so a run cut short keeps them.
BACKENDS = ("torch", "vgg16-trunk", "torch-eager", "onnxruntime", "onnxruntime-int8", "tensorrt")
TRUNK = "vgg16-trunk"
INT8 = "onnxruntime-int8"
CALIBRATION_PHOTOS = 8  # the INT8 model's scales do not change its speed: a few photos suffice


def row_precision(name: str, precision: str) -> str:
    """The precision a row reports: the INT8 model's rows say int8 (they run in the fp32 pass)."""
    return "int8" if name == INT8 else precision


def local_checkpoint(path: Path, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """(a quickly loadable copy, the raw checkpoint dict): read once; an ``.xz`` file is saved
    uncompressed in ``workdir`` so that every backend does not decompress it again."""
    ckpt = read_checkpoint(path)
    if path.suffix != ".xz":
        return path, ckpt
    return atomic_torch_save(ckpt, workdir / path.stem), ckpt


def checkpoint_at_size(path: Path, ckpt: dict[str, Any], size: int, workdir: Path) -> Path:
    """``path`` (holding ``ckpt``) if already at ``size``, else its weights rebuilt at ``size``."""
    config = RefineDetConfig.from_dict(ckpt["config"])
    if config.input_size == size:
        return path
    old = str(config.input_size)
    name = config.name.replace(old, str(size)) if old in config.name else f"{config.name}_{size}"
    model = build_model(config.replace(input_size=size, name=name))
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state)  # strict: the layers do not depend on the input size
    return save_checkpoint(workdir / f"{name}.pth", model, metadata=ckpt.get("metadata"))


def skip_reason(name: str, device: torch.device, precision: str, backbone: str) -> str | None:
    """Why the row ``name`` x ``precision`` cannot run here (None: it can)."""
    cuda = device.type == "cuda"
    if name == "torch-eager" and precision != "fp32":
        return "the naive baseline is fp32 only"
    if name in ("torch", TRUNK) and precision == "fp16" and not cuda:
        return "fp16 runs on CUDA only"
    if name == "torch" and not cuda:
        return "on the CPU the torch fast path is torch-eager (no fp16, channels-last or graphs)"
    if name == TRUNK and backbone != "vgg16":
        return f"the trunk floor is VGG-16's; this model's backbone is {backbone}"
    if name == INT8:
        if cuda:
            return "the INT8 ONNX model is for ONNX Runtime on the CPU"
        if precision != "fp32":
            return "the INT8 model runs once, in the fp32 pass"
    if name in ("onnxruntime", INT8):
        if precision != "fp32":
            return "ONNX exports are fp32"
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed"
        import onnxruntime

        if cuda and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "this onnxruntime has no CUDAExecutionProvider (CPU build)"
    if name == "tensorrt":
        if not cuda:
            return "TensorRT needs a CUDA GPU"
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt is not installed"
    return None


def make_backend(
    name: str,
    checkpoint: Path,
    device: torch.device,
    precision: str,
    batch_sizes: Sequence[int],
    workdir: Path,
    threads: int | None = None,
    calibration: Sequence[Path] = (),
    fuse_postprocess: bool = False,
) -> Backend:
    """A loaded and warmed-up backend for the row kind ``name`` (any of ``BACKENDS`` but the trunk);
    ``calibration``: images for the INT8 model's calibration; ``fuse_postprocess``: torch with CUDA
    graphs captures the post-processing too (the service's default)."""
    max_batch = max(batch_sizes)
    if name in ("torch", "torch-eager"):
        from service.backends.torch import TorchBackend

        fast = name == "torch"
        backend: Backend = TorchBackend(
            checkpoint, device, max_batch, fp16=precision == "fp16", channels_last=fast, cuda_graphs=fast,
            fuse_postprocess=fast and fuse_postprocess,
        )  # fmt: skip
        backend.buckets = sorted(set(batch_sizes))  # type: ignore[attr-defined]  # graphs only for these
    elif name == "onnxruntime":
        backend = ThreadedOnnxRuntimeBackend(exported_onnx(checkpoint, workdir), device, max_batch, threads)
    elif name == INT8:
        artifact = quantized_onnx(checkpoint, workdir, calibration)
        backend = ThreadedOnnxRuntimeBackend(artifact, device, max_batch, threads)
    elif name == "tensorrt":
        from service.backends.artifact import TensorRTBackend

        backend = TensorRTBackend(built_engine(checkpoint, workdir, precision, max_batch), device, max_batch)
    else:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    backend.load()
    backend.warmup(1)
    return backend


def exported_onnx(checkpoint: Path, workdir: Path) -> Path:
    """The checkpoint exported to ONNX (raw outputs, dynamic batch), once per checkpoint."""
    from conversion.onnx_export import export_checkpoint

    path = workdir / f"{checkpoint.stem}.onnx"
    if not path.is_file():
        export_checkpoint(checkpoint, path)
    return path


def quantized_onnx(checkpoint: Path, workdir: Path, calibration: Sequence[Path]) -> Path:
    """The export quantized with ``conversion.quantize``'s defaults (those of ``refinedet export onnx
    --int8``), calibrated on ``calibration``, once per checkpoint."""
    from conversion.quantize import QuantizeOptions, quantize_onnx

    path = workdir / f"{checkpoint.stem}.int8.onnx"
    if not path.is_file():
        options = QuantizeOptions(files=tuple(calibration), source="benchmark photos")
        quantize_onnx(exported_onnx(checkpoint, workdir), path, options)
    return path


def built_engine(checkpoint: Path, workdir: Path, precision: str, max_batch: int) -> Path:
    """A TensorRT engine of the checkpoint at ``precision`` with a 1..max_batch profile."""
    from conversion.tensorrt_build import BatchProfile, EngineOptions, build_engine

    path = workdir / f"{checkpoint.stem}_{precision}_b{max_batch}.plan"
    if not path.is_file():
        profile = BatchProfile(1, max_batch, max_batch)
        build_engine(exported_onnx(checkpoint, workdir), path, EngineOptions(precision, profile))
    return path


class ThreadedOnnxRuntimeBackend(OnnxRuntimeBackend):
    """The service's ONNX Runtime backend with ``threads`` intra-op threads (None: ORT's default)."""

    def __init__(self, artifact: Path, device: torch.device, max_batch: int, threads: int | None) -> None:
        super().__init__(artifact, device, max_batch)
        self.threads = threads

    def make_runner(self) -> ArtifactRunner:
        from model.runtime.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(self.artifact, device=self.device, intra_op_threads=self.threads)


class Trunk:
    """``VGG16Body.features`` of the checkpoint's network: on CUDA in the fast path's precision,
    channels-last, one CUDA graph per batch size (``infer`` copies in and replays; no output copy)."""

    def __init__(self, checkpoint: Path, device: torch.device, precision: str, batch_sizes: Sequence[int]):
        model, _ = load_model(checkpoint)
        cuda = device.type == "cuda"
        self.device = device
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        self.size = model.config.input_size
        features: torch.nn.Module = model.backbone.features  # type: ignore[assignment]
        trunk = features.to(device, self.dtype).to(memory_format=self.memory_format)
        self.trunk = trunk.eval().requires_grad_(False)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        if cuda:
            self._capture(sorted(set(batch_sizes), reverse=True))

    @torch.inference_mode()
    def infer(self, images: Tensor) -> Tensor:
        """images: Tensor[B, 3, S, S] -> conv5_3 features [B, 512, S/16, S/16]."""
        b = images.shape[0]
        if b in self.graphs:
            graph, static_in, static_out = self.graphs[b]
            static_in.copy_(images)
            graph.replay()
            return static_out
        return self.trunk(images.to(self.device, self.dtype).contiguous(memory_format=self.memory_format))

    @torch.inference_mode()
    def _capture(self, batch_sizes: list[int]) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for b in batch_sizes:
            x = torch.randn(b, 3, self.size, self.size, device=self.device, dtype=self.dtype)
            x = x.contiguous(memory_format=self.memory_format)
            graph, out = capture_cuda_graph(self.trunk, x, pool, stream)
            self.graphs[b] = (graph, x, out)
        synchronize(self.device)


class RealImages:
    """BCCD photos decoded once (uint8 RGB [3, H, W]); ``batch`` preprocesses ``b`` of them (cycling)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.images = [load_image(p) for p in paths]

    def batch(self, b: int, config: RefineDetConfig, device: torch.device) -> Tensor:
        """Tensor[b, 3, S, S] normalised per ``config`` on ``device``."""
        chosen = [self.images[i % len(self.images)].to(device) for i in range(b)]
        return preprocess(chosen, config.input_size, config.normalization)


def random_images(b: int, size: int, device: torch.device, seed: int = 0) -> Tensor:
    """Normalised-looking random inputs (never zeros): N(0, 60^2), Tensor[b, 3, size, size] float32."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(b, 3, size, size, generator=g) * 60.0).to(device)

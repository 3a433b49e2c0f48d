"""Backends over exported artifacts: they wrap a ``model.runtime`` runner built from the file and its
manifest (``model.onnx`` + ``model.onnx.json``), adding what the service reports (the runner pads
batches itself). An ONNX model runs with ONNX Runtime (CPU or CUDA) or OpenVINO (CPU), a TensorRT
engine with TensorRT."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from model.runtime.base import ArtifactRunner, RunnerOutput
from service.backends.base import Backend, ModelInfo

log = logging.getLogger("refinedet.service")


class RunnerBackend(Backend):
    """Base for artifact backends; subclasses implement ``make_runner``."""

    def __init__(
        self,
        artifact: Path,
        device: torch.device,
        max_batch: int,
        model_name: str | None = None,
        cpu_threads: int | None = None,
    ) -> None:
        super().__init__(device, max_batch)
        self.artifact = artifact
        self.model_name = model_name
        self.cpu_threads = cpu_threads  # intra-op threads on a CPU (None: the runtime's default)
        self.runner: ArtifactRunner | None = None

    def make_runner(self) -> ArtifactRunner:
        raise NotImplementedError

    @property
    def precision(self) -> str:
        return self.runner.precision if self.runner is not None else "unknown"

    @property
    def max_batch(self) -> int:
        limit = self.runner.max_batch if self.runner is not None else None
        return min(self.requested_max_batch, limit) if limit else self.requested_max_batch

    def load(self) -> None:
        runner = self.make_runner()
        self.runner, self.config, self.anchors = runner, runner.config, runner.anchors
        manifest = runner.manifest
        trained = bool(manifest.extra.get("trained", True))
        name = self.model_name or runner.config.name
        self.info = ModelInfo(
            name, self.artifact, manifest.artifact_sha256, trained, f"{manifest.kind} {self.artifact}"
        )
        for warning in getattr(runner, "warnings", []):
            log.warning("%s", warning)
        log.info(
            "serving %s %s with %s (%s, sha256 %s)",
            manifest.kind,
            self.artifact,
            self.name,
            runner.precision,
            manifest.artifact_sha256[:12],
        )

    def infer(self, images: Tensor) -> RunnerOutput:
        if self.runner is None:
            raise RuntimeError(f"{self.name} backend used before load()")
        return self.runner(images)  # the runner pads to its fixed or minimum batch


class OnnxRuntimeBackend(RunnerBackend):
    name = "onnxruntime"

    def make_runner(self, threads: int | None = None) -> ArtifactRunner:
        from model.runtime.onnxruntime import OnnxRuntimeRunner

        threads = threads or (self.cpu_threads if self.device.type == "cpu" else None)
        return OnnxRuntimeRunner(self.artifact, device=self.device, intra_op_threads=threads)

    def single_thread_infer(self) -> Callable[[Tensor], RunnerOutput]:
        """On a CPU with more than one thread: a second session of the same model with one intra-op
        thread (concurrent runs of the first would share, and oversubscribe, its thread pool)."""
        if self.device.type != "cpu" or self.cpu_threads == 1:
            return self.infer
        runner = self.make_runner(threads=1)
        return runner.__call__


class OpenVinoBackend(RunnerBackend):
    """An ONNX model (FP32 or INT8 QDQ) run by OpenVINO on the CPU, in the precision OpenVINO compiles
    (``precision``: e.g. bf16 for the FP32 model on a CPU with BF16). ``cache_dir``: OpenVINO's model
    cache (a later start loads the compiled model instead of compiling it); None: no cache."""

    name = "openvino"

    def __init__(
        self,
        artifact: Path,
        device: torch.device,
        max_batch: int,
        model_name: str | None = None,
        cpu_threads: int | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        super().__init__(artifact, device, max_batch, model_name, cpu_threads)
        self.cache_dir = cache_dir

    def make_runner(self, threads: int | None = None, streams: int = 1) -> ArtifactRunner:
        from model.runtime.openvino import OpenVinoRunner

        threads = threads or self.cpu_threads
        return OpenVinoRunner(self.artifact, self.device, threads, streams=streams, cache_dir=self.cache_dir)

    def single_thread_infer(self) -> Callable[[Tensor], RunnerOutput]:
        """With more than one thread: a second compiled model of the same file whose streams run one
        thread each, one stream per engine thread (the most one-thread calls ``CpuShare`` lets run at
        once), each calling thread with its own infer request."""
        if self.cpu_threads == 1:
            return self.infer
        from model.cpu import usable_cores

        runner = self.make_runner(threads=1, streams=self.cpu_threads or usable_cores())
        return runner.__call__


class TensorRTBackend(RunnerBackend):
    name = "tensorrt"

    def make_runner(self) -> ArtifactRunner:
        from model.runtime.tensorrt import TensorRTRunner

        return TensorRTRunner(self.artifact, device=self.device)

"""Building the inference backend an ``EnginePlan`` names (``model.runtime.plan``).

What to serve, on which device, with how many threads, was decided above this package, once, by
``deploy.prepare``; this package builds exactly that and re-derives nothing. The torch backend's own
switches (fp16, channels-last, CUDA graphs, fused post-processing) and the reported model name come from the
service ``Settings``.
"""

from __future__ import annotations

import contextlib
import logging

from model.runtime.plan import EnginePlan
from service.backends.base import Backend, ModelInfo
from service.settings import Settings

log = logging.getLogger("refinedet.service")


def create_backend(plan: EnginePlan, settings: Settings) -> Backend:
    """An unloaded backend for ``plan`` (call ``load()`` then ``warmup()``)."""
    import torch

    device = torch.device(plan.device)
    if plan.threads is not None:
        set_torch_threads(plan.threads)
    if plan.backend == "torch":
        from service.backends.torch import TorchBackend

        return TorchBackend(
            plan.artifact, device, plan.max_batch, settings.fp16, settings.channels_last,
            settings.cuda_graphs, settings.model_name, settings.fuse_postprocess,
        )  # fmt: skip
    from service.backends.artifact import OnnxRuntimeBackend, OpenVinoBackend, TensorRTBackend

    assert plan.artifact is not None, "only the torch backend builds an untrained network"
    if plan.backend == "openvino":
        cache = settings.cache_dir / "openvino"  # OpenVINO's compiled-model cache: later starts load faster
        return OpenVinoBackend(
            plan.artifact, device, plan.max_batch, settings.model_name, plan.threads, cache
        )
    if plan.backend == "onnxruntime":
        return OnnxRuntimeBackend(plan.artifact, device, plan.max_batch, settings.model_name, plan.threads)
    if plan.backend == "tensorrt":
        return TensorRTBackend(plan.artifact, device, plan.max_batch, settings.model_name)
    raise ValueError(f"unknown backend {plan.backend!r} in the engine plan")


def set_torch_threads(threads: int) -> None:
    """PyTorch's intra-op threads for this process (the engine thread's network, pre- and post-processing
    on a CPU) and one inter-op thread (the service never runs ops concurrently inside one call)."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or inter-op work already ran in this process
        torch.set_num_interop_threads(1)
    log.info("CPU engine threads: %d (PyTorch intra-op; the runtime's intra-op likewise)", threads)


def load_backend(plan: EnginePlan, settings: Settings) -> Backend:
    """Build, load and warm up the backend ``plan`` names (blocking)."""
    backend = create_backend(plan, settings)
    backend.load()
    backend.warmup(settings.warmup_iterations)
    return backend


__all__ = ["Backend", "ModelInfo", "create_backend", "load_backend"]

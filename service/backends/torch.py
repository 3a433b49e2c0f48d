"""PyTorch backend: a RefineDet checkpoint (or the untrained default) on CPU or CUDA.

It runs channels-last (``channels_last``; on a CPU too, where oneDNN's convolutions are 15-23% faster so:
``python -m bench.cpu_patterns``, docs/benchmarks.md). On CUDA it also runs in float16 (``fp16``), with cuDNN's autotuner on,
and replays one CUDA graph per batch bucket (``cuda_graphs``: buckets 1, 2, 4, ..., max_batch; a batch
is padded up to its bucket). With ``fuse_postprocess`` (the service's default) each graph holds the
network *and* the whole post-processing (decoding, then ``select_detections`` in its sync-free mode),
so one replay and one copy to the host serve a batch, and ``infer`` returns ``SelectedOutput``. If that
capture fails, the backend logs why and captures the network alone (post-processing then runs after it).
Graphs share one memory pool and are captured largest first; they are replayed one at a time from
the engine thread, and their static outputs are copied before the next replay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.anchors import generate_anchors
from model.network import RefineDet, RefineDetOutput
from model.postprocess import SYNC_FREE_NMS_PASSES, Detections, decode_predictions, select_detections
from service.backends.base import Backend, BackendOutput, ModelInfo, SelectedOutput, batch_buckets, bucket_for

log = logging.getLogger("refinedet.service")

UNTRAINED_WARNING = (
    "NO TRAINED WEIGHTS: serving an UNTRAINED %s (random initialisation, classes %s). Its detections "
    "are meaningless. Pass --model PATH (or REFINEDET_MODEL) with a trained checkpoint, ONNX model or engine."
)


def build_untrained_default() -> RefineDet:
    """The default architecture with random weights, used until a trained default checkpoint ships."""
    from model.config import preset
    from model.network import build_model
    from model.zoo import DEFAULT_CLASSES, DEFAULT_PRESET

    return build_model(preset(DEFAULT_PRESET, class_names=DEFAULT_CLASSES)).eval()


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self,
        checkpoint: Path | None,
        device: torch.device,
        max_batch: int,
        fp16: bool = True,
        channels_last: bool = True,
        cuda_graphs: bool = True,
        model_name: str | None = None,
        fuse_postprocess: bool = False,
    ) -> None:
        super().__init__(device, max_batch)
        cuda = device.type == "cuda"
        self.checkpoint = checkpoint
        self.dtype = torch.float16 if (cuda and fp16) else torch.float32
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.use_graphs = cuda and cuda_graphs
        self.fuse_postprocess = self.use_graphs and fuse_postprocess
        self.model_name = model_name
        self.model: RefineDet | None = None
        self.buckets = batch_buckets(max_batch)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, tuple[Tensor, ...]]] = {}

    @property
    def precision(self) -> str:
        return "fp16" if self.dtype == torch.float16 else "fp32"

    def load(self) -> None:
        from model.checkpoint import file_sha256, load_model

        if self.checkpoint is None:
            model = build_untrained_default()
            log.warning(UNTRAINED_WARNING, model.config.name, ", ".join(model.config.class_names))
            sha, trained, weights = (
                None,
                False,
                "untrained (random initialisation): no trained default checkpoint exists yet",
            )
        else:
            model, ckpt = load_model(self.checkpoint, map_location="cpu")
            sha = file_sha256(self.checkpoint)
            trained = bool(ckpt.get("metadata", {}).get("trained", True))
            weights = f"checkpoint {self.checkpoint}"
            log.info("serving checkpoint %s (sha256 %s)", self.checkpoint, sha[:12])
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes per bucket: autotune once, before capture
        model = model.to(self.device, self.dtype).to(memory_format=self.memory_format).eval()
        model.requires_grad_(False)
        self.model, self.config = model, model.config
        self.anchors = generate_anchors(model.config).to(self.device)  # == model.anchors, float32
        name = self.model_name or model.config.name
        self.info = ModelInfo(name, self.checkpoint, sha, trained, weights)

    def warmup_batch_sizes(self) -> list[int]:
        return list(self.buckets) if self.use_graphs else super().warmup_batch_sizes()

    def warmup(self, iterations: int = 1) -> None:
        if self.use_graphs and not self._graphs:
            try:
                self._capture_graphs()
            except RuntimeError as exc:
                if not self.fuse_postprocess:
                    raise
                # The fused step is an optimisation: never let it cost the service its start.
                log.warning(
                    "capturing the post-processing in the CUDA graphs failed (%s); "
                    "capturing the network alone and post-processing outside the graphs",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
                self._graphs.clear()
                self.fuse_postprocess = False
                torch.cuda.synchronize(self.device)
                self._capture_graphs()
        super().warmup(iterations)

    @torch.inference_mode()
    def infer(self, images: Tensor) -> BackendOutput:
        if self.model is None:
            raise RuntimeError("torch backend used before load()")
        b = images.shape[0]
        if self._graphs:
            graph, static_in, static_out = self._graphs[bucket_for(b, self.buckets)]
            static_in[:b].copy_(images)
            static_in[b:].zero_()
            graph.replay()
            if self.fuse_postprocess:
                boxes, scores, labels, converged, decoded_boxes, decoded_scores = static_out
                detections = Detections(
                    boxes[:b].clone(), scores[:b].clone(), labels[:b].clone(), converged.clone()
                )
                return SelectedOutput(detections, decoded_boxes[:b].clone(), decoded_scores[:b].clone())
            return RefineDetOutput(*(t[:b].clone() for t in static_out))
        x = images.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        return self.model(x)

    def _network_and_selection(self, images: Tensor) -> tuple[Tensor, ...]:
        """What a fused graph runs: network, decoding and the sync-free selection (no host sync)."""
        assert self.model is not None and self.config is not None and self.anchors is not None
        arm_loc, arm_conf, odm_loc, odm_conf = self.model(images)
        boxes, scores = decode_predictions(arm_loc, arm_conf, odm_loc, odm_conf, self.anchors, self.config)
        selected = select_detections(boxes, scores, self.config.postprocess, SYNC_FREE_NMS_PASSES)
        assert selected.converged is not None
        return (selected.boxes_xyxy, selected.scores, selected.labels, selected.converged, boxes, scores)

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        """One graph per bucket, largest first, all in one memory pool."""
        assert self.model is not None and self.config is not None
        s = self.config.input_size
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        step = self._network_and_selection if self.fuse_postprocess else self.model
        for b in sorted(self.buckets, reverse=True):
            static_in = torch.zeros(b, 3, s, s, device=self.device, dtype=self.dtype)
            static_in = static_in.contiguous(memory_format=self.memory_format)
            graph, static_out = capture_cuda_graph(step, static_in, pool, stream)
            self._graphs[b] = (graph, static_in, tuple(static_out))
        what = "network + post-processing" if self.fuse_postprocess else "network"
        log.info("captured CUDA graphs (%s) for batch sizes %s", what, sorted(self._graphs))


def capture_cuda_graph(
    module: Callable[[Tensor], Any], static_in: Tensor, pool: Any, stream: torch.cuda.Stream
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture ``module(static_in)`` into a CUDA graph (after two warm-up calls on ``stream``, off the
    default stream as capture requires). Returns (graph, static outputs); replay after copying new
    inputs into ``static_in``."""
    device = static_in.device
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            module(static_in)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        static_out = module(static_in)
    return graph, static_out

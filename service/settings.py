"""Service settings, parsed once: every field is also an environment variable ``REFINEDET_<NAME>``.

``Settings()`` reads the environment (and a ``.env`` file if one is given); the CLI passes its options
as keyword arguments, which win over the environment. Nothing reads settings at import time: they are
passed into ``service.app.create_app(settings)``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BackendName = Literal["auto", "tensorrt", "onnxruntime", "openvino", "torch"]
DeviceName = Literal["auto", "cpu", "cuda"]
EngineDecode = Literal["auto", "on", "off"]
EnginePrecision = Literal["fp16", "fp32"]
ON_OFF_WORDS = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}
ENV_PREFIX = "REFINEDET_"


class ServingKnobs(NamedTuple):
    """``Settings.serving_for(device)``: batch limit, engine slots, CPU threads, who decodes uploads."""

    max_batch: int
    slots: int
    threads: int | None
    decode: str  # nvjpeg | pil | handler


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # What to serve and where.
    model: Path | None = Field(
        default=None,
        description="checkpoint (.pth), ONNX model (.onnx) or TensorRT engine (.plan); default: the project's default checkpoint",
    )
    backend: BackendName = Field(
        default="auto",
        description="auto: what `deploy.prepare` finds fastest here (a TensorRT engine on a GPU; on a CPU the "
        "fastest verified of OpenVINO / ONNX Runtime INT8 or FP32 / torch); or name one",
    )
    device: DeviceName = Field(default="auto", description="auto: cuda when available, else cpu")
    model_name: str | None = Field(
        default=None,
        description="name reported by /v1/model and the KServe routes (default: the config's name)",
    )
    fp16: bool = Field(default=True, description="torch backend on CUDA: half precision")
    channels_last: bool = Field(
        default=True,
        description="torch backend: channels-last memory format (on a CPU too: faster convolutions)",
    )
    cuda_graphs: bool = Field(
        default=True, description="torch backend on CUDA: capture one CUDA graph per batch bucket"
    )
    fuse_postprocess: bool = Field(
        default=True,
        description="torch backend with CUDA graphs: capture the post-processing (decoding, selection, NMS) in the graphs too",
    )
    warmup_iterations: int = Field(default=2, ge=0, le=100)
    engine_decode: EngineDecode = Field(
        default="auto",
        validation_alias=AliasChoices(
            "engine_decode", f"{ENV_PREFIX}ENGINE_DECODE", f"{ENV_PREFIX}GPU_DECODE"
        ),
        description="decode uploads in the engine rather than in the request handler: on CUDA plain JPEGs, a batch "
        "in one nvJPEG call; on a CPU every upload, by PIL in the engine slot that runs it. auto and on: yes (on: "
        "fail to start if nvJPEG does not work); off: the handler decodes. (Was REFINEDET_GPU_DECODE, still read.)",
    )

    # Prepared artifacts (`refinedet serve` / `refinedet prepare`, the container).
    cache_dir: Path = Field(
        default_factory=lambda: (
            Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "refinedet"
        ),
        description="where ONNX exports and TensorRT engines built from the model are kept (a volume in containers)",
    )
    precision: EnginePrecision = Field(
        default="fp16", description="precision of a TensorRT engine built at start"
    )
    engine_lock_timeout_s: float = Field(
        default=1800.0, gt=0, description="how long a replica waits for another one building the same engine"
    )

    # Server.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(
        default=1, ge=1, le=64, description="uvicorn worker processes, each loading the model"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    graceful_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="on SIGTERM, requests in flight are served for up to this long; any still unanswered "
        "then gets 503 shutting_down",
    )

    # Dynamic batching.
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="largest dynamic batch; default 8 on a GPU, 1 on a CPU (where a batch costs its images' time "
        "one after another: it adds waiting, not throughput; CPU_STREAMS requests run at once instead)",
    )
    max_delay_ms: float = Field(
        default=0.0,
        ge=0,
        le=10_000,
        description="longest wait for a batch to fill after its first request; 0: run as soon as the engine is "
        "free (requests that arrive while it works form the next batch)",
    )
    max_queue_size: int = Field(
        default=64, ge=1, le=100_000, description="queued images beyond this are answered 503"
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="a request not answered by then gets 504"
    )

    # CPU serving (service/README.md, "On a CPU").
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="intra-op threads of each worker's engine on a CPU (PyTorch and ONNX Runtime); default: the "
        "usable cores (affinity mask and cgroup quota) divided by WORKERS, at least 1",
    )

    cpu_streams: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="on a CPU, how many requests the engine runs at once, each taking the next one the moment it "
        "is free (a request that runs alone gets all CPU_THREADS, concurrent ones one thread each); default: "
        "CPU_THREADS; 1: one request after another",
    )

    # Request limits.
    max_upload_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1024, description="request bodies above this are answered 413"
    )
    max_image_pixels: int = Field(
        default=40_000_000, ge=64, description="decoded width*height above this is answered 413"
    )
    min_image_side: int = Field(
        default=8, ge=1, description="images with a smaller width or height are answered 422"
    )
    max_images_per_request: int = Field(
        default=16, ge=1, le=256, description="files in one /detect/batch request"
    )
    default_score_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    max_detections: int = Field(
        default=100, ge=1, le=10_000, description="default and upper bound of ?max_detections"
    )

    # Hardening: limits that hold under overload, shutdown and hostile clients (service/server.py,
    # service/protocol.py, service/admission.py).
    max_connections: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="open connections beyond this are answered 503 and closed before a request is read",
    )
    max_header_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="request line plus headers above this are answered 431",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a connection that sends nothing, or a request whose headers are incomplete, this long "
        "after it opened / its first byte is closed (408 for a partial request)",
    )
    body_timeout_s: float = Field(
        default=10.0, gt=0, description="longest pause while a request body is being received (then 408)"
    )
    keep_alive_timeout_s: float = Field(
        default=5.0, gt=0, description="an idle keep-alive connection is closed after this long"
    )
    max_pixels_in_flight: int = Field(
        default=80_000_000,
        ge=64,
        description="decoded pixels (width*height) of all requests being served at once; an image that "
        "would exceed it is answered 503 + Retry-After (bounds the memory decoding takes)",
    )
    admission_headroom: float = Field(
        default=0.5,
        gt=0,
        le=1.0,
        description="a request is admitted only if its expected wait (work ahead x recent batch time) fits "
        "in this fraction of its deadline; otherwise 503 + Retry-After before its body is read",
    )

    # Security.
    api_key: SecretStr | None = Field(
        default=None, description="when set, /detect, /v1/* and /v2/models/* need it in api_key_header"
    )
    api_key_header: str = "X-API-Key"
    cors_origins: list[str] = Field(default_factory=list, description="CORS allowed origins; empty: CORS off")

    # Benchmark endpoint.
    enable_benchmark: bool = Field(
        default=False,
        description="allow POST /v1/benchmark (also allowed, key-protected, when api_key is set)",
    )
    benchmark_max_iterations: int = Field(default=500, ge=1, le=100_000)
    benchmark_max_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="a benchmark stops iterating when it has run this long (warm-up included) and reports the "
        "iterations it ran: it holds the engine at most this long plus the iteration under way",
    )
    benchmark_max_pixels: int = Field(
        default=4096 * 4096,
        ge=64,
        description="decoded pixels of one benchmark iteration (batch_size x width x height), reserved from "
        "MAX_PIXELS_IN_FLIGHT while it runs; a larger one is answered 422 (synthetic) or 413 (posted image)",
    )

    # Readiness.
    engine_stall_s: float = Field(
        default=30.0,
        gt=0,
        description="/readyz answers 503 (status stalled) while the engine has had work for this long without "
        "finishing any, or one engine call has run this long",
    )

    @field_validator("engine_decode", mode="before")
    @classmethod
    def _engine_decode_words(cls, value: object) -> object:
        """on/off also as true/false, 1/0, yes/no (any case)."""
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            word = value.strip().lower()
            return ON_OFF_WORDS.get(word, word)
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _empty_model_is_none(cls, value: object) -> object:
        return None if value in ("", None) else value

    def to_env(self) -> dict[str, str]:
        """The fields that differ from their defaults, as ``REFINEDET_*`` variables (for worker processes,
        which read the environment)."""

        def text(value: Any) -> str:
            if isinstance(value, SecretStr):
                return value.get_secret_value()
            if isinstance(value, bool):
                return str(value).lower()
            if isinstance(value, list):
                return json.dumps(value)
            return str(value)

        return {
            f"{ENV_PREFIX}{name.upper()}": text(getattr(self, name))
            for name in self.model_fields_set
            if getattr(self, name) is not None
        }

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0

    def serving_for(self, device: str) -> ServingKnobs:
        """How an engine on ``device`` ("cpu" | "cuda") is driven, from these settings (the one place that
        says it; ``deploy.prepare`` puts it into the plan):

        - ``max_batch``: ``max_batch_size``, else 8 on a GPU and 1 on a CPU (where a batch costs its images'
          time one after another; concurrent calls run instead);
        - ``slots``: engine calls at once: 1 on a GPU; ``cpu_streams``, else the engine threads, on a CPU;
        - ``threads``: intra-op threads on a CPU: ``cpu_threads``, else this worker's share of the usable
          cores (cores // workers, at least 1); None on a GPU;
        - ``decode``: who decodes uploads: ``handler`` with ``engine_decode`` off, else the engine (nvJPEG on
          a GPU, PIL in the engine slot on a CPU)."""
        from model.cpu import threads_per_worker

        cpu = device == "cpu"
        threads = (self.cpu_threads or threads_per_worker(self.workers)) if cpu else None
        return ServingKnobs(
            max_batch=self.max_batch_size or (1 if cpu else 8),
            slots=(self.cpu_streams or threads or 1) if cpu else 1,
            threads=threads,
            decode="handler" if self.engine_decode == "off" else ("pil" if cpu else "nvjpeg"),
        )

    def api_key_ok(self, presented: bytes | None) -> bool:
        """Whether ``presented`` (the ``api_key_header`` value) is the API key, compared in constant time; True
        when no key is set. The one check: the routes' dependency and admission both ask it."""
        if self.api_key is None:
            return True
        expected = self.api_key.get_secret_value().encode()
        return presented is not None and secrets.compare_digest(presented, expected)

    @property
    def benchmark_allowed(self) -> bool:
        return self.enable_benchmark or self.api_key is not None

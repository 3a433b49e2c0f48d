"""ONNX -> TensorRT 10 engine (``.plan``) + manifest, with the TensorRT 10 Python API.

Pipeline (``build_engine``): ``trt.Builder`` -> ``create_network(0)`` (explicit batch is the only
mode in TensorRT 10) -> ``OnnxParser.parse`` -> builder config (workspace pool limit, FP16 / INT8
flags, L2Norm and decode layers pinned to FP32, one optimization profile over the batch axis, an
INT8 entropy calibrator with its cache, a timing cache) -> ``build_serialized_network`` -> atomic
write of the plan and of ``<plan>.json`` recording GPU, compute capability, TensorRT version,
precision and profile (an engine only runs on that combination).

Everything above the ``build_engine`` line is pure Python and tested without TensorRT; the builder
itself has NEVER RUN: no machine this project was developed on had TensorRT (docs/export.md).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model.artifacts import (
    ArtifactError,
    Manifest,
    TensorRTBuild,
    atomic_write_bytes,
    read_manifest,
    write_manifest,
)
from model.checkpoint import file_sha256
from model.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MAX_BATCH = 16
# L2Norm (conv4_3_norm, conv5_3_norm): the sum of squares overflows fp16 (model/layers.py).
L2NORM_LAYER = re.compile(r"/conv\d+_\d+_norm/")
# The decode part of a "decoded" graph: top-level ONNX nodes ("/Exp", "/Softmax_1", ...).
DECODE_LAYER = re.compile(r"^/[A-Za-z]+(_\d+)?$")


@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile's batch sizes; kernels are tuned for ``opt``."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise UserError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}"
            )

    def shapes(self, input_size: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of the ``images`` input: (B, 3, S, S) each."""
        return tuple((b, 3, input_size, input_size) for b in (self.min, self.opt, self.max))  # type: ignore[return-value]


def resolve_profile(
    onnx_batch: int | None,
    min_batch: int | None = None,
    opt_batch: int | None = None,
    max_batch: int | None = None,
) -> BatchProfile:
    """The profile for an ONNX model with a fixed (``onnx_batch``) or dynamic (None) batch axis.

    Dynamic defaults: min 1, max 16, opt = max (serving batches fill up under load). A fixed-batch
    model admits only that batch.
    """
    if onnx_batch is not None:
        given = {b for b in (min_batch, opt_batch, max_batch) if b is not None}
        if given - {onnx_batch}:
            raise UserError(
                f"the ONNX model has a fixed batch of {onnx_batch}; re-export with --batch dynamic to build a "
                f"profile of {min_batch}/{opt_batch}/{max_batch}"
            )
        return BatchProfile(onnx_batch, onnx_batch, onnx_batch)
    hi = max_batch or max(DEFAULT_MAX_BATCH, min_batch or 1, opt_batch or 1)
    lo = min_batch or 1
    return BatchProfile(lo, opt_batch or hi, hi)


@dataclass(frozen=True)
class EngineOptions:
    precision: str = "fp32"
    profile: BatchProfile = BatchProfile(1, DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH)
    workspace_gib: float | None = None  # None: TensorRT's default (the device's memory)
    timing_cache: Path | None = None
    calibration_files: tuple[Path, ...] = ()
    calibration_cache: Path | None = None
    calibration_batch_size: int = 8
    calibration_max_batches: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            raise UserError(f"--workspace must be a positive number of GiB, got {self.workspace_gib}")
        has_cache = self.calibration_cache is not None and self.calibration_cache.is_file()
        if self.precision == "int8" and not self.calibration_files and not has_cache:
            raise UserError(
                "--precision int8 needs --calibration-images DIR (or an existing --calibration-cache)"
            )

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gib is None else int(self.workspace_gib * (1 << 30))


def fp32_layers(layer_names: Iterable[str], outputs: str = "raw") -> list[str]:
    """Layers to pin to FP32 in FP16/INT8 builds: L2Norm, plus the box decoding of a decoded graph."""
    names = list(layer_names)
    pinned = [n for n in names if L2NORM_LAYER.search(n)]
    if outputs == "decoded":
        pinned += [n for n in names if DECODE_LAYER.match(n)]
    return pinned


def check_tensorrt_version(version: str) -> None:
    major = version.split(".")[0]
    if major != "10":
        raise UserError(
            f"TensorRT {version} found; this builder targets the TensorRT 10 API (BuilderFlag.FP16/INT8, "
            "layer precision constraints and implicit INT8 calibration are removed in TensorRT 11): "
            "install tensorrt>=10,<11 or use an NVIDIA 24.xx/25.xx container"
        )


def engine_manifest(
    onnx: Manifest,
    plan_sha256: str,
    options: EngineOptions,
    gpu_name: str,
    capability: str,
    trt_version: str,
    calibration: str | None = None,
) -> Manifest:
    """The engine's manifest: the ONNX model's config and outputs plus the build environment."""
    p = options.profile
    build = TensorRTBuild(gpu_name, capability, trt_version, p.min, p.opt, p.max, calibration)
    return Manifest(
        kind="tensorrt",
        config=onnx.config,
        artifact_sha256=plan_sha256,
        precision=options.precision,  # type: ignore[arg-type]
        outputs=onnx.outputs,
        batch=onnx.batch,
        source_checkpoint_sha256=onnx.source_checkpoint_sha256,
        onnx_opset=onnx.onnx_opset,
        tensorrt=build,
        extra={"onnx_sha256": onnx.artifact_sha256},
    )


def read_onnx_manifest(onnx_path: str | Path) -> Manifest:
    path = Path(onnx_path)
    if path.suffix.lower() != ".onnx":
        raise UserError(
            f"--onnx must be an ONNX model (.onnx) exported by `refinedet export onnx`, got {path}"
        )
    manifest = read_manifest(path)
    if manifest.kind != "onnx":
        raise ArtifactError(f"{path} is described as a {manifest.kind} artifact, not an ONNX model")
    return manifest


# --- everything below needs TensorRT and a CUDA GPU -------------------------------------------------


def build_engine(onnx_path: str | Path, output: str | Path, options: EngineOptions) -> Manifest:
    """Build, write ``output`` and ``<output>.json`` atomically; returns the engine manifest."""
    import torch

    from model.runtime.tensorrt import current_gpu, import_tensorrt

    onnx = read_onnx_manifest(onnx_path)
    trt = import_tensorrt()
    check_tensorrt_version(trt.__version__)
    gpu_name, capability = current_gpu(torch.device("cuda", torch.cuda.current_device()))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    _set_precision(trt, network, config, options, onnx.outputs)
    profile = builder.create_optimization_profile()
    profile.set_shape(onnx.input_name, *options.profile.shapes(onnx.input_size))
    config.add_optimization_profile(profile)
    calibration = _set_calibrator(trt, builder, config, options, onnx)
    _load_timing_cache(config, options.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError("TensorRT failed to build the engine (see the TensorRT log above)")
    _save_timing_cache(config, options.timing_cache)
    output = atomic_write_bytes(output, bytes(serialized))
    manifest = engine_manifest(
        onnx, file_sha256(output), options, gpu_name, capability, trt.__version__, calibration
    )
    write_manifest(output, manifest)
    return manifest


def _set_precision(trt, network, config, options: EngineOptions, outputs: str) -> None:
    if options.precision == "fp32":
        return
    config.set_flag(trt.BuilderFlag.FP16)  # int8 builds also allow fp16 for layers int8 cannot run
    if options.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    layers = {network.get_layer(i).name: network.get_layer(i) for i in range(network.num_layers)}
    pinned = fp32_layers(layers, outputs)
    if not pinned and outputs == "raw":
        log.warning("no L2Norm layers found by name; fp16 may overflow in conv4_3_norm")
    for name in pinned:
        layer = layers[name]
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output_type(j) in (trt.float32, trt.float16):  # leave bool/int outputs alone
                layer.set_output_type(j, trt.float32)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    log.info("pinned %d layers to fp32", len(pinned))


def _set_calibrator(trt, builder, config, options: EngineOptions, onnx: Manifest) -> str | None:
    if options.precision != "int8":
        return None
    from conversion.calibration import calibration_batches, make_calibrator

    n = options.calibration_batch_size
    batches: Iterator[Tensor] = iter(())
    if options.calibration_files:
        batches = calibration_batches(
            options.calibration_files, onnx.config, n, options.calibration_max_batches
        )
    config.int8_calibrator = make_calibrator(trt, batches, n, options.calibration_cache)
    calib_profile = builder.create_optimization_profile()  # calibration runs at the kOPT shape
    shape = (n, 3, onnx.input_size, onnx.input_size)
    calib_profile.set_shape(onnx.input_name, shape, shape, shape)
    config.set_calibration_profile(calib_profile)
    return f"entropy2:{len(options.calibration_files)} images, batch {n}"


def _load_timing_cache(config, path: Path | None) -> None:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)


def _save_timing_cache(config, path: Path | None) -> None:
    if path is None:
        return
    atomic_write_bytes(path, bytes(config.get_timing_cache().serialize()))

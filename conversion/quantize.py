"""FP32 ONNX -> INT8 ONNX for ONNX Runtime on the CPU: static quantization in the QDQ format with
per-channel weights, calibrated on real images preprocessed exactly as in serving.

``quantize_onnx(fp32_path, output, options)`` runs ``onnxruntime.quantization.quantize_static`` with
a ``CalibrationDataReader`` over ``conversion.calibration.calibration_batches`` and writes the model
and its manifest (precision ``int8``; quantization settings and the calibration set in
``extra.int8``) atomically. The graph's input and outputs stay float32, so every runner and the
service load it like any ONNX model. ``export_int8`` goes from a checkpoint through a temporary FP32
export.

Choices, each measured on RefineDet320 VGG-16 / BCCD (docs/export.md, "INT8 on the CPU"):

- activations uint8, weights int8 per output channel (U8S8), the pairing ONNX Runtime's x86 kernels
  are built for, with ``reduce_range`` (7-bit weights): x86 CPUs without VNNI multiply uint8 x int8
  pairs into a saturating 16-bit sum, which full-range weights can overflow. The test CPU (AMD EPYC
  Zen 4) has AVX512-VNNI and no such overflow: there 8-bit weights were ~20% closer to FP32 in raw
  outputs and equal in mAP, so the portable 7-bit default costs nothing measurable.
- ``QUANTIZED_OP_TYPES``: the convolutions and what sits between them (ReLU is folded into the
  convolution's output range, max-pooling and the TCB sums run on uint8); L2Norm and the heads'
  reshapes and concatenations stay float32.
- ``FP32_NODES``: the prediction heads' convolutions (box offsets and logits come straight out of
  them) stay float32: raw outputs 10-16% closer to FP32 for ~6% more latency. mAP did not need it
  (all-INT8 scored 87.90, FP32 87.93): it is the conservative default, not a rescue.
- ``DEFAULT_METHOD``: entropy calibration was the closest to FP32 in raw outputs (mean abs diff ~20%
  below minmax; all three methods within 0.2 mAP of FP32); 64 images spread evenly over the split
  were as good as all 205 BCCD train images (which take 4x longer).
- ``quant_pre_process`` (shape inference + graph optimisation) runs first. Accuracy and speed were
  the same without it, but it folds the exporter's ``Identity`` nodes: the TCBs' ConvTranspose biases
  equal their lateral conv biases (the two only ever reach the network as a sum, so training keeps
  them equal), the exporter stores them once, and the quantizer warns about a non-initializer bias.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.artifacts import Manifest, atomic_write_bytes, read_manifest, write_manifest
from model.checkpoint import file_sha256
from model.config import RefineDetConfig
from model.errors import UserError

if TYPE_CHECKING:
    from conversion.progress import StageProgress

CALIBRATION_METHODS = ("entropy", "minmax", "percentile")
DEFAULT_METHOD = "entropy"
DEFAULT_CALIBRATION_IMAGES = 64
QUANTIZED_OP_TYPES = ("Conv", "ConvTranspose", "Relu", "MaxPool", "Add")
# Regular expressions on node names (the exporter names nodes after modules): the heads' convolutions.
FP32_NODES = (r"^/model/(arm|odm)_(loc|conf)/convs\.\d+/Conv$",)
NETWORK_SCOPE = "/model/"  # prefix of the network's nodes (``conversion.onnx_export`` wraps it as .model)
MAX_BATCHES_PER_PASS = 8  # calibration batches whose activations are held in memory at once


@dataclass(frozen=True)
class QuantizeOptions:
    """``files``: calibration images; ``source``: how they were chosen, recorded in the manifest."""

    files: tuple[Path, ...]
    source: str
    method: str = DEFAULT_METHOD
    fp32_nodes: tuple[str, ...] = FP32_NODES
    op_types: tuple[str, ...] = QUANTIZED_OP_TYPES
    reduce_range: bool = True

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise UserError(
                f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.method!r}"
            )
        if not self.files:
            raise UserError("INT8 calibration needs at least one image")


class ImageReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over preprocessed image batches.

    ``set_range(start, end)`` restricts it to batches ``start:end``, so that ``quantize_static``
    collects activations in passes of a few batches (``CalibStridedMinMax``, honoured by every
    calibration method) instead of holding all of them at once. ``progress`` hears of every image read and
    of the end of the calibration.
    """

    def __init__(
        self,
        files: Sequence[Path],
        config: RefineDetConfig,
        batch_size: int,
        input_name: str,
        progress: StageProgress | None = None,
    ):
        self.files, self.config, self.batch_size, self.input_name = files, config, batch_size, input_name
        self.progress, self.read = progress, 0
        self._batches: Iterator[Any] = iter(())
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return len(self.files) // self.batch_size

    def set_range(self, start_index: int, end_index: int) -> None:
        from conversion.calibration import calibration_batches

        chunk = self.files[start_index * self.batch_size : end_index * self.batch_size]
        self._batches = calibration_batches(chunk, self.config, self.batch_size)

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self._batches, None)
        if self.progress is None:
            pass
        elif batch is not None:
            self.read += batch.shape[0]
            self.progress.images(batch.shape[0])
        elif self.read == len(self) * self.batch_size:  # the last pass is over: ORT now picks the ranges
            self.read = -1
            self.progress.stage("choosing the activation ranges and quantizing")
        return None if batch is None else {self.input_name: batch.numpy()}


def fp32_node_names(model: Any, patterns: Sequence[str], op_types: Sequence[str]) -> list[str]:
    """Names of the ``op_types`` nodes of ``model`` (ModelProto) that stay float32: those matching any
    pattern (a pattern that matches nothing is an error: a renamed layer must not silently become
    INT8) and every one outside the network (the decoding of an ``--outputs decoded`` graph)."""
    candidates = [n.name for n in model.graph.node if n.op_type in op_types]
    names = [name for name in candidates if not name.startswith(NETWORK_SCOPE)]
    for pattern in patterns:
        hits = [name for name in candidates if re.search(pattern, name)]
        if not hits:
            raise UserError(f"no quantizable node of the graph matches the FP32 pattern {pattern!r}")
        names += [h for h in hits if h not in names]
    return names


def batches_per_pass(batches: int) -> int:
    """The largest divisor of ``batches`` up to ``MAX_BATCHES_PER_PASS`` (``quantize_static`` needs
    the number of batches to be a multiple of the pass size)."""
    return max(d for d in range(1, min(batches, MAX_BATCHES_PER_PASS) + 1) if batches % d == 0)


def quantize_onnx(
    fp32_path: str | Path, output: str | Path, options: QuantizeOptions, progress: StageProgress | None = None
) -> Manifest:
    """Quantize the FP32 ONNX model at ``fp32_path`` (with its manifest) to ``output`` + manifest.

    A dynamic-batch model is calibrated one image at a time, a fixed-batch one in its batch (the last
    partial batch is left out)."""
    import onnx

    fp32 = read_manifest(fp32_path)
    if fp32.kind != "onnx" or fp32.precision != "fp32":
        raise UserError(f"{fp32_path} is not an FP32 ONNX model ({fp32.kind}, {fp32.precision})")
    reader = ImageReader(options.files, fp32.config, fp32.batch or 1, fp32.input_name, progress)
    if len(reader) == 0:
        raise UserError(
            f"{fp32_path} has a fixed batch of {fp32.batch}: calibrate with at least that many images"
        )
    with tempfile.TemporaryDirectory(prefix="refinedet-int8-") as tmp:
        quantized, fp32_nodes = run_quantize_static(Path(fp32_path), Path(tmp), reader, options)
        if progress is not None:
            progress.stage("checking the INT8 model")
        data = finish_int8(quantized, onnx.load(str(fp32_path)))
    path = atomic_write_bytes(output, data)
    used = options.files[: len(reader) * reader.batch_size]
    record = int8_record(options, fp32_nodes, used, fp32.artifact_sha256)
    manifest = replace(
        fp32, artifact_sha256=file_sha256(path), precision="int8", extra={**fp32.extra, "int8": record}
    )
    write_manifest(path, manifest)
    return manifest


def run_quantize_static(
    fp32_path: Path,
    tmp: Path,
    reader: ImageReader | None,
    options: QuantizeOptions,
    calibration_cache: Path | None = None,
) -> tuple[Any, list[str]]:
    """``quant_pre_process`` then ``quantize_static`` in ``tmp``: (quantized ModelProto, FP32 nodes).

    ``calibration_cache``: ONNX Runtime's JSON of activation ranges (``quantize_static``'s
    ``calibration_cache_path``): written after calibrating on ``reader``, or, with ``reader`` None,
    read instead of calibrating (``conversion.calibration_table``)."""
    import onnx

    progress = reader.progress if reader is not None else None
    if progress is not None:
        progress.stage("preparing the graph for quantization")
    prepared = prepare_for_quantization(fp32_path, tmp)
    fp32_nodes = fp32_node_names(onnx.load(str(prepared)), options.fp32_nodes, options.op_types)
    if reader is not None and progress is not None:
        progress.stage(f"calibrating ({options.method}) on {len(reader) * reader.batch_size} images")
    quantized = quantize_prepared(prepared, tmp / "int8.onnx", reader, options, fp32_nodes, calibration_cache)
    return onnx.load(str(quantized)), fp32_nodes


def prepare_for_quantization(fp32_path: Path, tmp: Path) -> Path:
    """``quant_pre_process`` (shape inference, graph optimisation) of ``fp32_path`` into ``tmp``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = tmp / "prepared.onnx"
    quant_pre_process(str(fp32_path), str(prepared))
    return prepared


def quantize_prepared(
    prepared: Path,
    quantized: Path,
    reader: ImageReader | None,
    options: QuantizeOptions,
    fp32_nodes: list[str],
    calibration_cache: Path | None = None,
) -> Path:
    """``quantize_static`` with the project's settings (QDQ, per-channel, U8S8) -> ``quantized``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    extra: dict[str, Any] = {}
    if reader is not None:
        extra["extra_options"] = {"CalibStridedMinMax": batches_per_pass(len(reader))}
    if calibration_cache is not None:
        extra["calibration_cache_path"] = str(calibration_cache)
    with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress lines
        quantize_static(
            str(prepared),
            str(quantized),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(options.op_types),
            per_channel=True,
            reduce_range=options.reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=fp32_nodes,
            calibrate_method=calibration_method(options.method),
            **extra,
        )
    return quantized


def calibration_method(name: str) -> Any:
    """ONNX Runtime's ``CalibrationMethod`` for ``entropy`` / ``minmax`` / ``percentile``."""
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]  # fmt: skip


def int8_record(
    options: QuantizeOptions, fp32_nodes: list[str], used: Sequence[Path], fp32_sha256: str
) -> dict[str, Any]:
    """The manifest's ``extra.int8``: how the model was quantized and on which images."""
    import onnxruntime

    return {
        "format": "qdq",
        "per_channel": True,
        "activations": "uint8",
        "weights": "int8",
        "reduce_range": options.reduce_range,
        "quantized_op_types": list(options.op_types),
        "fp32_nodes": fp32_nodes,
        "calibration": {
            "method": options.method,
            "source": options.source,
            "images": len(used),
            "files": [f.name for f in used],
        },
        "onnxruntime_version": onnxruntime.__version__,
        "fp32_onnx_sha256": fp32_sha256,
    }


def finish_int8(model: Any, fp32_model: Any) -> bytes:
    """The FP32 model's ``metadata_props`` (+ ``precision``) on the quantized graph; checked; bytes."""
    import onnx

    del model.metadata_props[:]
    for prop in fp32_model.metadata_props:
        model.metadata_props.add(key=prop.key, value=prop.value)
    model.metadata_props.add(key="precision", value="int8")
    model.producer_name = "refinedet"
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def export_int8(
    checkpoint: str | Path,
    output: str | Path,
    options: QuantizeOptions,
    progress: StageProgress | None = None,
    **export: Any,
) -> Manifest:
    """Checkpoint -> FP32 ONNX in a temporary folder (``export`` as for ``export_checkpoint``) -> INT8."""
    from conversion.onnx_export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="refinedet-fp32-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        if progress is not None:
            progress.stage("exporting the FP32 ONNX model")
        export_checkpoint(checkpoint, fp32, **export)
        return quantize_onnx(fp32, output, options, progress)

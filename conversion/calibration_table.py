"""INT8 without a data set at start-up: the activation ranges, computed once, stored beside the checkpoint.

A container has the shipped checkpoint but no BCCD, and static INT8 needs each activation's range
(what ``quantize_static`` calibrates on images). Calibration's only output that matters is that
table: the QDQ quantizer reads each tensor's (lowest, highest) and nothing else from it. So the
ranges are computed once, from the BCCD ``train`` split with the documented defaults (entropy, 64
images), and shipped as a small JSON table (``<checkpoint>.int8-ranges.json``, ~10 KB, no image data)::

    refinedet export int8-ranges --checkpoint model/checkpoints/refinedet320_vgg16_bccd.pth.xz \\
        --calibration-images /work/shared/data/BCCD --calibration-split train

At first start ``quantize_with_table`` exports the FP32 graph and quantizes it from the table, with
the settings recorded in it, in seconds: the same INT8 model as calibrating there and then (tested).
The table is tied to its checkpoint (sha256) and to the exporter's tensor names: a table whose names
do not cover the graph's quantized tensors (another exporter version renamed them) is refused with
the reason, and the caller falls back to FP32 (``conversion.cpu_engine``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from model.artifacts import Manifest, atomic_write_bytes, read_manifest, write_manifest
from model.checkpoint import file_sha256
from model.errors import UserError

TABLE_FORMAT = "refinedet-int8-ranges"
TABLE_VERSION = 1
TABLE_SUFFIX = ".int8-ranges.json"


def table_path_for(checkpoint: Path) -> Path:
    """Where a checkpoint's table lives: beside it, ``<name>.int8-ranges.json`` (``x.pth.xz`` -> ``x``)."""
    name = checkpoint.name
    for suffix in (".xz", ".pth", ".pt"):
        name = name.removesuffix(suffix)
    return checkpoint.with_name(name + TABLE_SUFFIX)


def has_cache_path_api() -> bool:
    """Whether this onnxruntime's ``quantize_static`` can read ranges instead of calibrating."""
    import inspect

    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def build_table(checkpoint: Path, output: Path, options: Any, progress: Any = None) -> dict[str, Any]:
    """Calibrate ``checkpoint``'s FP32 export on ``options.files`` (``QuantizeOptions``) and write the
    table to ``output`` (atomically). Returns the table. ``progress``: a ``conversion.progress.StageProgress``."""
    import onnxruntime
    import torch

    from conversion.onnx_export import export_checkpoint
    from conversion.quantize import ImageReader, run_quantize_static

    if not has_cache_path_api():
        raise UserError(f"onnxruntime {onnxruntime.__version__} cannot export calibration ranges; upgrade it")
    with tempfile.TemporaryDirectory(prefix="refinedet-ranges-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        if progress is not None:
            progress.stage("exporting the FP32 ONNX model")
        manifest = export_checkpoint(checkpoint, fp32)
        reader = ImageReader(options.files, manifest.config, 1, manifest.input_name, progress)
        cache = Path(tmp) / "ort-ranges.json"
        _, fp32_nodes = run_quantize_static(fp32, Path(tmp), reader, options, calibration_cache=cache)
        ranges = read_ort_ranges(cache)
    table = {
        "format": TABLE_FORMAT,
        "format_version": TABLE_VERSION,
        "checkpoint_sha256": file_sha256(checkpoint),
        "quantize": {
            "method": options.method,
            "reduce_range": options.reduce_range,
            "op_types": list(options.op_types),
            "fp32_nodes": list(options.fp32_nodes),
        },
        "calibration": {
            "source": options.source,
            "images": len(options.files),
            "files": [f.name for f in options.files],
        },
        "made_with": {
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "fp32_nodes_resolved": fp32_nodes,
        "ranges": ranges,
    }
    atomic_write_bytes(output, (json.dumps(table, indent=1) + "\n").encode())
    return table


def read_ort_ranges(cache: Path) -> dict[str, list[float]]:
    """{tensor name: [lowest, highest]} from an ONNX Runtime calibration cache."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    data = load_tensors_data(cache)
    return {name: [float(td.range_value[0]), float(td.range_value[1])] for name, td in data.items()}


def write_ort_ranges(ranges: dict[str, list[float]], method: str, path: Path) -> None:
    """The table's ranges as ONNX Runtime's calibration cache (what ``calibration_cache_path`` reads)."""
    import numpy as np
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    from conversion.quantize import calibration_method

    data = {
        name: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
        for name, (lo, hi) in ranges.items()
    }
    save_tensors_data(TensorsData(calibration_method(method), data), path)


def read_table(path: Path, checkpoint_sha256: str | None = None) -> dict[str, Any]:
    """Load and check a table (format, and the checkpoint it was made for when a hash is given)."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the INT8 ranges table {path}: {exc}") from None
    if table.get("format") != TABLE_FORMAT or table.get("format_version") != TABLE_VERSION:
        raise UserError(f"{path} is not a {TABLE_FORMAT} v{TABLE_VERSION} table")
    if checkpoint_sha256 is not None and table.get("checkpoint_sha256") != checkpoint_sha256:
        raise UserError(
            f"{path} was computed for another checkpoint (sha256 {table.get('checkpoint_sha256')})"
        )
    return table


def missing_ranges(
    prepared_model: Any, ranges: dict[str, Any], op_types: list[str], fp32_nodes: list[str]
) -> list[str]:
    """Activation tensors the quantizer will quantize (inputs and outputs of the ``op_types`` nodes not
    kept in FP32, initializers aside) that the table has no range for."""
    initializers = {i.name for i in prepared_model.graph.initializer}
    needed: list[str] = []
    for node in prepared_model.graph.node:
        if node.op_type in op_types and node.name not in fp32_nodes:
            needed += [t for t in (*node.input, *node.output) if t and t not in initializers]
    return sorted({t for t in needed if t not in ranges})


def quantize_with_table(fp32_path: Path, output: Path, table_path: Path) -> Manifest:
    """The INT8 model of the FP32 ONNX model at ``fp32_path`` from the table's ranges (no images):
    ``output`` + manifest, written atomically. Raises UserError when the table does not fit the graph."""
    import onnx

    from conversion.quantize import (
        QuantizeOptions,
        finish_int8,
        fp32_node_names,
        prepare_for_quantization,
        quantize_prepared,
    )

    fp32 = read_manifest(fp32_path)
    if fp32.kind != "onnx" or fp32.precision != "fp32":
        raise UserError(f"{fp32_path} is not an FP32 ONNX model ({fp32.kind}, {fp32.precision})")
    table = read_table(table_path, fp32.source_checkpoint_sha256)
    if not has_cache_path_api():
        import onnxruntime

        raise UserError(f"onnxruntime {onnxruntime.__version__} cannot quantize from stored ranges")
    q = table["quantize"]
    options = QuantizeOptions(files=(Path(table_path),), source=f"ranges table {Path(table_path).name}",
                              method=q["method"], fp32_nodes=tuple(q["fp32_nodes"]),
                              op_types=tuple(q["op_types"]), reduce_range=q["reduce_range"])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="refinedet-int8-") as tmp:
        prepared = prepare_for_quantization(Path(fp32_path), Path(tmp))
        model = onnx.load(str(prepared))
        fp32_nodes = fp32_node_names(model, options.fp32_nodes, options.op_types)
        missing = missing_ranges(model, table["ranges"], list(options.op_types), fp32_nodes)
        if missing:
            raise UserError(
                f"the INT8 ranges table {table_path} has no range for {len(missing)} tensors of this export "
                f"(e.g. {missing[0]!r}; made with torch {table['made_with']['torch']}): rebuild it with "
                "`refinedet export int8-ranges`"
            )
        cache = Path(tmp) / "ort-ranges.json"
        write_ort_ranges(table["ranges"], options.method, cache)
        quantized = quantize_prepared(prepared, Path(tmp) / "int8.onnx", None, options, fp32_nodes, cache)
        data = finish_int8(onnx.load(str(quantized)), onnx.load(str(fp32_path)))
    path = atomic_write_bytes(output, data)
    record = {
        "format": "qdq", "per_channel": True, "activations": "uint8", "weights": "int8",
        "reduce_range": options.reduce_range, "quantized_op_types": list(options.op_types),
        "fp32_nodes": fp32_nodes,
        "calibration": {**table["calibration"], "method": options.method,
                        "ranges_table": Path(table_path).name, "ranges_table_sha256": file_sha256(table_path)},
        "onnxruntime_version": _ort_version(), "fp32_onnx_sha256": fp32.artifact_sha256,
    }  # fmt: skip
    manifest = replace(
        fp32, artifact_sha256=file_sha256(path), precision="int8", extra={**fp32.extra, "int8": record}
    )
    write_manifest(path, manifest)
    return manifest


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)

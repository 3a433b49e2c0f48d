"""A Triton Inference Server model repository from an exported ONNX model (and optionally its engine).

Layout::

    REPO/<name>/config.pbtxt
    REPO/<name>/1/model.onnx       (platform onnxruntime_onnx)   or   1/model.plan (tensorrt_plan)
    REPO/<name>/1/model.onnx.json  the artifact manifest (classes, normalisation, post-processing)

The inputs and outputs in config.pbtxt are read from the ONNX graph itself (names, element types,
shapes without the batch axis), so the config cannot drift from the model. With ``--plan`` the engine
is served and the ONNX model it was built from describes the interface (the plan's manifest must name
that ONNX file's hash). Triton only runs the network: preprocessing (``model.preprocess``) and the
selection / NMS (``model.postprocess``) stay with the client, as the manifest describes.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from model.artifacts import ArtifactError, Manifest, manifest_path, read_manifest
from model.errors import UserError

# onnx.TensorProto element types -> Triton data types.
ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    10: "TYPE_FP16",
    16: "TYPE_BF16",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton TYPE_*
    dims: tuple[int, ...]  # without the batch axis


def graph_io(onnx_path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) declared by the ONNX graph; the first axis must be a dynamic batch axis."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        dims = list(t.shape.dim)
        if not dims or not dims[0].dim_param:
            raise UserError(
                f"{onnx_path}: '{value.name}' has no dynamic batch axis; Triton's dynamic batching needs one: "
                "re-export with `refinedet export onnx --batch dynamic`"
            )
        if any(d.dim_param for d in dims[1:]):
            raise UserError(f"{onnx_path}: '{value.name}' has dynamic non-batch axes {dims}")
        if t.elem_type not in ONNX_TO_TRITON:
            raise UserError(
                f"{onnx_path}: '{value.name}' has ONNX element type {t.elem_type}, unsupported here"
            )
        return TensorSpec(value.name, ONNX_TO_TRITON[t.elem_type], tuple(d.dim_value for d in dims[1:]))

    inputs = [spec(v) for v in graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in graph.output]


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _tensor_block(kind: str, specs: list[TensorSpec]) -> list[str]:
    lines = [f"{kind} ["]
    for i, s in enumerate(specs):
        lines += [
            "  {",
            f'    name: "{s.name}"',
            f"    data_type: {s.data_type}",
            f"    dims: {_dims(s.dims)}",
        ]
        lines.append("  }," if i < len(specs) - 1 else "  }")
    return [*lines, "]"]


def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two up to ``max_batch`` from 4 (batches of 1-2 need no preference), plus max_batch."""
    sizes = [b for b in (4, 8, 16, 32, 64, 128) if b < max_batch]
    return [*sizes, max_batch]


def config_pbtxt(
    name: str,
    platform: str,
    max_batch: int,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_queue_delay_us: int = 2000,
    instance_kind: str | None = None,
    instances: int = 1,
) -> str:
    """The protobuf text of a Triton ModelConfig with dynamic batching."""
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}"]
    lines += _tensor_block("input", inputs) + _tensor_block("output", outputs)
    lines += [
        "dynamic_batching {",
        f"  preferred_batch_size: {_dims(tuple(preferred_batch_sizes(max_batch)))}",
        f"  max_queue_delay_microseconds: {max_queue_delay_us}",
        "}",
    ]
    if instance_kind:
        lines += [
            "instance_group [",
            "  {",
            f"    count: {instances}",
            f"    kind: KIND_{instance_kind.upper()}",
            "  }",
            "]",
        ]
    return "\n".join(lines) + "\n"


def _engine_for(plan: Path, onnx: Manifest) -> Manifest:
    engine = read_manifest(plan)
    if engine.kind != "tensorrt" or engine.tensorrt is None:
        raise ArtifactError(f"{plan} is not a TensorRT engine")
    if engine.extra.get("onnx_sha256") != onnx.artifact_sha256:
        raise ArtifactError(
            f"{plan} was not built from this ONNX model (its manifest names another ONNX hash)"
        )
    if engine.tensorrt.min_batch != 1:
        raise ArtifactError(
            f"{plan}'s profile starts at batch {engine.tensorrt.min_batch}; Triton sends batches from 1"
        )
    return engine


def export_triton(
    onnx_path: str | Path,
    repo: str | Path,
    plan_path: str | Path | None = None,
    name: str = "refinedet",
    max_batch: int | None = None,
    max_queue_delay_us: int = 2000,
    instance_kind: str | None = None,
) -> Path:
    """Write ``repo/name`` (replacing an existing one only once the new one is complete); returns it."""
    onnx_path = Path(onnx_path)
    onnx = read_manifest(onnx_path)
    if onnx.kind != "onnx":
        raise ArtifactError(f"{onnx_path} is not an ONNX model")
    inputs, outputs = graph_io(onnx_path)
    artifact, platform, limit = onnx_path, "onnxruntime_onnx", None
    if plan_path is not None:
        engine = _engine_for(Path(plan_path), onnx)
        artifact, platform, limit = Path(plan_path), "tensorrt_plan", engine.tensorrt.max_batch  # type: ignore[union-attr]
    batch = max_batch or limit or 16
    if batch < 1 or (limit is not None and batch > limit):
        raise UserError(
            f"--max-batch must be between 1 and the engine's profile maximum {limit}, got {batch}"
        )
    text = config_pbtxt(name, platform, batch, inputs, outputs, max_queue_delay_us, instance_kind)
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    try:
        (staging / "config.pbtxt").write_text(text)
        version = staging / "1"
        version.mkdir()
        target = version / ("model.plan" if platform == "tensorrt_plan" else "model.onnx")
        shutil.copyfile(artifact, target)
        shutil.copyfile(manifest_path(artifact), manifest_path(target))
        final = repo / name
        if final.exists():
            old = repo / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            staging.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final

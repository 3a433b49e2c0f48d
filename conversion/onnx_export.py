"""Checkpoint -> ONNX (+ manifest), with the TorchScript-based exporter (``dynamo=False``).

The graph takes ``images`` Tensor[B, 3, S, S] float32, already resized and normalised per the
config (``model.preprocess``: preprocessing stays outside the graph so every runtime shares one
image contract). It returns either the network's four raw head tensors (``outputs="raw"``, the
default) or, with ``outputs="decoded"``, ``boxes_xyxy`` [B, A, 4] and ``scores`` [B, A, C-1] from
``model.postprocess.decode_predictions`` run inside the graph, so a runtime only needs the per-class
selection and NMS. The batch axis is dynamic unless a fixed batch is asked for.

The ``.onnx`` file and its manifest (``model.onnx.json``) are written atomically; the config, class
names, input size, normalisation and source checkpoint hash are also stored in the ONNX file's
``metadata_props``.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from model.artifacts import (
    DECODED_OUTPUT_NAMES,
    INPUT_NAME,
    Manifest,
    OutputKind,
    atomic_write_bytes,
    write_manifest,
)
from model.checkpoint import file_sha256, load_model
from model.errors import UserError
from model.network import OUTPUT_NAMES, RefineDet, RefineDetOutput
from model.postprocess import decode_predictions

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # ONNX Runtime >= 1.14 and TensorRT 10 support it fully
MIN_OPSET, MAX_OPSET = 11, 20  # 20: the TorchScript exporter's ceiling in torch 2.x


class RawGraph(nn.Module):
    """The exported function for ``outputs="raw"``: images -> (arm_loc, arm_conf, odm_loc, odm_conf)."""

    def __init__(self, model: RefineDet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tuple(self.model(images))  # type: ignore[return-value]


class DecodedGraph(nn.Module):
    """``outputs="decoded"``: images -> (boxes_xyxy [B, A, 4], scores [B, A, C-1]); anchors are constants."""

    def __init__(self, model: RefineDet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out: RefineDetOutput = self.model(images)
        anchors: Tensor = self.model.anchors  # type: ignore[assignment]
        return decode_predictions(
            out.arm_loc, out.arm_conf, out.odm_loc, out.odm_conf, anchors, self.model.config
        )


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(
            f"--opset must be between {MIN_OPSET} and {MAX_OPSET} (the TorchScript exporter's range), got {opset}"
        )
    return opset


def check_onnx_path(path: Path) -> Path:
    """The output of ``export onnx`` is named ``*.onnx``: serving, ``eval --artifact`` and ``verify`` tell
    an ONNX model from an engine by that suffix."""
    if path.suffix.lower() != ".onnx":
        raise UserError(
            f"-o {path}: an ONNX model's file name ends in .onnx (e.g. {path.with_suffix('.onnx')})"
        )
    return path


def parse_batch(value: str) -> int | None:
    """``"dynamic"`` -> None; ``"K"`` -> K (a fixed batch, K >= 1)."""
    if value == "dynamic":
        return None
    try:
        batch = int(value)
    except ValueError:
        raise UserError(f"--batch must be 'dynamic' or a positive integer, got {value!r}") from None
    if batch < 1:
        raise UserError(f"--batch must be 'dynamic' or a positive integer, got {value!r}")
    return batch


def onnx_bytes(
    model: RefineDet, opset: int, batch: int | None, outputs: OutputKind
) -> tuple[bytes, list[str]]:
    """Trace and export ``model`` (eval, CPU, float32). Returns (serialized ModelProto, tracer warnings)."""
    graph = (RawGraph if outputs == "raw" else DecodedGraph)(model.eval().float().cpu())
    size = model.config.input_size
    # Trace with batch 2 when dynamic so nothing specialises on a batch of 1.
    dummy = torch.zeros(batch or 2, 3, size, size)
    output_names = list(OUTPUT_NAMES if outputs == "raw" else DECODED_OUTPUT_NAMES)
    dynamic_axes = None if batch else {n: {0: "batch"} for n in [INPUT_NAME, *output_names]}
    buffer = io.BytesIO()  # the TorchScript exporter accepts a file object
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.onnx.export(
            graph,
            (dummy,),
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            opset_version=check_opset(opset),
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    tracer = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    for message in tracer:  # none are expected (docs/export.md); surface any that appear
        log.warning("tracer warning during export: %s", message)
    for w in caught:  # the exporter's own deprecation notices are expected (dynamo=False is deliberate)
        if not issubclass(w.category, (torch.jit.TracerWarning, DeprecationWarning)):
            log.warning("warning during export: %s", w.message)
    return buffer.getvalue(), tracer


def finish_model(data: bytes, model: RefineDet, source_sha256: str | None, simplify: bool) -> bytes:
    """Optionally simplify with onnxslim, attach metadata_props, run onnx.checker; returns bytes."""
    import onnx

    proto = onnx.load_from_string(data)
    if simplify:
        try:
            import onnxslim
        except ImportError:
            raise UserError("--simplify needs onnxslim: pip install 'refinedet[export]'") from None
        proto = onnxslim.slim(proto)
    config = model.config
    metadata = {
        "refinedet_config": json.dumps(config.to_dict()),
        "class_names": json.dumps(list(config.class_names)),
        "input_size": str(config.input_size),
        "normalization": json.dumps(asdict(config.normalization)),
        "source_checkpoint_sha256": source_sha256 or "",
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "refinedet"
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def export_model(
    model: RefineDet,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    outputs: OutputKind = "raw",
    simplify: bool = False,
    source_sha256: str | None = None,
) -> Manifest:
    """Export ``model`` to ``path`` and write ``<path>.json``; returns the manifest."""
    data, tracer = onnx_bytes(model, opset, batch, outputs)
    data = finish_model(data, model, source_sha256, simplify)
    path = atomic_write_bytes(path, data)
    manifest = Manifest(
        kind="onnx",
        config=model.config,
        artifact_sha256=file_sha256(path),
        precision="fp32",
        outputs=outputs,
        batch=batch,
        source_checkpoint_sha256=source_sha256,
        onnx_opset=opset,
        extra={"simplified": simplify, "tracer_warnings": tracer, "torch_version": torch.__version__},
    )
    write_manifest(path, manifest)
    return manifest


def export_checkpoint(checkpoint: str | Path, path: str | Path, **options) -> Manifest:
    """Load a RefineDet checkpoint (clear CheckpointError if it is not one) and export it."""
    model, _ = load_model(checkpoint, map_location="cpu")
    return export_model(model, path, source_sha256=file_sha256(checkpoint), **options)

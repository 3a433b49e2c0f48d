"""Manifests: the JSON file beside every deployable artifact (``model.onnx`` -> ``model.onnx.json``).

Export (``conversion``) writes them; serving (``service``) and verification read them, so an ONNX file
or a TensorRT engine can be run from the file alone: the manifest carries the full model config
(class names, input size, normalisation, anchors, thresholds), the graph's input/output contract,
the precision, the hashes that tie it to its checkpoint and to the artifact itself and, for engines,
the build environment an engine is bound to (GPU, compute capability, TensorRT version, batch profile).

Schema (``format_version`` 1)::

    {"format": "refinedet-artifact", "format_version": 1, "kind": "onnx" | "tensorrt",
     "precision": "fp32" | "fp16" | "int8", "outputs": "raw" | "decoded",
     "input_name": "images", "output_names": [...], "batch": null (dynamic) | K,
     "config": RefineDetConfig.to_dict(), "class_names": [...], "input_size": S,
     "normalization": {...}, "source_checkpoint_sha256": hex | null, "artifact_sha256": hex,
     "onnx_opset": N | null, "tensorrt": null | {"gpu_name", "compute_capability",
     "tensorrt_version", "min_batch", "opt_batch", "max_batch", "int8_calibration"},
     "created": ISO-8601 UTC, "extra": {...}}

``outputs == "raw"``: the graph returns the network's four head tensors (``OUTPUT_NAMES``).
``outputs == "decoded"``: it returns ``boxes_xyxy`` [B, A, 4] and ``scores`` [B, A, C-1], i.e.
``model.postprocess.decode_predictions`` is inside the graph and only ``select_detections`` remains.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

from model.checkpoint import XZ_MAGIC, atomic_write, file_sha256
from model.config import RefineDetConfig
from model.errors import UserError
from model.network import OUTPUT_NAMES

FORMAT = "refinedet-artifact"
FORMAT_VERSION = 1
INPUT_NAME = "images"
DECODED_OUTPUT_NAMES = ("boxes_xyxy", "scores")
KINDS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
OUTPUT_KINDS = ("raw", "decoded")

ArtifactKind = Literal["onnx", "tensorrt"]
FileKind = Literal["checkpoint", "onnx", "tensorrt"]

# The one table of model file types, used by `refinedet serve`, the container, `eval`, `verify` and every
# other command that takes "a model": suffix (lower case, compound first) -> kind.
FILE_SUFFIXES: dict[str, FileKind] = {
    ".pth.xz": "checkpoint", ".pt.xz": "checkpoint", ".pth": "checkpoint", ".pt": "checkpoint",
    ".ckpt": "checkpoint", ".pth.tar": "checkpoint",
    ".onnx": "onnx",
    ".plan": "tensorrt", ".engine": "tensorrt", ".trt": "tensorrt",
}  # fmt: skip
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
Precision = Literal["fp32", "fp16", "int8"]
OutputKind = Literal["raw", "decoded"]


class ArtifactError(UserError, ValueError):
    """A missing, unreadable or inconsistent artifact / manifest, or an engine built for other hardware."""


@dataclass(frozen=True)
class TensorRTBuild:
    """The environment an engine was built in; a serialized engine only runs on the same combination
    of compute capability and TensorRT version (and is tuned for that GPU model)."""

    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "9.0"
    tensorrt_version: str
    min_batch: int
    opt_batch: int
    max_batch: int
    int8_calibration: str | None = None  # "entropy2:<cache sha256>" for an INT8 build, else None

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ArtifactError(
                f"engine batch profile must satisfy 1 <= min <= opt <= max, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )


@dataclass(frozen=True)
class Manifest:
    """Everything a runtime needs besides the artifact bytes. ``batch`` None means a dynamic batch axis."""

    kind: ArtifactKind
    config: RefineDetConfig
    artifact_sha256: str
    precision: Precision = "fp32"
    outputs: OutputKind = "raw"
    batch: int | None = None
    source_checkpoint_sha256: str | None = None
    onnx_opset: int | None = None
    tensorrt: TensorRTBuild | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("kind", self.kind, KINDS),
            ("precision", self.precision, PRECISIONS),
            ("outputs", self.outputs, OUTPUT_KINDS),
        ):
            if value not in allowed:
                raise ArtifactError(f"manifest {name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.kind == "tensorrt" and self.tensorrt is None:
            raise ArtifactError("a tensorrt manifest must record its build environment ('tensorrt')")
        if self.batch is not None and self.batch < 1:
            raise ArtifactError(f"manifest batch must be >= 1 or null (dynamic), got {self.batch}")

    @property
    def input_name(self) -> str:
        return INPUT_NAME

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES if self.outputs == "raw" else DECODED_OUTPUT_NAMES

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    @property
    def input_size(self) -> int:
        return self.config.input_size

    @property
    def max_batch(self) -> int | None:
        """The largest batch the artifact accepts (None: unbounded)."""
        if self.tensorrt is not None:
            return self.tensorrt.max_batch
        return self.batch

    def output_shapes(self, batch: int | str = "batch") -> dict[str, tuple[int | str, ...]]:
        """Declared shape of every output, e.g. {"arm_loc": (B, A, 4), ...}."""
        a, c = self.config.num_anchors, self.config.num_classes
        if self.outputs == "raw":
            return {
                "arm_loc": (batch, a, 4),
                "arm_conf": (batch, a, 2),
                "odm_loc": (batch, a, 4),
                "odm_conf": (batch, a, c),
            }
        return {"boxes_xyxy": (batch, a, 4), "scores": (batch, a, c - 1)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "kind": self.kind,
            "precision": self.precision,
            "outputs": self.outputs,
            "input_name": self.input_name,
            "output_names": list(self.output_names),
            "batch": self.batch,
            "config": self.config.to_dict(),
            # Duplicated from config for readers that are not this package (Triton clients, humans).
            "class_names": list(self.class_names),
            "input_size": self.input_size,
            "normalization": dataclasses.asdict(self.config.normalization),
            "source_checkpoint_sha256": self.source_checkpoint_sha256,
            "artifact_sha256": self.artifact_sha256,
            "onnx_opset": self.onnx_opset,
            "tensorrt": dataclasses.asdict(self.tensorrt) if self.tensorrt else None,
            "created": self.created,
            "extra": self.extra,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Manifest:
        """Parse and validate; raises ArtifactError naming what is wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArtifactError(f"not a RefineDet artifact manifest (no '{FORMAT}' format marker)")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ArtifactError(
                f"manifest format_version {version!r}; this version reads up to {FORMAT_VERSION}"
            )
        try:
            config = RefineDetConfig.from_dict(data["config"])
            trt = data.get("tensorrt")
            manifest = Manifest(
                kind=data["kind"],
                config=config,
                artifact_sha256=str(data["artifact_sha256"]),
                precision=data.get("precision", "fp32"),
                outputs=data.get("outputs", "raw"),
                batch=data.get("batch"),
                source_checkpoint_sha256=data.get("source_checkpoint_sha256"),
                onnx_opset=data.get("onnx_opset"),
                tensorrt=TensorRTBuild(**trt) if trt else None,
                created=str(data.get("created", "")),
                extra=dict(data.get("extra") or {}),
                format_version=version,
            )
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"invalid manifest ({type(exc).__name__}: {exc})") from None
        if list(data.get("class_names", config.class_names)) != list(config.class_names):
            raise ArtifactError("manifest class_names disagree with its config")
        if data.get("input_size", config.input_size) != config.input_size:
            raise ArtifactError("manifest input_size disagrees with its config")
        if list(data.get("output_names", manifest.output_names)) != list(manifest.output_names):
            raise ArtifactError(
                f"manifest output_names {data['output_names']} do not match outputs={manifest.outputs!r}"
            )
        return manifest


def file_kind(path: str | Path) -> FileKind:
    """What kind of model file ``path`` is: ``checkpoint`` (torch, optionally xz-compressed), ``onnx``
    or ``tensorrt`` (a serialized engine). Decided by, in order: the manifest beside it, the suffix
    (``FILE_SUFFIXES``), the file's first bytes (xz or torch zip: a checkpoint). Raises ArtifactError
    naming the accepted suffixes when none of these tells."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"model file not found: {path}")
    manifest = manifest_path(path)
    if manifest.is_file():
        try:
            kind = json.loads(manifest.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind in KINDS:
            return kind  # type: ignore[no-any-return]
    name = path.name.lower()
    for suffix, kind in FILE_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith((XZ_MAGIC, ZIP_MAGIC)):
        return "checkpoint"
    accepted = ", ".join(FILE_SUFFIXES)
    raise ArtifactError(f"{path}: unknown model file type; expected one of {accepted}")


def manifest_path(artifact_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (the manifest sits beside its artifact)."""
    path = Path(artifact_path)
    return path.with_name(path.name + ".json")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """``model.checkpoint.atomic_write`` for bytes already in memory."""

    def write(f: BinaryIO) -> None:
        f.write(data)

    return atomic_write(path, write)


def write_manifest(artifact_path: str | Path, manifest: Manifest) -> Path:
    """Write ``<artifact>.json`` atomically; returns its path."""
    return atomic_write_bytes(
        manifest_path(artifact_path), (json.dumps(manifest.to_dict(), indent=2) + "\n").encode()
    )


def read_manifest(artifact_path: str | Path, verify_hash: bool = True) -> Manifest:
    """The manifest beside ``artifact_path``. With ``verify_hash`` the artifact's sha256 must match the
    one recorded, so a manifest is never applied to another file. Raises ArtifactError with what to do."""
    artifact = Path(artifact_path)
    if not artifact.is_file():
        raise ArtifactError(f"artifact not found: {artifact}")
    path = manifest_path(artifact)
    if not path.is_file():
        raise ArtifactError(
            f"no manifest beside {artifact} (expected {path}); re-export it with `refinedet export` "
            "so the config, classes and normalisation travel with the model"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
    try:
        manifest = Manifest.from_dict(data)
    except ArtifactError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    if verify_hash:
        actual = file_sha256(artifact)
        if actual != manifest.artifact_sha256:
            raise ArtifactError(
                f"{artifact} does not match its manifest {path} (sha256 {actual[:12]} != "
                f"{manifest.artifact_sha256[:12]}); the file was replaced after export: re-export it"
            )
    return manifest


def _version_key(version: str, parts: int = 3) -> tuple[str, ...]:
    return tuple(version.strip().split(".")[:parts])


def check_engine_compatible(
    manifest: Manifest, gpu_name: str, compute_capability: str, trt_version: str
) -> list[str]:
    """Can this engine run here? Pure: the caller passes the current GPU and TensorRT.

    Raises ArtifactError for a hard mismatch (not an engine, other compute capability, other TensorRT
    major.minor.patch: TensorRT refuses to deserialize those). Returns warnings for soft ones (another
    GPU model with the same compute capability runs, but its tactics were timed on the build GPU).
    """
    if manifest.kind != "tensorrt" or manifest.tensorrt is None:
        raise ArtifactError(f"expected a TensorRT engine manifest, got kind {manifest.kind!r}")
    built = manifest.tensorrt
    problems = []
    if built.compute_capability.strip() != compute_capability.strip():
        problems.append(f"compute capability {built.compute_capability} (this GPU has {compute_capability})")
    if _version_key(built.tensorrt_version) != _version_key(trt_version):
        problems.append(f"TensorRT {built.tensorrt_version} (this machine has {trt_version})")
    if problems:
        raise ArtifactError(
            f"engine was built for {built.gpu_name}, "
            + " and ".join(problems)
            + "; rebuild it on this machine with `refinedet export engine --onnx MODEL.onnx`"
        )
    if built.gpu_name.strip() != gpu_name.strip():
        return [
            f"engine was built on {built.gpu_name} and runs on {gpu_name}: tactics may be suboptimal, rebuild for best speed"
        ]
    return []

"""``EnginePlan``: what to run and how, decided once (``deploy.prepare.decide``) and built by every path.

``refinedet serve`` (and so the container), ``ray-serve`` replicas, ``predict`` and ``ray-predict`` actors
all get their plan from the same function above this package and build exactly what it says: the service
through ``service.backends.load_backend(plan, settings)``, the batch paths through ``build_network(plan)``.
Nothing below the deploy layer chooses an engine, a device or a thread count again.

The plan is plain data: it travels to uvicorn worker processes as JSON (``REFINEDET_ENGINE_PLAN``) and to
Ray actors pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

Backend = Literal["torch", "onnxruntime", "openvino", "tensorrt"]
Device = Literal["cpu", "cuda"]
UploadDecoder = Literal["nvjpeg", "pil", "handler"]
PLAN_ENV = "REFINEDET_ENGINE_PLAN"


@dataclass(frozen=True)
class EnginePlan:
    """The engine decision, whole:

    - ``artifact``: the file to load (checkpoint, ONNX model, TensorRT engine); None: no model exists, an
      untrained network is built (and announced as such);
    - ``backend``, ``device``, ``engine`` (e.g. ``openvino-int8``, ``onnxruntime-fp32``, ``torch-fp32``,
      ``tensorrt-fp16``) and ``precision`` (fp32 | fp16 | bf16 | int8);
    - ``max_batch``: the largest batch one engine call takes; ``slots``: engine calls at once (the
      service's batcher slots); ``threads``: intra-op threads of the engine on a CPU (None on a GPU);
    - ``decode``: who decodes an upload in the service: ``nvjpeg`` (plain JPEGs on the GPU), ``pil``
      (every upload, in the engine slot), ``handler`` (the request handler);
    - ``onnx``: the ONNX model behind the artifact, when there is one; ``reason``: one line on why.
    """

    artifact: Path | None
    backend: Backend
    device: Device
    engine: str
    precision: str
    max_batch: int
    slots: int
    threads: int | None
    decode: UploadDecoder
    onnx: Path | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.slots < 1:
            raise ValueError(f"max_batch and slots must be at least 1, got {self.max_batch}, {self.slots}")
        if self.backend == "tensorrt" and self.device != "cuda":
            raise ValueError("a TensorRT engine runs on a CUDA GPU only")

    def with_changes(self, **changes: Any) -> EnginePlan:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnginePlan:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("artifact", "onnx"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> EnginePlan:
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        """One line for people: what is served, with what, where."""
        what = str(self.artifact) if self.artifact is not None else "an UNTRAINED network (no model given)"
        threads = f", {self.threads} thread(s)" if self.threads else ""
        return (
            f"{self.engine} ({self.backend}, {self.precision}) on {self.device}{threads}, "
            f"{self.slots} call(s) at once, batch <= {self.max_batch}: {what}"
        )


def build_network(plan: EnginePlan) -> nn.Module:
    """The plan's engine as a module for the batch paths (``refinedet predict``, Ray Data actors): the
    checkpoint's network for ``torch``, else the artifact's runner (``model.evaluation.artifact``), on the
    plan's device with the plan's threads."""
    import torch

    if plan.artifact is None:
        from model.errors import UserError

        raise UserError("no model to run: give --checkpoint or --artifact (no default model ships here)")
    device = torch.device(plan.device)
    if plan.backend == "torch":
        from model.checkpoint import load_model

        if plan.threads:
            torch.set_num_threads(plan.threads)
        model, _ = load_model(plan.artifact, map_location=device)
        return model.to(device).eval()
    from model.evaluation.artifact import ArtifactNetwork
    from model.runtime import load_runner

    runner = load_runner(plan.artifact, device=device, backend=plan.backend, threads=plan.threads)
    return ArtifactNetwork(runner).eval()

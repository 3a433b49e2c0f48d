"""Operations routes: liveness, readiness, model metadata, Prometheus metrics, KServe v2 health/metadata.

/healthz, /readyz, /v2/health/* and /metrics never need the API key (orchestrators and scrapers call
them); model metadata does when a key is configured.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service import oip
from service.errors import ServiceError
from service.metrics import CONTENT_TYPE
from service.routes.deps import api_key_dependencies, get_state
from service.schemas import ErrorResponse, ModelInfoResponse, Status
from service.settings import Settings
from service.state import ServiceState, ServiceStatus

# The torch backend runs the eager nn.Module rebuilt from a checkpoint (no TorchScript anywhere).
PLATFORMS = {"torch": "pytorch_eager", "onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
_DIRECTORIES = re.compile(r"[^\s]*[\\/]")  # a token up to its last slash
LOAD_FAILED = "the model failed to load; the reason is in the service log"
STALLED = "stalled"  # /readyz's status while the engine makes no progress
OIP_ERROR = {"description": "{'error': message}: every error under /v2 is in the protocol's shape"}
NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorResponse, "description": "model not loaded yet"}
}


def router(settings: Settings) -> APIRouter:
    api = APIRouter()
    open_routes = APIRouter(tags=["operations"])
    keyed = APIRouter(tags=["model"], dependencies=api_key_dependencies(settings))

    @open_routes.get("/healthz", response_model=Status, responses={503: {"model": Status}})
    async def healthz(request: Request) -> JSONResponse:
        """Liveness: the process serves requests (503 only if the model failed to load)."""
        state = get_state(request)
        if state.status == ServiceStatus.FAILED:
            return JSONResponse({"status": ServiceStatus.FAILED, "detail": LOAD_FAILED}, status_code=503)
        return JSONResponse({"status": "ok", "detail": None})

    @open_routes.get("/readyz", response_model=Status, responses={503: {"model": Status}})
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: 200 once the model is loaded and warmed up; 503 before, after a failure, while stopping,
        and while the engine is stalled (work waiting and none finished for ENGINE_STALL_S)."""
        status, detail = readiness(get_state(request))
        return JSONResponse(
            {"status": status, "detail": detail}, status_code=200 if status == ServiceStatus.READY else 503
        )

    @open_routes.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def metrics(request: Request) -> Response:
        """Prometheus metrics in the text exposition format."""
        return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)

    @open_routes.get("/v2/health/live", tags=["kserve-v2"])
    async def v2_live() -> dict[str, bool]:
        return {"live": True}

    @open_routes.get("/v2/health/ready", tags=["kserve-v2"], responses={503: {"description": "not ready"}})
    async def v2_ready(request: Request) -> JSONResponse:
        ready = readiness(get_state(request))[0] == ServiceStatus.READY
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @open_routes.get("/v2", tags=["kserve-v2"])
    async def v2_server(request: Request) -> dict[str, Any]:
        return {"name": "refinedet", "version": request.app.version, "extensions": ["binary_tensor_data"]}

    @keyed.get("/v1/model", response_model=ModelInfoResponse, responses=NOT_READY)
    async def model_info(request: Request) -> dict[str, Any]:
        """The served model: name, classes, input size, backend, precision, artifact hash, trained or not."""
        return describe_model(get_state(request))

    @keyed.get("/v2/models/{name}", tags=["kserve-v2"], responses={503: OIP_ERROR, 404: OIP_ERROR})
    async def v2_model(request: Request, name: str) -> dict[str, Any]:
        """KServe v2 model metadata: the tensors of `POST /v2/models/{name}/infer` (encoded images in,
        detections out; `labels` index `parameters.class_names`)."""
        info = describe_model(get_state(request), name)
        return {
            "name": info["name"],
            "versions": ["1"],
            "platform": PLATFORMS.get(info["backend"], info["backend"]),
            **oip.TENSORS,
            "parameters": {"class_names": ",".join(info["classes"])},
        }

    @keyed.get("/v2/models/{name}/ready", tags=["kserve-v2"], responses={503: OIP_ERROR, 404: OIP_ERROR})
    async def v2_model_ready(request: Request, name: str) -> dict[str, Any]:
        info = describe_model(get_state(request), name)
        return {"name": info["name"], "ready": True}

    api.include_router(open_routes)
    api.include_router(keyed)
    return api


def readiness(state: ServiceState) -> tuple[str, str | None]:
    """(status, detail) for /readyz: the app's status, or ``stalled`` while the engine makes no progress."""
    if state.status == ServiceStatus.FAILED:
        return state.status, LOAD_FAILED
    stalled = state.stalled_for() if state.ready else None
    if stalled is not None:
        return STALLED, f"the engine has made no progress for {stalled:.0f} s with work waiting"
    return state.status, None


def describe_model(state: ServiceState, name: str | None = None) -> dict[str, Any]:
    """/v1/model's body; 503 before the model is loaded, 404 if ``name`` is not the served model."""
    detector, batcher = state.require_ready()
    summary = state.summary()
    if name is not None and name != summary["name"]:
        raise ServiceError(
            404, "model_not_found", f"no model named {name!r}; this service serves {summary['name']!r}"
        )
    info = detector.backend.info
    cfg = detector.config
    return {
        **summary,
        "classes": list(cfg.class_names),
        "input_size": cfg.input_size,
        "max_batch_size": batcher.max_batch_size,
        "artifact": info.artifact.name if info and info.artifact else None,  # never the server's path
        "artifact_sha256": info.artifact_sha256 if info else None,
        "trained": info.trained if info else False,
        "weights": without_directories(info.weights) if info else "unknown",
    }


def without_directories(text: str) -> str:
    """``text`` with every file path cut to its file name (the server's directories are nobody's business)."""
    return _DIRECTORIES.sub("", text)

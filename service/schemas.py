"""Response bodies of the HTTP API (they also document it in the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Box(BaseModel):
    """Corners in original-image pixels, clipped to the image."""

    x1: float
    y1: float
    x2: float
    y2: float


class Detection(BaseModel):
    label: str
    class_id: int = Field(description="index into /v1/model classes (network label - 1)")
    score: float
    box: Box


class ImageSize(BaseModel):
    width: int
    height: int


class ModelSummary(BaseModel):
    name: str
    backend: str
    device: str
    precision: str


class Timings(BaseModel):
    """Milliseconds. preprocess/inference/postprocess are the batch's (shared by its images)."""

    decode: float
    preprocess: float
    queue: float
    inference: float
    postprocess: float
    total: float


class DetectResponse(BaseModel):
    detections: list[Detection]
    image: ImageSize
    model: ModelSummary
    timings_ms: Timings


class BatchItem(BaseModel):
    """One file of a batch request: ``status`` 200 and the fields of a /detect answer (detections, image,
    model, timings_ms), or the 4xx that file alone got and its ``error`` (the other files are answered)."""

    filename: str | None = Field(description="the upload's file name, if it had one")
    status: int = Field(description="200, or the status /detect would have answered for this file")
    detections: list[Detection] | None = None
    image: ImageSize | None = None
    model: ModelSummary | None = None
    timings_ms: Timings | None = None
    error: ErrorBody | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem] = Field(description="one per file, in upload order")
    failed: int = Field(description="how many files got an error instead of detections")


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelInfoResponse(BaseModel):
    name: str
    classes: list[str]
    input_size: int
    backend: str
    device: str
    precision: str
    max_batch_size: int
    artifact: str | None
    artifact_sha256: str | None
    trained: bool
    weights: str


class Status(BaseModel):
    status: str
    detail: str | None = None


class Percentiles(BaseModel):
    p50: float
    p90: float
    p99: float
    mean: float


class BenchmarkResponse(BaseModel):
    iterations: int = Field(description="timed iterations run: fewer than requested when stopped")
    iterations_requested: int
    stopped: Literal["time_limit"] | None = Field(
        default=None, description="time_limit: the run reached BENCHMARK_MAX_S (or the request's deadline)"
    )
    seconds: float = Field(description="how long the iterations took, warm-up included")
    batch_size: int
    image: ImageSize
    synthetic_image: bool
    latency_ms: dict[str, Percentiles] = Field(
        description="per stage: decode, preprocess, inference, postprocess, total"
    )
    throughput_images_per_s: float
    model: ModelSummary


BatchItem.model_rebuild()

"""Open Inference Protocol v2 (KServe v2 / Triton HTTP) codec for the detector: request -> images and
options, detections -> output tensors. No I/O and no framework here; ``service.routes.inference_v2`` wires
it to the batcher.

The model takes one input and gives four outputs (``TENSORS`` is what ``/v2/models/{name}`` reports):

- ``image`` BYTES [N] (or [N, 1]): N encoded images (JPEG, PNG, WebP, BMP), each one element. In the JSON
  form an element is the image's base64 text; with the binary tensor data extension (what
  ``tritonclient`` sends) it is the raw bytes, 4-byte little-endian length first, as Triton serialises BYTES.
- ``boxes`` FP32 [N, K, 4]: x1, y1, x2, y2 in original-image pixels (after EXIF orientation), best first;
- ``scores`` FP32 [N, K];
- ``labels`` INT32 [N, K]: ``class_id``, the 0-based index into the model's class names (as ``/detect``);
- ``count`` INT32 [N]: detections of each image; rows past it are padding (boxes 0, score 0, label -1).

K is the largest count in the request. Request ``parameters``: ``score_threshold``, ``max_detections`` and
``classes`` (names, comma-separated), with ``/detect``'s meanings, defaults and limits.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import bounded_json
from service.bounded_json import JsonLimits, JsonRejected, ValueCount
from service.errors import ServiceError

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT = "image"
OUTPUTS = {"boxes": "FP32", "scores": "FP32", "labels": "INT32", "count": "INT32"}
TENSORS = {
    "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
    "outputs": [
        {"name": "boxes", "datatype": "FP32", "shape": [-1, -1, 4]},
        {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
        {"name": "labels", "datatype": "INT32", "shape": [-1, -1]},
        {"name": "count", "datatype": "INT32", "shape": [-1]},
    ],
}
NUMPY = {"FP32": np.dtype("<f4"), "INT32": np.dtype("<i4")}


# The JSON part of a request: a valid one nests 5 deep ({"inputs": [{"data": [["<base64>"]]}]}) and holds
# a few values per image; numbers are shapes, sizes and options. Text other than the images' base64 (the
# id, names, parameter values) is at most MAX_TEXT characters.
JSON_LIMITS = JsonLimits(max_depth=32, max_values=10_000, max_number_chars=32)
MAX_TEXT = 1024
MAX_HEADER_DIGITS = 12  # Inference-Header-Content-Length: more digits than any body can have


def bad(message: str, status: int = 400) -> ServiceError:
    return ServiceError(status, "invalid_inference_request", message)


@dataclass(frozen=True)
class InferRequest:
    """A parsed request: the encoded images, the request's options, which outputs to send and how."""

    id: str | None
    images: list[bytes]
    parameters: dict[str, Any]
    outputs: dict[str, bool]  # name -> as binary data


def parse_request(body: bytes, header_length: str | None, max_images: int) -> InferRequest:
    """The body of ``POST /v2/models/{name}/infer`` (JSON, or JSON + binary tensor data when
    ``header_length`` is given) -> ``InferRequest``; ``ServiceError`` 400 for anything malformed, 413 for
    more images (or JSON values) than the limits. Every field is checked for its type; the JSON is read
    within ``JSON_LIMITS`` (``service.bounded_json``), and no image is decoded before the count is known."""
    body, binary = _split(body, header_length)
    try:
        request = bounded_json.loads(body, JSON_LIMITS)
    except JsonRejected as exc:
        raise rejected(exc) from None
    if not isinstance(request, dict):
        raise bad("the inference request must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise bad(f"the request must have exactly one input, {INPUT!r} (BYTES: encoded images)")
    parameters = _parameters(request.get("parameters"), "'parameters'")
    images = _input_images(inputs[0], binary, max_images)
    return InferRequest(
        request_id(request.get("id")), images, parameters, _wanted_outputs(request, parameters)
    )


def json_count(header_length: str | None) -> ValueCount:
    """What ``parse_request`` counts first (the JSON part's values), to count as the body arrives and
    refuse a flood before the rest of it is read (``feed`` raises ``JsonRejected``: see ``rejected``)."""
    return ValueCount(JSON_LIMITS.max_values, _json_length(header_length))


def rejected(exc: JsonRejected) -> ServiceError:
    return bad(f"the inference request is not accepted: {exc}", 413 if exc.too_large else 400)


def _json_length(header_length: str | None) -> int | None:
    """The length header's value (ASCII digits only: ``int`` takes others too)."""
    if header_length is None:
        return None
    if not (header_length.isascii() and header_length.isdigit() and len(header_length) <= MAX_HEADER_DIGITS):
        raise bad(f"{HEADER_LENGTH} must be the length of the JSON part in bytes, got {header_length[:40]!r}")
    return int(header_length)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON, binary data), by the length header."""
    length = _json_length(header_length)
    if length is None:
        return body, b""
    if length > len(body):
        raise bad(f"{HEADER_LENGTH} {length} does not fit a {len(body)}-byte body")
    return body[:length], body[length:]


def request_id(value: Any) -> str | None:
    return None if value is None else _text(value, "'id'")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise bad(f"{what} must be a string")
    if len(value) > MAX_TEXT:
        raise bad(f"{what} is longer than {MAX_TEXT} characters")
    return value


def _parameters(value: Any, what: str) -> dict[str, Any]:
    """A ``parameters`` object (absent: empty): each value a string, number or boolean, as the protocol has it."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{what} must be an object")
    for key, item in value.items():
        if isinstance(item, str):
            _text(item, f"parameter {key[:40]!r}")
        elif not isinstance(item, bool | int | float):
            raise bad(f"parameter {key[:40]!r} must be a string, number or boolean")
    return value


def _input_images(tensor: dict[str, Any], binary: bytes, max_images: int) -> list[bytes]:
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if name != INPUT:
        raise bad(
            f"unknown input {_short(name)}: this model takes one input, {INPUT!r} (BYTES: encoded images)"
        )
    if datatype != "BYTES":
        raise bad(f"input {INPUT!r} must be BYTES (encoded JPEG/PNG/WebP/BMP images), got {_short(datatype)}")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 2 and all(_count(d) for d in shape)):
        raise bad(f"input {INPUT!r} must have shape [N] or [N, 1], got {_short(shape)}")
    if len(shape) == 2 and shape[1] != 1:
        raise bad(f"input {INPUT!r} must have shape [N] or [N, 1] (one image per row), got {shape}")
    count = math.prod(shape)
    if count > max_images:
        raise bad(f"{count} images in one request; the limit is {max_images}", 413)
    if count == 0:
        raise bad(f"input {INPUT!r} holds no image")
    size = _parameters(tensor.get("parameters"), f"the 'parameters' of input {INPUT!r}").get(
        "binary_data_size"
    )
    if size is not None:
        if not _count(size) or size > len(binary):
            raise bad(f"binary_data_size {size!r} does not fit the {len(binary)} bytes of binary data")
        elements: list[Any] = split_bytes(binary[:size], count)
    else:
        elements = _elements(tensor.get("data"))
    if len(elements) != count:
        raise bad(f"input {INPUT!r} has shape {shape} but {len(elements)} element(s)")
    return [e if isinstance(e, bytes) else _from_base64(e) for e in elements]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _elements(data: Any) -> list[str]:
    """``data`` flat (``["<base64>", ...]``) or in rows (``[["<base64>"], ...]``) -> the elements, not
    decoded."""
    if isinstance(data, list) and all(isinstance(row, list) for row in data):
        data = [element for row in data for element in row]
    if not (isinstance(data, list) and all(isinstance(element, str) for element in data)):
        raise bad(f"input {INPUT!r} needs 'data' (a list of base64 strings, flat or in rows) or binary data")
    return data


def _from_base64(element: str) -> bytes:
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"an element of {INPUT!r} is not valid base64") from None


def split_bytes(data: bytes, limit: int | None = None) -> list[bytes]:
    """Triton's BYTES serialisation (per element: uint32 little-endian length, then the bytes) -> elements;
    a 400 at element ``limit + 1`` (a shape's worth is all a request may have)."""
    elements: list[bytes] = []
    at = 0
    while at < len(data):
        if limit is not None and len(elements) == limit:
            raise bad(f"the binary data of {INPUT!r} holds more elements than its shape")
        if at + 4 > len(data):
            raise bad("the binary BYTES data ends inside an element's length")
        (length,) = struct.unpack_from("<I", data, at)
        at += 4
        if at + length > len(data):
            raise bad("the binary BYTES data ends inside an element")
        elements.append(data[at : at + length])
        at += length
    return elements


def _wanted_outputs(request: dict[str, Any], parameters: dict[str, Any]) -> dict[str, bool]:
    default_binary = _flag(parameters, "binary_data_output")
    asked = request.get("outputs")
    if asked is None:
        return dict.fromkeys(OUTPUTS, default_binary)
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise bad("'outputs' must be a list of objects")
    wanted = {}
    for output in asked:
        name = output.get("name")
        if not isinstance(name, str):
            raise bad(f"each output name must be a string; this model's outputs are {list(OUTPUTS)}")
        if name not in OUTPUTS:
            raise bad(f"unknown output {_short(name)}; this model's outputs are {list(OUTPUTS)}")
        own = _parameters(output.get("parameters"), f"the 'parameters' of output {name!r}")
        wanted[name] = _flag(own, "binary_data", default_binary)
    return wanted


def _flag(parameters: dict[str, Any], name: str, default: bool = False) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise bad(f"parameter {name!r} must be true or false, got {_short(value)}")
    return value


def detection_tensors(per_image: list[list[dict[str, Any]]]) -> dict[str, np.ndarray]:
    """``/detect``'s detection dicts of each image -> the output tensors (padded to the largest count)."""
    n, k = len(per_image), max((len(d) for d in per_image), default=0)
    boxes = np.zeros((n, k, 4), NUMPY["FP32"])
    scores = np.zeros((n, k), NUMPY["FP32"])
    labels = np.full((n, k), -1, NUMPY["INT32"])
    for i, detections in enumerate(per_image):
        for j, d in enumerate(detections):
            b = d["box"]
            boxes[i, j] = (b["x1"], b["y1"], b["x2"], b["y2"])
            scores[i, j] = d["score"]
            labels[i, j] = d["class_id"]
    count = np.array([len(d) for d in per_image], NUMPY["INT32"])
    return {"boxes": boxes, "scores": scores, "labels": labels, "count": count}


def encode_response(
    model_name: str, request: InferRequest, tensors: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """(body, JSON header length when binary data follows it, else None)."""
    outputs, chunks = [], []
    for name, binary in request.outputs.items():
        array = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name], "shape": list(array.shape)}
        if binary:
            raw = np.ascontiguousarray(array, NUMPY[OUTPUTS[name]]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":")).encode()
    return (header + b"".join(chunks), len(header)) if chunks else (header, None)

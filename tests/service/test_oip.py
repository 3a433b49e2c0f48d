"""The Open Inference Protocol codec (service/oip.py) on hostile bodies (issue #25, finding 3): whatever the
body, ``parse_request`` returns a request or raises a ``ServiceError`` 4xx, never anything else; nesting,
value count, number length and text length are limited, the first two checked before the JSON is parsed."""

from __future__ import annotations

import base64
import copy
import itertools
import json
import random
import struct
from typing import Any

import pytest

from service import oip
from service.errors import ServiceError

B64 = base64.b64encode(b"\xff\xd8 any bytes: the codec does not decode images").decode()
MAX_IMAGES = 4


def valid() -> dict[str, Any]:
    return {
        "id": "r1",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}],
        "outputs": [{"name": "boxes", "parameters": {"binary_data": True}}, {"name": "count"}],
        "parameters": {"score_threshold": 0.3, "max_detections": 5, "binary_data_output": False},
    }


def dumps(request: Any) -> bytes:
    return json.dumps(request).encode()


def parse(body: bytes, header_length: str | None = None) -> oip.InferRequest:
    return oip.parse_request(body, header_length, MAX_IMAGES)


def refused(body: bytes, header_length: str | None = None) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        parse(body, header_length)
    assert 400 <= caught.value.status < 500, caught.value.status
    return caught.value


def with_tensor(**changes: Any) -> bytes:
    request = valid()
    request["inputs"][0].update(changes)
    return dumps(request)


def nested(depth: int, inner: str = '"x"') -> str:
    return "[" * depth + inner + "]" * depth


BIG = "1" + "0" * 4301  # over Python's 4300-digit limit for int(str)
# The bodies of issue #25's finding 3 (each answered 500 before): (what, body, header length, status, says).
ISSUE_BODIES = [
    ("data nested 480 deep",
     b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"data":' + nested(480).encode() + b"}]}",
     None, 400, "nested"),
    ("JSON nested 1000 deep", b'{"inputs":[],"x":' + nested(1000).encode() + b"}", None, 400, "nested"),
    ("a 4302-digit shape", with_tensor(shape=[0]).replace(b"[0]", f"[{BIG}]".encode()), None, 400, "digits"),
    ("a 4302-digit max_detections", dumps(valid()).replace(b'"max_detections": 5', f'"max_detections": {BIG}'.encode()),
     None, 400, "digits"),
    ("tensor parameters a list", with_tensor(parameters=[1]), None, 400, "must be an object"),
    ("tensor parameters a string", with_tensor(parameters="x"), None, 400, "must be an object"),
    ("output name a list", dumps({**valid(), "outputs": [{"name": ["boxes"]}]}), None, 400, "output name"),
    ("output name a dict", dumps({**valid(), "outputs": [{"name": {"a": 1}}]}), None, 400, "output name"),
    ("output parameters a list", dumps({**valid(), "outputs": [{"name": "boxes", "parameters": []}]}),
     None, 400, "must be an object"),
    ("output parameters a string", dumps({**valid(), "outputs": [{"name": "boxes", "parameters": "x"}]}),
     None, 400, "must be an object"),
    ("length header a non-ASCII digit", dumps(valid()), "\u00b2", 400, "length of the JSON part"),
    ("length header 4302 digits", dumps(valid()), BIG, 400, "length of the JSON part"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "header_length", "status", "says"),
    [case[1:] for case in ISSUE_BODIES],
    ids=[case[0] for case in ISSUE_BODIES],
)
def test_the_issues_bodies_are_refused_with_a_4xx(body, header_length, status, says):
    error = refused(body, header_length)
    assert error.status == status and says in error.message, error.message


def flood_body(elements: int = 3_300_000) -> bytes:
    """The issue's flood: 16.5 MB, 3.3 M empty strings (5 bytes each)."""
    head = b'{"inputs":[{"name":"image","shape":[%d],"datatype":"BYTES","data":[' % elements
    return head + b",  ".join([b'""'] * elements) + b"]}]}"


def test_a_flood_of_values_is_refused_before_it_is_parsed(monkeypatch):
    """The issue's 16.5 MB body of 3.3 M empty strings: 413 from a count of the raw bytes, before any JSON
    is parsed or any element decoded (it took 2.7 s of the event loop)."""
    flood = flood_body()
    assert len(flood) > 16_500_000

    def never(*args, **kwargs):
        raise AssertionError("parsed or decoded a body that its size alone refuses")

    monkeypatch.setattr(json, "loads", never)
    monkeypatch.setattr(base64, "b64decode", never)
    error = refused(flood)
    assert error.status == 413 and "values" in error.message, error.message


def test_more_elements_than_the_shape_in_binary_data_are_refused():
    """4 M empty BYTES elements in 16 MB of binary data: refused at the first element past the shape."""
    binary = struct.pack("<I", 0) * 4_000_000
    header = with_tensor(shape=[1], data=None, parameters={"binary_data_size": len(binary)})
    header = header.replace(b', "data": null', b"")
    error = refused(header + binary, str(len(header)))
    assert error.status == 400 and "more elements than its shape" in error.message, error.message


def test_more_images_than_the_limit_are_refused_from_the_shape_before_decoding(monkeypatch):
    monkeypatch.setattr(base64, "b64decode", lambda *a, **k: pytest.fail("decoded past the limit"))
    error = refused(with_tensor(shape=[MAX_IMAGES + 1], data=[B64] * (MAX_IMAGES + 1)))
    assert error.status == 413 and f"limit is {MAX_IMAGES}" in error.message


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (dumps({**valid(), "parameters": {"score_threshold": float("nan")}}), "NaN"),
        (dumps({**valid(), "parameters": {"classes": {"a": 1}}}), "string, number or boolean"),
        (dumps({**valid(), "parameters": {"binary_data_output": "yes"}}), "binary_data_output"),
        (dumps({**valid(), "parameters": []}), "'parameters' must be an object"),
        (dumps({**valid(), "outputs": [{"name": "boxes", "parameters": {"binary_data": 1}}]}), "binary_data"),
        (dumps({**valid(), "id": 7}), "'id' must be a string"),
        (dumps({**valid(), "id": "x" * 1025}), "1024 characters"),
        (with_tensor(data=[[B64, B64]], shape=[1]), "shape [1] but 2 element(s)"),
        (with_tensor(data=[[[B64]]], shape=[1, 1]), "a list of base64 strings"),
        (with_tensor(data=[B64, [B64]], shape=[2]), "a list of base64 strings"),
        (with_tensor(shape=[True]), "must have shape"),
        (with_tensor(name=["image"]), "unknown input"),
        (b"[" + b"1," * 12_000 + b"1]", "values"),
        (b'{"inputs": [], "n": ' + b"1" * 33 + b"}", "digits"),
        (b'{"inputs": [], "n": 0.' + b"1" * 40 + b"}", "characters"),
        (b'{"inputs": [], "s": "\xff"}', "not valid JSON"),
    ],
)
def test_strict_types_and_limits(body, says):
    error = refused(body)
    assert says in error.message, error.message


def test_requests_at_the_limits_parse():
    deep = valid()
    deep["inputs"][0].update(shape=[2, 1], data=[[B64], [B64]])
    assert len(parse(dumps(deep)).images) == 2
    inside = valid()  # brackets, braces, quotes and backslashes inside strings are text, not structure
    inside["id"] = '[{"\\' * 200
    assert parse(dumps(inside)).id == inside["id"]
    numbers = valid()
    numbers["parameters"]["max_detections"] = int("9" * 32)
    assert parse(dumps(numbers)).parameters["max_detections"] == int("9" * 32)


JUNK: list[Any] = [None, True, 0, -1, 2.5, "", "x", "image", [], {}, [[]], {"a": {}}, [B64], {"name": "boxes"},
                   10**30, "A" * 2000, [None] * 3, [[B64]], [-1], [1, 1, 1]]  # fmt: skip


def sites(node: Any, path: tuple = ()) -> list[tuple]:
    """Every path into ``node`` (dict keys and list indices), itself included."""
    found = [path]
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in children:
        found += sites(child, (*path, key))
    return found


def replaced(request: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    request = copy.deepcopy(request)
    parent = request
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return request


def test_any_value_anywhere_gets_a_request_or_a_4xx():
    """Each place in a valid request (and a new key beside each) replaced by each kind of junk."""
    request, failures = valid(), []
    places = sites(request) + [(*p, "extra") for p in sites(request) if isinstance(_at(request, p), dict)]
    for path, junk in itertools.product(places, JUNK):
        body = dumps(replaced(request, path, junk))
        try:
            parse(body)
        except ServiceError as exc:
            if not 400 <= exc.status < 500:
                failures.append((path, junk, exc.status))
        except Exception as exc:
            failures.append((path, str(junk)[:40], repr(exc)[:80]))
    assert not failures, failures[:10]


def _at(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


def test_random_bytes_and_truncations_get_a_request_or_a_4xx():
    rng = random.Random(25)
    body = dumps(valid())
    for _ in range(400):
        cut = bytearray(body[: rng.randrange(len(body) + 1)])
        for _ in range(rng.randrange(4)):
            if cut:
                cut[rng.randrange(len(cut))] = rng.choice(b'[]{}",:\\0-e.9 \x00\xff')
        try:
            parse(bytes(cut))
        except ServiceError as exc:
            assert 400 <= exc.status < 500, (bytes(cut), exc.status)

"""service/bounded_json.py: the limits hold at their edges, and the nesting walked on the raw bytes is the
nesting of the parsed value, whatever the strings hold (brackets, quotes, backslash runs)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from service.bounded_json import JsonLimits, JsonRejected, loads, nesting

LIMITS = JsonLimits(max_depth=8, max_values=100, max_number_chars=10)
TRICKY = ['"', "\\", "[", "]", "{", "}", ",", "x", "\\\\", '\\"', "é", "\u2028"]


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def random_value(rng: random.Random, level: int = 0) -> Any:
    kind = rng.randrange(6) if level < 12 else rng.randrange(3)
    if kind == 0:
        return "".join(rng.choice(TRICKY) for _ in range(rng.randrange(6)))
    if kind == 1:
        return rng.choice([0, -7, 2.5, True, None])
    if kind == 2:
        return ""
    if kind in (3, 4):
        return [random_value(rng, level + 1) for _ in range(rng.randrange(3))]
    return {random_value(rng, 99) or "k": random_value(rng, level + 1) for _ in range(rng.randrange(3))}


def test_nesting_is_the_parsed_values_depth():
    rng = random.Random(6)
    for _ in range(500):
        value = random_value(rng)
        for ensure_ascii in (True, False):
            text = json.dumps(value, ensure_ascii=ensure_ascii).encode()
            assert nesting(text) == depth(value), text


def test_depth_is_refused_past_the_limit_before_parsing(monkeypatch):
    assert loads(b"[" * 8 + b"]" * 8, LIMITS) == [[[[[[[[]]]]]]]]
    assert loads(b'["' + b"[" * 50 + b'"]', LIMITS) == ["[" * 50]  # text, not nesting
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed a body nested too deeply"))
    with pytest.raises(JsonRejected, match="deeper than 8") as caught:
        loads(b"[" * 9 + b"]" * 9, LIMITS)
    assert not caught.value.too_large


def test_values_are_counted_on_the_raw_bytes_and_refused_past_the_limit(monkeypatch):
    assert len(loads(b"[" + b",".join([b"1"] * 100) + b"]", LIMITS)) == 100  # 99 commas and a bracket
    assert len(loads(json.dumps([""] * 99).encode(), LIMITS)) == 99
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed a body with too many values"))
    for text in (b"[" + b",".join([b"1"] * 101) + b"]", json.dumps([""] * 101).encode(), b'"' + b"," * 200):
        with pytest.raises(JsonRejected, match="more than 100 values") as caught:
            loads(text, LIMITS)
        assert caught.value.too_large


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (b"12345678901", "11 digits"),
        (b"-12345678901", "11 digits"),
        (b"1.234567890", "11 characters"),
        (b"[NaN]", "NaN"),
        (b"-Infinity", "-Infinity"),
        (b'{"a": 1,}', "not valid JSON"),
        (b'"\xff"', "not valid JSON"),
        ('"x"'.encode("utf-16"), "not UTF-8"),
    ],
)
def test_malformed_and_long_numbers_are_refused(text, says):
    with pytest.raises(JsonRejected, match=says):
        loads(text, LIMITS)


def test_numbers_at_the_limit_parse():
    assert loads(b"[1234567890, -1234567890, 1.23456789, 1e300]", LIMITS) == [
        1234567890,
        -1234567890,
        1.23456789,
        1e300,
    ]
    assert loads(b'\xef\xbb\xbf{"a": "\xc3\xa9"}', LIMITS) == {"a": "é"}  # UTF-8 with a BOM

"""JSON from an untrusted body, parsed within limits (no framework, no HTTP here).

``json.loads`` alone has none of the limits a public server needs: millions of tiny values take seconds
to parse, deep nesting ends in ``RecursionError`` (its C scanner recurses once a level), an integer of more
than 4,300 digits in ``ValueError``, and ``NaN``/``Infinity`` are taken. ``loads`` checks, in this order:

- ``max_values``, before parsing: the values counted on the raw bytes, as commas plus ``[`` and ``{``
  (every value after the first adds one), and the strings as pairs of ``"`` (inside strings they count
  too, so the counts can only overstate), in 64 KiB steps that stop at the limit: a flood is refused after
  its first few KiB (``ValueCount`` counts a body as it arrives, so it can be refused before the rest);
- ``max_depth``, before parsing: the nesting of arrays and objects, brackets inside strings left out;
  walked only when the body has more opening brackets than that, and then over the quotes and brackets
  the first check bounded (the text between them is skipped with ``bytes.find``);
- ``max_number_chars``, while parsing: a number longer is refused as the parser meets it; ``NaN`` and
  ``Infinity`` are refused (they are not JSON).

Every refusal is a ``JsonRejected`` (a ``ValueError``) saying which limit, and whether the body was too
large (``too_large``: the values) rather than malformed. It runs in C or in short Python loops bounded by
the limits; call it off the event loop all the same (``service.routes.inference_v2``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

STEP = 64 * 1024  # bytes counted at a time (so a flood is refused after its first step or so)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


class JsonRejected(ValueError):
    """Not parsed: malformed, or over one of ``JsonLimits`` (``too_large`` for the value count)."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class JsonLimits:
    max_depth: int = 32
    max_values: int = 10_000
    max_number_chars: int = 32


def loads(text: bytes, limits: JsonLimits) -> Any:
    """``text`` (UTF-8 JSON, as RFC 8259 has it between systems) -> the Python value, or ``JsonRejected``."""
    if json.detect_encoding(text) not in ("utf-8", "utf-8-sig"):
        raise JsonRejected("not valid JSON (not UTF-8)")
    count = ValueCount(limits.max_values)
    count.feed(text)
    if count.opening > limits.max_depth and nesting(text) > limits.max_depth:
        raise JsonRejected(f"arrays and objects nested deeper than {limits.max_depth} levels")
    try:
        return json.loads(
            text,
            parse_int=_number(int, "digits", limits.max_number_chars),
            parse_float=_number(float, "characters", limits.max_number_chars),
            parse_constant=_constant,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JsonRejected(f"not valid JSON ({exc})") from None


class ValueCount:
    """``loads``' count of values, fed the text as it arrives (a body in chunks): ``JsonRejected`` (too
    large) as soon as it passes ``limit``. Only the first ``length`` bytes are counted when given (what
    follows them is not JSON)."""

    def __init__(self, limit: int, length: int | None = None) -> None:
        self.limit = limit
        self.left = length
        self.opening = self.separators = self.quotes = 0  # [ and {, commas, double quotes

    def feed(self, data: bytes) -> None:
        if self.left is not None:
            data, self.left = data[: self.left], max(self.left - len(data), 0)
        for start in range(0, len(data), STEP):
            end = start + STEP
            self.opening += data.count(b"[", start, end) + data.count(b"{", start, end)
            self.separators += data.count(b",", start, end)
            self.quotes += data.count(b'"', start, end)
            if max(self.opening + self.separators, (self.quotes + 1) // 2) > self.limit:
                raise JsonRejected(f"more than {self.limit} values", too_large=True)


def nesting(text: bytes) -> int:
    """The deepest nesting of arrays and objects in ``text`` (brackets inside strings left out)."""
    deepest = level = at = 0
    while at < len(text):
        quote = text.find(b'"', at)
        end = len(text) if quote < 0 else quote
        for char in text[at:end].translate(None, _NOT_BRACKETS):
            level += 1 if char in b"[{" else -1
            deepest = max(deepest, level)
        if quote < 0:
            break
        at = _string_end(text, quote + 1)
    return deepest


def _string_end(text: bytes, at: int) -> int:
    """Where the string whose text starts at ``at`` ends (just past its closing quote; the end of
    ``text`` if it does not close). A quote after an odd run of backslashes is escaped."""
    while True:
        quote = text.find(b'"', at)
        if quote < 0:
            return len(text)
        if text[quote - 1] != 0x5C:  # the common case: no backslash before it
            return quote + 1
        backslashes = quote - at - len(text[at:quote].rstrip(b"\\"))  # the run is after the last quote
        if backslashes % 2 == 0:
            return quote + 1
        at = quote + 1


def _number(kind: type, unit: str, max_chars: int) -> Any:
    def parse(literal: str) -> Any:
        length = len(literal.lstrip("-"))
        if length > max_chars:
            raise JsonRejected(f"a number of {length} {unit}; at most {max_chars} are accepted")
        return kind(literal)

    return parse


def _constant(name: str) -> Any:
    raise JsonRejected(f"not valid JSON ({name} is not a JSON number)")

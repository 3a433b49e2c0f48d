"""Issue #25, finding 2: anonymous clients flooding a server that has an API key, against its key holders.

One ``refinedet serve`` (CPU, ``REFINEDET_API_KEY`` set, every other setting its default). First the key
holders alone: ``holders`` clients sending ``POST /detect`` (a BCCD JPEG, with the key) one after another for
``hold_s``; then the same while ``strangers`` clients send the same request without the key as fast as they
are answered (each on a new connection, as the attack did). Measured: the key holders' statuses, success
rate and answers per second in both windows, the strangers' statuses, 5xx answers and requests never
answered (the client's error name). ``ok``: the key holders keep at least 90% of their unloaded success
rate, none of theirs unanswered, no 5xx for anyone (the issue: 82% of the key holder's requests failed
with 503). A stranger's request reset is counted, not failed: a 401 answered before its body was read can
be followed by a reset when the client had asked to close (seen: 4 of 24,021).

    REFINEDET_CACHE_DIR=<warm cache> python -m bench.attacks --phases strangers --out /tmp/attacks/a.json
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from bench.attacks import Context
from bench.soak import BCCD_IMAGE, ServerProcess, http

NAME = "strangers"
HELP = "64 keyless clients flooding /detect while key holders use it (issue #25, 2)"
KEY = "attack-run-key"


async def loop(port: int, body: bytes, headers: dict[str, str], until: float) -> list[int | str]:
    """Statuses of the requests sent until ``until``; the client's error name for one never answered."""
    statuses: list[int | str] = []
    while time.monotonic() < until:
        status, got, *_ = await http(port, "POST", "/detect", body, headers)
        statuses.append(status or got.get("x-client-error", "no answer"))
    return statuses


async def window(port: int, body: bytes, holders: int, strangers: int, seconds: float) -> dict[str, Any]:
    until = time.monotonic() + seconds
    keyed = {"Content-Type": "image/jpeg", "X-API-Key": KEY}
    anonymous = {"Content-Type": "image/jpeg"}
    jobs = [loop(port, body, keyed, until) for _ in range(holders)]
    jobs += [loop(port, body, anonymous, until) for _ in range(strangers)]
    results = await asyncio.gather(*jobs)
    held = [s for r in results[:holders] for s in r]
    strange = [s for r in results[holders:] for s in r]
    return {
        "holders": dict(sorted(Counter(str(s) for s in held).items())),
        "holders_success": round(held.count(200) / len(held), 3) if held else 0.0,  # of those sent
        "holders_ok_per_s": round(held.count(200) / seconds, 2),
        "strangers": dict(sorted(Counter(str(s) for s in strange).items())),
        "holders_unanswered": sum(1 for s in held if isinstance(s, str)),
        "strangers_unanswered": sum(1 for s in strange if isinstance(s, str)),
        "server_errors_5xx": sum(1 for s in held + strange if isinstance(s, int) and s >= 500),
    }


def run(ctx: Context) -> dict[str, Any]:
    seconds = 8.0 if ctx.quick else 20.0
    holders, strangers = 4, 64
    body = BCCD_IMAGE.read_bytes()
    server = ServerProcess(ctx.port, {"REFINEDET_API_KEY": KEY, **ctx.env}, ctx.work_dir / "server.log")
    try:
        server.wait_ready()
        alone = asyncio.run(window(ctx.port, body, holders, 0, seconds))
        flooded = asyncio.run(window(ctx.port, body, holders, strangers, seconds))
    finally:
        server.stop()
    kept = flooded["holders_success"] / alone["holders_success"] if alone["holders_success"] else 0.0
    ok = kept >= 0.9 and flooded["holders_unanswered"] + alone["holders_unanswered"] == 0
    ok = ok and flooded["server_errors_5xx"] + alone["server_errors_5xx"] == 0
    return {"ok": ok, "holders_success_kept": round(kept, 3), "alone": alone, "flooded": flooded}

"""Issue #25, finding 1: ``POST /v1/benchmark`` against ``/detect``'s availability.

One ``refinedet serve`` (CPU, ``REFINEDET_ENABLE_BENCHMARK=true``, every other setting its default) while a
probe sends ``POST /detect`` (a BCCD JPEG) one after another, 0.1 s apart, for the whole phase. Three
attacks, one after another, as the issue ran them:

- ``concurrent``: 3 concurrent ``?iterations=3&warmup=0`` (they deadlocked the engine);
- ``abandoned``: ``?iterations=500&warmup=0&width=4096&height=4096`` whose client disconnects once it is
  under way (it ran 180 s; no /detect answered for 153 s); retried while answered 429, up to 20 times;
- ``large``: 6 concurrent ``?iterations=500&warmup=0&width=4096&height=4096``, each retrying every 0.5 s
  while refused, ignoring Retry-After, until it has been served or ``hold_s`` has passed (RSS went from
  0.9 to 2.9 GB).

Measured: every answer's status, requests never answered (deadlocks: the client gives up after 90 s),
5xx answers, the longest time /detect went without a 200 (over the phase and per attack), how soon after
the abandoning client left /detect was answered, the longest benchmark answer, and the server's RSS
(idle, peak per attack). ``ok``: no request unanswered, no 5xx, /detect never without a 200 for longer than
``BENCHMARK_MAX_S`` + 10 s, and answered within 5 s of the abandoning client's leaving.

    REFINEDET_CACHE_DIR=<warm cache> python -m bench.attacks --phases benchmark --out /tmp/attacks/a.json
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from itertools import pairwise
from typing import Any

from bench.attacks import Context
from bench.soak import BCCD_IMAGE, HOST, ServerProcess, http

NAME = "benchmark"
HELP = "concurrent, abandoned and 6x 4096x4096 POST /v1/benchmark while /detect is probed (issue #25, 1)"
LARGE = "/v1/benchmark?iterations=500&warmup=0&width=4096&height=4096"
PROBE_PAUSE_S = 0.1
RELEASE_LIMIT_S = 5.0  # /detect answered within this after the abandoning client left
Answer = tuple[int, dict[str, str], bytes, float]


class Probe:
    """``POST /detect`` one after another until stopped: (sent, answered, status) of each."""

    def __init__(self, port: int, image: bytes) -> None:
        self.port, self.image = port, image
        self.answers: list[tuple[float, float, int]] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        headers = {"Content-Type": "image/jpeg"}
        while not self._stop.is_set():
            sent = time.monotonic()
            status, *_ = await http(self.port, "POST", "/detect", self.image, headers)
            self.answers.append((sent, time.monotonic(), status))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), PROBE_PAUSE_S)

    def stop(self) -> None:
        self._stop.set()

    def longest_gap_s(self, since: float, until: float) -> float:
        """Longest stretch of [since, until] without a 200 answered."""
        ok = sorted(done for _, done, status in self.answers if status == 200 and since <= done <= until)
        marks = [since, *ok, until]
        return round(max(b - a for a, b in pairwise(marks)), 2)

    def first_200_after(self, t: float) -> float | None:
        later = [done for _, done, status in self.answers if status == 200 and done >= t]
        return round(min(later) - t, 2) if later else None


async def abandon(port: int, tries: int = 20, wait_s: float = 2.0) -> tuple[float | None, list[int]]:
    """Send the large benchmark and leave once it is under way (no answer within ``wait_s``); a refusal is
    retried. (time.monotonic() when the client left or None, statuses of the refusals)."""
    refused = []
    for _ in range(tries):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(f"POST {LARGE} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), wait_s)
        except TimeoutError:
            writer.close()  # under way: the client goes away
            return time.monotonic(), refused
        refused.append(int(line.split()[1]) if line else 0)
        writer.close()
        await asyncio.sleep(0.5)
    return None, refused


async def persistent(port: int, hold_s: float) -> list[Answer]:
    """The large benchmark, retried every 0.5 s while refused (429), until served or ``hold_s`` passed."""
    answers: list[Answer] = []
    end = time.monotonic() + hold_s
    while True:
        answers.append(await http(port, "POST", LARGE))
        if answers[-1][0] != 429 or time.monotonic() > end:
            return answers
        await asyncio.sleep(0.5)


def benchmark_summary(answers: list[Answer]) -> dict[str, Any]:
    served = [json.loads(a[2]) for a in answers if a[0] == 200]
    return {
        "statuses": dict(sorted(Counter(str(a[0]) for a in answers).items())),
        "longest_answer_s": round(max((a[3] for a in answers), default=0.0), 2),
        "served": [{k: b.get(k) for k in ("iterations", "stopped", "seconds")} for b in served],
    }


async def attack(server: ServerProcess, quick: bool) -> dict[str, Any]:
    probe = Probe(server.port, BCCD_IMAGE.read_bytes())
    probing = asyncio.create_task(probe.run())
    await asyncio.sleep(1.0)
    steps: dict[str, Any] = {}
    start = time.monotonic()

    t0 = time.monotonic()
    few = "/v1/benchmark?iterations=3&warmup=0"
    concurrent = await asyncio.gather(*(http(server.port, "POST", few) for _ in range(3)))
    await asyncio.sleep(1.0)
    steps["concurrent"] = {**benchmark_summary(concurrent), "window": (t0, time.monotonic())}

    t0 = time.monotonic()
    left_at, refused = await abandon(server.port)
    await asyncio.sleep(RELEASE_LIMIT_S + 1)
    steps["abandoned"] = {
        "started": left_at is not None,
        "refused_first": refused,
        "window": (t0, time.monotonic()),
    }
    if left_at is not None:
        steps["abandoned"]["detect_200_after_client_left_s"] = probe.first_200_after(left_at)

    t0 = time.monotonic()
    hold_s = 15.0 if quick else 45.0
    rounds = await asyncio.gather(*(persistent(server.port, hold_s) for _ in range(6)))
    large = [a for r in rounds for a in r]
    await asyncio.sleep(1.0)
    steps["large"] = {**benchmark_summary(large), "window": (t0, time.monotonic())}

    probe.stop()
    await probing
    end = time.monotonic()
    for step in steps.values():
        since, until = step.pop("window")
        step["detect_longest_gap_s"] = probe.longest_gap_s(since, until)
        rss = [r for t, r, _ in server.samples if since <= t <= until]
        step["rss_peak_mb"] = round(max(rss, default=0) / 2**20)
    detect = Counter(str(status) for *_, status in probe.answers)
    benchmarks = concurrent + large
    return {
        "steps": steps,
        "detect_statuses": dict(sorted(detect.items())),
        "detect_longest_gap_s": probe.longest_gap_s(start, end),
        "unanswered": detect.get("0", 0) + sum(1 for a in benchmarks if a[0] == 0),
        "server_errors_5xx": sum(n for s, n in detect.items() if s.startswith("5"))
        + sum(1 for a in benchmarks if a[0] >= 500),
    }


def run(ctx: Context) -> dict[str, Any]:
    env = {"REFINEDET_ENABLE_BENCHMARK": "true", **ctx.env}
    budget_s = float(env.get("REFINEDET_BENCHMARK_MAX_S", 10.0))
    server = ServerProcess(ctx.port, env, ctx.work_dir / "server.log")
    try:
        server.wait_ready()
        time.sleep(1.0)
        idle_mb = round(server.rss() / 2**20)
        result = asyncio.run(attack(server, ctx.quick))
    finally:
        server.stop()
    gap_limit_s = budget_s + 10.0
    release = result["steps"]["abandoned"].get("detect_200_after_client_left_s")
    ok = (
        result["unanswered"] == 0
        and result["server_errors_5xx"] == 0
        and result["detect_longest_gap_s"] <= gap_limit_s
        and release is not None
        and release <= RELEASE_LIMIT_S
    )
    return {"ok": ok, "rss_idle_mb": idle_mb, "gap_limit_s": gap_limit_s, **result}

"""Closed-loop HTTP load generator (asyncio + aiohttp): ``concurrency`` workers each POST a JPEG, wait
for the answer, and POST the next, for ``warmup_s`` (not recorded) then ``duration_s`` (recorded).

What is recorded are the answers that *arrive* within the recorded window: requests/s is their count
over ``duration_s``, and the latencies are theirs. (Counting the requests *started* in the window, over
the time until the last of them was answered, made the rate depend on where the window fell in the
clients' cycle once a latency was a sizeable part of the window: at 16 clients and ~7 s per answer, one
app's 32 answers were divided by 27.8 s and the other's by 19.3 s.) Requests still open when the window
ends are awaited, so the next level starts on an idle server, but not counted.

Only loopback URLs are accepted, and every loop is bounded: by the deadline and by ``MAX_REQUESTS``
per worker. ``run_level`` can split the workers over several processes (one event loop each) so that
the client is not the bottleneck at high concurrency; the processes start at a common wall-clock time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_REQUESTS = 1_000_000  # per worker and level: a hard bound besides the deadline
REQUEST_TIMEOUT_S = 30.0


def check_loopback(url: str) -> str:
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the load generator only targets this machine (127.0.0.1), not {host!r}")
    return url


async def _worker(session, url: str, bodies: Sequence[bytes], first: int, window: tuple[float, float],
                  out: dict[str, Any]) -> None:  # fmt: skip
    """POST bodies round-robin from index ``first`` until the window ends; record the answers that arrive
    within it."""
    import aiohttp

    measure_from, end = window
    headers = {"Content-Type": "image/jpeg"}
    for i in range(MAX_REQUESTS):
        start = time.perf_counter()
        if start >= end:
            return
        error = None
        try:
            async with session.post(url, data=bodies[(first + i) % len(bodies)], headers=headers) as resp:
                payload = await resp.read()
                error = None if resp.status == 200 else f"HTTP {resp.status}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            error = type(exc).__name__
        finished = time.perf_counter()
        if not measure_from <= finished < end:
            continue
        if error is not None:
            out["errors"][error] += 1
            continue
        out["latencies_ms"].append((finished - start) * 1e3)
        out["detections"] += len(json.loads(payload).get("detections", ()))


async def run_workers(url: str, bodies: Sequence[bytes], concurrency: int, duration_s: float,
                      warmup_s: float, start_at: float | None = None, offset: int = 0) -> dict[str, Any]:  # fmt: skip
    """One event loop's share of a level; ``start_at`` is a ``time.time()`` to begin at (None: now)."""
    import aiohttp

    check_loopback(url)
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
    out: dict[str, Any] = {"latencies_ms": [], "errors": Counter(), "detections": 0}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        now = time.perf_counter()
        window = (now + warmup_s, now + warmup_s + duration_s)
        workers = [_worker(session, url, bodies, offset + 7 * k, window, out) for k in range(concurrency)]
        await asyncio.gather(*workers)
        out["elapsed_s"] = duration_s  # the recorded window: answers are counted as they arrive in it
    out["errors"] = dict(out["errors"])
    return out


def _run_in_process(args: tuple) -> dict[str, Any]:
    return _run_loop(run_workers(*args))


def _run_loop(coro) -> dict[str, Any]:
    """Run on uvloop where it is installed (a faster client), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    runner = getattr(uvloop, "run", None)  # uvloop >= 0.18
    return runner(coro) if runner else asyncio.run(coro)


def split(concurrency: int, processes: int) -> list[int]:
    """Workers per process: as even as possible, no empty process."""
    n = max(1, min(processes, concurrency))
    return [concurrency // n + (1 if k < concurrency % n else 0) for k in range(n)]


def run_level(url: str, bodies: Sequence[bytes], concurrency: int, duration_s: float, warmup_s: float,
              processes: int = 1) -> dict[str, Any]:  # fmt: skip
    """One concurrency level -> {concurrency, requests_per_s, latency_ms {p50,p90,p99,mean}, ok, errors...}."""
    check_loopback(url)
    shares = split(concurrency, processes)
    if len(shares) == 1:
        parts = [_run_loop(run_workers(url, bodies, concurrency, duration_s, warmup_s))]
    else:
        start_at = time.time() + 1.5  # spawned processes import aiohttp first
        jobs = [(url, bodies, c, duration_s, warmup_s, start_at, 1000 * k) for k, c in enumerate(shares)]
        with ProcessPoolExecutor(len(shares), mp_context=get_context("spawn")) as pool:
            parts = list(pool.map(_run_in_process, jobs))
    return {**combine(concurrency, parts), "parts": parts}


def combine_rounds(levels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several ``run_level`` results of one concurrency level, taken one after another (rounds) -> one
    level: latencies pooled, elapsed times summed."""
    parts = [p for level in levels for p in level["parts"]]
    combined = combine(levels[0]["concurrency"], parts)
    elapsed = sum(max(p["elapsed_s"] for p in level["parts"]) for level in levels)
    combined["elapsed_s"] = round(elapsed, 3)
    combined["requests_per_s"] = round(combined["ok"] / elapsed, 2) if elapsed > 0 else 0.0
    combined["rounds"] = len(levels)
    return combined


def latency_summary(values_ms: Sequence[float]) -> dict[str, float | None]:
    """{p50, p90, p99, mean} in ms (``service.benchmark.percentiles``); None values when empty."""
    from service.benchmark import percentiles

    if not values_ms:
        return dict.fromkeys(("p50", "p90", "p99", "mean"))
    return dict(percentiles(list(values_ms)))


def combine(concurrency: int, parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    latencies = [x for p in parts for x in p["latencies_ms"]]
    errors: Counter = Counter()
    for p in parts:
        errors.update(p["errors"])
    elapsed = max(p["elapsed_s"] for p in parts)
    ok = len(latencies)
    return {
        "concurrency": concurrency,
        "ok": ok,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(ok / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": latency_summary(latencies),
        "detections_per_response": round(sum(p["detections"] for p in parts) / ok, 2) if ok else None,
    }

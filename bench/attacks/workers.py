"""Several workers (issue #25, finding 5): ``refinedet serve`` with ``REFINEDET_WORKERS=2`` on the CPU.

- ``metrics``: ``requests`` ``POST /detect`` (4 at a time), then 12 scrapes of ``/metrics``: every scrape
  must count exactly the requests the client sent, ``/detect`` by status, and the scrapes before it (the
  client's own counts; a scrape is counted once it is answered, so scrape i sees i scrapes before it).
- ``sigterm``: 16 ``POST /detect`` in flight, SIGTERM to the server, then 8 new connections, one every
  100 ms: the requests in flight must be answered (a result or 503 ``shutting_down``), and every new
  connection answered (200, or 503 JSON) or refused by TCP, never accepted and then reset or closed
  unanswered.
- ``sigkill``: 3 clients, each sending ``POST /detect`` on a new connection as soon as it has its last
  answer, while one worker is SIGKILLed, until 3 s after the replacement logged its model loaded: every
  connection opened after the kill must be answered (the other worker serves; the replacement takes
  connections only once its model is loaded: no 503 ``not_ready``), and the replacement must come up
  (the server keeps its two workers). Requests that were inside the killed process when it died are
  reported apart (a SIGKILL loses them by definition).

``ok`` when the scrapes equal the client's counts, there are 0 resets or unanswered connections after the
SIGTERM, and after the SIGKILL 0 connections lost (reset, closed, refused) and 0 ``not_ready``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.attacks import Context
from bench.soak import BCCD_IMAGE, ServerProcess, http, is_json_error

NAME = "workers"
HELP = "WORKERS=2: /metrics equals the client's counts; SIGTERM and a SIGKILLed worker lose nothing"
WORKERS = 2
JPEG = {"Content-Type": "image/jpeg"}


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the workers of a supervisor)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            found.append(int(entry.name))
    return sorted(found)


def workers_of(server: ServerProcess) -> list[int]:
    """The serving workers (multiprocessing's resource tracker, if any, left out)."""
    pids = []
    for pid in children(server.proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


def start(ctx: Context, name: str, port: int, env: dict[str, str] | None = None) -> ServerProcess:
    """A 2-worker server, once /readyz said 200 twenty times in a row (both workers loaded, whichever
    answers)."""
    full_env = {**ctx.env, "REFINEDET_WORKERS": str(WORKERS), **(env or {})}
    server = ServerProcess(port, full_env, ctx.work_dir / f"{name}_server.log")
    server.wait_ready()
    streak, deadline = 0, time.monotonic() + 300
    while streak < 20 and time.monotonic() < deadline:
        streak = streak + 1 if asyncio.run(http(port, "GET", "/readyz"))[0] == 200 else 0
    return server


def outcome(answer: tuple[int, dict[str, str], bytes, float]) -> str:
    """What became of one connection: its status (and error code: ``503 overloaded``), ``refused`` (TCP),
    ``reset``, ``closed`` (accepted, then closed without an answer) or another client error."""
    status, headers = answer[0], answer[1]
    if status == 200:
        return "200"
    if status:
        try:
            return f"{status} {json.loads(answer[2])['error']['code']}"
        except (ValueError, KeyError, TypeError):
            return str(status)
    error = headers.get("x-client-error", "?")
    return {
        "ConnectionRefusedError": "refused",
        "ConnectionResetError": "reset",
        "BrokenPipeError": "reset",
        "IndexError": "closed",
    }.get(error, error)


def spans(events: list[tuple[float, str]]) -> dict[str, list[float]]:
    """Each outcome other than 200: [first, last] seconds (after the kill) it was seen."""
    seen: dict[str, list[float]] = {}
    for t, what in events:
        if what != "200":
            first_last = seen.setdefault(what, [round(t, 2), round(t, 2)])
            first_last[1] = round(t, 2)
    return seen


def counted(text: str) -> dict[str, float]:
    """``refinedet_http_requests_total`` by "route status" from a scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "refinedet_http_requests_total":
                key = f"{sample.labels['route']} {sample.labels['status']}"
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def phase_metrics(ctx: Context, port: int, image: bytes, requests: int) -> dict[str, Any]:
    server = start(ctx, "metrics", port)
    try:

        async def send() -> list:
            gate = asyncio.Semaphore(4)

            async def one() -> tuple:
                async with gate:
                    return await http(port, "POST", "/detect", image, JPEG)

            return await asyncio.gather(*(one() for _ in range(requests)))

        sent = Counter(str(a[0]) for a in asyncio.run(send()))
        scrapes: list[dict[str, Any]] = []
        for i in range(12):
            answer = asyncio.run(http(port, "GET", "/metrics"))
            totals = counted(answer[2].decode()) if answer[0] == 200 else {}
            detect = {k.split()[1]: v for k, v in totals.items() if k.startswith("/detect ")}
            scrapes.append(
                {"detect": detect, "metrics": totals.get("/metrics 200", 0), "expected_metrics": i}
            )
    finally:
        server.stop()
    equal = [s["detect"] == dict(sent) and s["metrics"] == s["expected_metrics"] for s in scrapes]
    return {
        "sent": dict(sent),
        "scraped_detect_totals": [sum(s["detect"].values()) for s in scrapes],
        "scraped_metrics_totals": [s["metrics"] for s in scrapes],
        "scrapes_equal": sum(equal),
        "ok": all(equal),
    }


def phase_sigterm(
    ctx: Context, port: int, image: bytes, in_flight: int = 16, after: int = 8
) -> dict[str, Any]:
    env = {"REFINEDET_REQUEST_TIMEOUT_S": "60", "REFINEDET_GRACEFUL_TIMEOUT_S": "10"}
    server = start(ctx, "sigterm", port, env)

    async def attack() -> tuple[list, list]:
        loaded = [asyncio.ensure_future(http(port, "POST", "/detect", image, JPEG)) for _ in range(in_flight)]
        await asyncio.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        late = []
        for _ in range(after):
            await asyncio.sleep(0.1)
            late.append(asyncio.ensure_future(http(port, "POST", "/detect", image, JPEG)))
        return await asyncio.gather(*loaded), await asyncio.gather(*late)

    try:
        loaded, late = asyncio.run(attack())
    finally:
        code = server.stop()
    late_outcomes = Counter(outcome(a) for a in late)
    bad_late = sum(
        n for k, n in late_outcomes.items() if not (k in ("refused", "200") or k.startswith("503 "))
    )
    non_json = sum(1 for a in loaded + late if a[0] not in (0, 200) and not is_json_error(a))
    unanswered = sum(1 for a in loaded if a[0] == 0)
    return {
        "in_flight": dict(Counter(outcome(a) for a in loaded)),
        "after_signal": dict(late_outcomes),
        "resets_after_signal": late_outcomes.get("reset", 0),
        "non_json_answers": non_json,
        "exit_code": code,
        "ok": bad_late == 0 and unanswered == 0 and non_json == 0,
    }


def phase_sigkill(
    ctx: Context, port: int, image: bytes, clients: int = 3, after_ready_s: float = 3.0
) -> dict[str, Any]:
    server = start(ctx, "sigkill", port)
    log_path = ctx.work_dir / "sigkill_server.log"
    victim = workers_of(server)[0]
    before = set(workers_of(server))

    def loads() -> int:
        server.log.flush()
        return log_path.read_text().count('"message": "ready: ')

    async def attack() -> tuple[list, float, float | None]:
        answers: list[tuple[float, tuple]] = []
        stop_at, killed_at, replaced_in = time.perf_counter() + 90, 0.0, None

        async def client() -> None:
            while time.perf_counter() < stop_at:
                opened = time.perf_counter()
                answers.append((opened, await http(port, "POST", "/detect", image, JPEG)))

        running = [asyncio.ensure_future(client()) for _ in range(clients)]
        await asyncio.sleep(1.5)
        loaded = loads()
        os.kill(victim, signal.SIGKILL)
        killed_at = time.perf_counter()
        while time.perf_counter() < stop_at and replaced_in is None:
            await asyncio.sleep(0.1)
            if loads() > loaded:  # the replacement's model is loaded: a few seconds more, then stop
                replaced_in = time.perf_counter() - killed_at
                stop_at = time.perf_counter() + after_ready_s
        await asyncio.gather(*running)
        return answers, killed_at, replaced_in

    try:
        answers, killed_at, replaced_in = asyncio.run(attack())
        replaced_by = set(workers_of(server)) - before
        workers_after = len(workers_of(server))
    finally:
        code = server.stop()
    opened_after = [a for t, a in answers if t >= killed_at]
    # In flight at the kill: opened before it, ended after it (some were inside the killed worker).
    in_flight = [a for t, a in answers if t < killed_at and t + a[3] >= killed_at]
    after = Counter(outcome(a) for a in opened_after)
    lost = sum(1 for a in opened_after if a[0] == 0)
    not_ready = after.get("503 not_ready", 0)
    return {
        "clients": clients,
        "replacement_loaded_after_s": round(replaced_in, 1) if replaced_in is not None else None,
        "opened_after_kill": dict(after),
        "lost_after_kill": lost,
        "not_ready_after_kill": not_ready,
        "non_200_after_kill_s": spans([(t - killed_at, outcome(a)) for t, a in answers if t >= killed_at]),
        "in_flight_at_kill": dict(Counter(outcome(a) for a in in_flight)),
        "workers_after": workers_after,
        "exit_code": code,
        "ok": lost == 0 and not_ready == 0 and bool(replaced_by) and workers_after == WORKERS,
    }


def run(ctx: Context) -> dict[str, Any]:
    image = BCCD_IMAGE.read_bytes()
    requests = 12 if ctx.quick else 40
    result: dict[str, Any] = {
        "metrics": phase_metrics(ctx, ctx.port, image, requests),
        "sigterm": phase_sigterm(ctx, ctx.port + 1, image),
        "sigkill": phase_sigkill(ctx, ctx.port + 2, image, after_ready_s=1.0 if ctx.quick else 3.0),
    }
    result["ok"] = all(part["ok"] for part in list(result.values()))
    return result

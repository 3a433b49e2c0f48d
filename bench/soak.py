"""Bounded soak of the service under overload, shutdown and hostile clients (issue 13), on 127.0.0.1 only.

Starts ``refinedet serve`` (``python -m refinedet serve``) as a subprocess, runs each phase against it,
samples the server's RSS (``/proc/<pid>/status``) and open sockets (``/proc/<pid>/fd``) every 20 ms, and
prints a table and writes JSON:

- ``load``: ``waves`` waves of ``clients`` concurrent ``POST /detect`` (a BCCD JPEG): 200/503/504/other
  counts, 503 and 200 latency (each from the request's start: connecting included), the 503s' time to
  connect and from the request written to the answer read, non-JSON answers.
- ``pixels``: ``bombs`` concurrent single-colour 6300x6300 PNGs (39.7 MP, 38 KB each): statuses, peak and
  after RSS over the idle baseline.
- ``headers``: 8 connections each sending up to 64 MiB of header bytes: statuses, RSS.
- ``idle``: 1,500 connections that send nothing: how many the server answered 503 (over its cap) and
  how many it still holds open after the header timeout.
- ``refusals``: a server that refuses every request (0.1 s deadline): one wave of ``clients``, the server's
  and the client's CPU seconds over it (what a refusal costs, apart from waiting for a CPU).
- ``shutdown``: a second server with ``REQUEST_TIMEOUT_S=120`` and a short graceful timeout; 32 concurrent
  requests (4 of them uploading slowly across the signal), SIGTERM after ``signal_after_s``: every answer
  by status, and whether any was not the JSON error format.

Every phase is bounded in requests and time (client timeout 90 s; the whole run a few minutes).

    python -m bench.soak --out /tmp/harden/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
BCCD_IMAGE = Path("/work/shared/data/BCCD/JPEGImages/BloodImage_00000.jpg")
CLIENT_TIMEOUT_S = 90.0


async def http(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
               slow_s: float = 0.0) -> tuple[int, dict[str, str], bytes, float]:  # fmt: skip
    """One request on a new connection: (status, headers, body, seconds); status 0 if no answer came."""
    start = time.perf_counter()
    head = {"Host": HOST, "Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    raw = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(HOST, port)
            connected = time.perf_counter() - start
            writer.write(raw.encode())
            if slow_s:  # the body in 8 pieces over slow_s seconds
                step = max(1, len(body) // 8)
                for i in range(0, len(body), step):
                    writer.write(body[i : i + step])
                    await writer.drain()
                    await asyncio.sleep(slow_s / 8)
            else:
                writer.write(body)
            await writer.drain()
            sent = time.perf_counter() - start
            status_line = await reader.readline()
            got: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                got[name.strip().lower()] = value.strip()
            data = await reader.read()
            writer.close()
        got["x-client-connect-s"], got["x-client-sent-s"] = str(connected), str(sent)
        return int(status_line.split()[1]), got, data, time.perf_counter() - start
    except (OSError, IndexError, ValueError, TimeoutError) as exc:
        return 0, {"x-client-error": type(exc).__name__}, b"", time.perf_counter() - start


def is_json_error(answer: tuple[int, dict[str, str], bytes, float]) -> bool:
    try:
        return "code" in json.loads(answer[2])["error"]
    except (ValueError, KeyError, TypeError):
        return False


class ServerProcess:
    """``refinedet serve`` in a subprocess, with its RSS and open sockets sampled every 20 ms."""

    def __init__(self, port: int, env: dict[str, str], log_path: Path) -> None:
        self.port = port
        full_env = {**os.environ, "REFINEDET_PORT": str(port), "REFINEDET_HOST": HOST, **env}
        self.log = log_path.open("w")
        cmd = [sys.executable, "-m", "refinedet", "serve", "--device", "cpu"]
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        self.samples: list[tuple[float, int, int]] = []  # (time, rss bytes, open sockets)
        self._stop = threading.Event()

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log.name}")
            if asyncio.run(http(self.port, "GET", "/readyz"))[0] == 200:
                threading.Thread(target=self._sample, daemon=True).start()
                return
            time.sleep(0.5)
        raise RuntimeError("the server did not become ready")

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def sockets(self) -> int:
        count = 0
        for fd in Path(f"/proc/{self.proc.pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                count += os.readlink(fd).startswith("socket:")
        return count

    def _sample(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            try:
                self.samples.append((time.monotonic(), self.rss(), self.sockets()))
            except (OSError, ValueError):
                break
            time.sleep(0.02)

    def window(self, since: float) -> dict[str, float]:
        rows = [s for s in self.samples if s[0] >= since] or self.samples[-1:]
        return {"rss_peak_mb": max(r for _, r, _ in rows) / 2**20, "sockets_peak": max(n for *_, n in rows)}

    def stop(self) -> int:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        self.log.close()
        return code


def latency(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p90_ms": None}
    q = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
    return {"p50_ms": round(statistics.median(values) * 1e3, 1), "p90_ms": round(q[8] * 1e3, 1)}


def summarise(answers: list[tuple[int, dict[str, str], bytes, float]]) -> dict[str, Any]:
    statuses = Counter(a[0] for a in answers)
    errors = Counter(a[1].get("x-client-error") for a in answers if a[0] == 0)
    return {
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "no_answer": dict(errors),
        "non_json_errors": sum(1 for a in answers if a[0] != 200 and not is_json_error(a)),
        "latency_200": latency([a[3] for a in answers if a[0] == 200]),
        "latency_503": latency([a[3] for a in answers if a[0] == 503]),
        "latency_503_connect": latency([float(a[1]["x-client-connect-s"]) for a in answers if a[0] == 503]),
        "latency_503_sent": latency([float(a[1]["x-client-sent-s"]) for a in answers if a[0] == 503]),
        # From the request written to the answer read: without the time this one process took to open
        # the other connections of its wave before writing (the load generator's own queue).
        "latency_503_after_sent": latency(
            [a[3] - float(a[1]["x-client-sent-s"]) for a in answers if a[0] == 503]
        ),
    }


async def wave(port: int, clients: int, body: bytes, content_type: str) -> list:
    headers = {"Content-Type": content_type}
    return await asyncio.gather(*(http(port, "POST", "/detect", body, headers) for _ in range(clients)))


def server_latency(log_path: Path, since: float, until: float, status: int) -> dict[str, float | None]:
    """Latency of ``/detect`` answers with ``status`` as the server logged it (from the app's call)."""
    from datetime import datetime

    values = []
    for line in log_path.read_text().splitlines():
        if '"event": "access"' not in line:
            continue
        entry = json.loads(line)
        ts = datetime.fromisoformat(entry["ts"]).timestamp()
        if entry["path"] == "/detect" and entry["status"] == status and since <= ts <= until:
            values.append(entry["duration_ms"] / 1e3)
    return latency(values)


def phase_load(server: ServerProcess, clients: int, waves: int, image: bytes) -> dict[str, Any]:
    since, wall, answers = time.monotonic(), time.time(), []
    for _ in range(waves):
        answers += asyncio.run(wave(server.port, clients, image, "image/jpeg"))
    server.log.flush()
    server_side = server_latency(Path(server.log.name), wall, time.time() + 1, 503)
    return {"clients": clients, "waves": waves, **summarise(answers),
            "server_latency_503": server_side, **server.window(since)}  # fmt: skip


def phase_pixels(server: ServerProcess, bombs: int, baseline: int) -> dict[str, Any]:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (6300, 6300), (180, 40, 40)).save(out, format="PNG", optimize=True)
    since = time.monotonic()
    answers = asyncio.run(wave(server.port, bombs, out.getvalue(), "image/png"))
    settle = time.monotonic()
    while time.monotonic() - settle < 2.0:  # let the last responses' memory go
        time.sleep(0.1)
    window = server.window(since)
    return {
        "uploads": bombs, "png_bytes": len(out.getvalue()), **summarise(answers), **window,
        "rss_peak_over_baseline_mb": round(window["rss_peak_mb"] - baseline / 2**20, 1),
        "rss_after_over_baseline_mb": round((server.rss() - baseline) / 2**20, 1),
    }  # fmt: skip


async def flood_headers(port: int, connections: int, megabytes: int) -> list[int]:
    async def one() -> int:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Flood: ")
            for _ in range(megabytes):
                writer.write(b"a" * 2**20)
                await writer.drain()
        except OSError:
            pass
        try:
            line = await asyncio.wait_for(reader.readline(), 15)
            writer.close()
            return int(line.split()[1]) if line else 0
        except (OSError, IndexError, TimeoutError):
            return 0

    return await asyncio.gather(*(one() for _ in range(connections)))


def phase_headers(server: ServerProcess, baseline: int) -> dict[str, Any]:
    since = time.monotonic()
    statuses = asyncio.run(flood_headers(server.port, 8, 64))
    window = server.window(since)
    return {"connections": 8, "statuses": dict(Counter(map(str, statuses))), **window,
            "rss_peak_over_baseline_mb": round(window["rss_peak_mb"] - baseline / 2**20, 1)}  # fmt: skip


async def idle_connections(port: int, count: int, hold_s: float) -> dict[str, int]:
    socks, refused = [], 0
    for _ in range(count):
        try:
            socks.append(await asyncio.open_connection(HOST, port))
        except OSError:
            refused += 1
    answered_503 = closed = 0
    deadline = time.monotonic() + hold_s
    for reader, _ in socks:
        try:
            line = await asyncio.wait_for(reader.readline(), max(0.01, deadline - time.monotonic()))
            answered_503 += line.startswith(b"HTTP/1.1 503")
            closed += 1
        except TimeoutError:
            pass
        except OSError:
            closed += 1
    for _, writer in socks:
        writer.close()
    return {"opened": len(socks), "not_accepted": refused, "answered_503": answered_503,
            "closed_by_server": closed, "still_open": len(socks) - closed}  # fmt: skip


def phase_idle(server: ServerProcess, count: int, hold_s: float) -> dict[str, Any]:
    since = time.monotonic()
    result = asyncio.run(idle_connections(server.port, count, hold_s))
    return {"connections": count, "held_s": hold_s, **result, **server.window(since)}


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, timeout_s: float = 15.0) -> None:
    """Until the process used under 10 ms of CPU in half a second (its last batch is done), bounded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = process_cpu_s(pid)
        time.sleep(0.5)
        if process_cpu_s(pid) - before < 0.01:
            return


def phase_refusals(port: int, log_dir: Path, image: bytes, clients: int) -> dict[str, Any]:
    """What a refusal costs the server: a server whose every request is refused (a 0.1 s deadline, one
    queue place), one wave of ``clients``; server and client CPU seconds over the wave."""
    env = {"REFINEDET_REQUEST_TIMEOUT_S": "0.1", "REFINEDET_MAX_QUEUE_SIZE": "1"}
    server = ServerProcess(port, env, log_dir / "soak_refusals_server.log")
    try:
        server.wait_ready()
        asyncio.run(wave(port, 4, image, "image/jpeg"))  # a batch: the recent batch time is known
        wait_idle(server.proc.pid)
        cpu, client_cpu, wall = process_cpu_s(server.proc.pid), time.process_time(), time.perf_counter()
        answers = asyncio.run(wave(port, clients, image, "image/jpeg"))
        cpu, client_cpu = process_cpu_s(server.proc.pid) - cpu, time.process_time() - client_cpu
        wall = time.perf_counter() - wall
    finally:
        server.stop()
    return {"clients": clients, **summarise(answers), "server_cpu_s": round(cpu, 3),
            "server_cpu_per_request_ms": round(cpu / clients * 1e3, 3), "client_cpu_s": round(client_cpu, 3),
            "wall_s": round(wall, 3)}  # fmt: skip


def phase_shutdown(port: int, log_dir: Path, image: bytes, grace_s: float, after_s: float) -> dict[str, Any]:
    env = {"REFINEDET_REQUEST_TIMEOUT_S": "120", "REFINEDET_GRACEFUL_TIMEOUT_S": str(grace_s)}
    server = ServerProcess(port, env, log_dir / "soak_shutdown_server.log")
    server.wait_ready()

    async def run() -> list:
        headers = {"Content-Type": "image/jpeg"}
        fast = [http(port, "POST", "/detect", image, headers) for _ in range(28)]
        slow = [http(port, "POST", "/detect", image, headers, slow_s=2 * after_s) for _ in range(4)]
        tasks = [asyncio.ensure_future(c) for c in fast + slow]
        await asyncio.sleep(after_s)
        signalled = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        answers = await asyncio.gather(*tasks)
        return [(*a, signalled) for a in answers]

    answers = asyncio.run(run())
    code = server.stop()
    log_lines = (log_dir / "soak_shutdown_server.log").read_text().splitlines()
    started = next((i for i, line in enumerate(log_lines) if "Started server process" in line), 0)
    non_json_log = [line for line in log_lines[started:] if line.strip() and not line.startswith("{")]
    return {"requests": 32, "graceful_timeout_s": grace_s, "signal_after_s": after_s, "exit_code": code,
            **summarise([a[:4] for a in answers]),
            "non_json_log_lines_after_start": len(non_json_log)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=18150)
    p.add_argument("--clients", type=int, default=400)
    p.add_argument("--waves", type=int, default=3)
    p.add_argument("--bombs", type=int, default=16)
    p.add_argument("--idle", type=int, default=1500)
    p.add_argument("--shutdown-grace-s", type=float, default=5.0)
    p.add_argument("--signal-after-s", type=float, default=3.0)
    p.add_argument("--phases", default="load,pixels,headers,idle,refusals,shutdown")
    p.add_argument("--out", type=Path, default=Path("/tmp/harden/soak.json"))
    args = p.parse_args(argv)
    phases = set(args.phases.split(","))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image = BCCD_IMAGE.read_bytes()
    report: dict[str, Any] = {"command": " ".join(sys.argv), "cpus": os.cpu_count()}
    server = ServerProcess(args.port, {}, args.out.parent / "soak_server.log")
    try:
        server.wait_ready()
        asyncio.run(wave(server.port, 4, image, "image/jpeg"))  # warm
        baseline = server.rss()
        report["baseline_rss_mb"] = round(baseline / 2**20, 1)
        if "load" in phases:
            report["load"] = phase_load(server, args.clients, args.waves, image)
        if "pixels" in phases:
            report["pixels"] = phase_pixels(server, args.bombs, baseline)
        if "headers" in phases:
            report["headers"] = phase_headers(server, baseline)
        if "idle" in phases:
            report["idle"] = phase_idle(server, args.idle, hold_s=13.0)
        report["overall"] = server.window(0.0)
    finally:
        server.stop()
    if "refusals" in phases:
        report["refusals"] = phase_refusals(args.port + 2, args.out.parent, image, args.clients)
    if "shutdown" in phases:
        report["shutdown"] = phase_shutdown(
            args.port + 1, args.out.parent, image, args.shutdown_grace_s, args.signal_after_s
        )
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten {args.out}")
    return 0


def print_table(report: dict[str, Any]) -> None:
    print(
        f"baseline RSS {report.get('baseline_rss_mb')} MB, peak {report.get('overall', {}).get('rss_peak_mb', 0):.0f} MB"
    )
    for name in ("load", "pixels", "headers", "idle", "refusals", "shutdown"):
        if name not in report:
            continue
        row = report[name]
        keys = [k for k in row if not isinstance(row[k], dict)]
        nested = [k for k in row if isinstance(row[k], dict)]
        print(
            f"\n[{name}] "
            + ", ".join(f"{k}={row[k]:.1f}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys)
        )
        for k in nested:
            print(f"    {k}: {row[k]}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())

"""Starting and stopping the servers the service benchmark measures, on 127.0.0.1 and a free port.

``running(command, env, log_path)`` starts the command (its output into ``log_path``), waits until
``GET /readyz`` answers 200 and, with ``ready_marker``, until the log has ``ready_count`` lines holding
it (with several uvicorn workers each loads its own model, and /readyz is answered by whichever worker
takes the connection), yields the base URL, and stops the process it started (SIGTERM, then SIGKILL
after a grace period). ``{port}`` in the command is replaced by the chosen port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.common import REPO_ROOT
from model.errors import UserError

HOST = "127.0.0.1"


def free_port(ports: str | None = None) -> int:
    """A free port on 127.0.0.1: any (the kernel's choice), or the first free one of ``ports``
    ("LOW-HIGH", default env ``REFINEDET_BENCH_PORTS``) where only a range may be used."""
    ports = ports if ports is not None else os.environ.get("REFINEDET_BENCH_PORTS", "")
    if not ports.strip():
        candidates = [0]
    else:
        low, sep, high = ports.partition("-")
        try:
            candidates = list(range(int(low), int(high if sep else low) + 1))
        except ValueError:
            raise UserError(f"REFINEDET_BENCH_PORTS takes LOW-HIGH, got {ports!r}") from None
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise UserError(f"no free port in {ports} on {HOST}")


def refinedet_command() -> list[str]:
    """``refinedet`` if it is on PATH, else the same entry point through this Python."""
    exe = shutil.which("refinedet")
    return [exe] if exe else [sys.executable, "-m", "refinedet"]


def server_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment, with the repository importable and ``extra`` (REFINEDET_* settings) added."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (urllib.error.URLError, OSError):
        return 0, b""


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready(
    proc: subprocess.Popen,
    url: str,
    timeout_s: float,
    log_path: Path,
    marker: str | None = None,
    count: int = 1,
    log_offset: int = 0,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the server exited with code {proc.returncode}:\n{tail(log_path)}")
        if get(f"{url}/readyz")[0] == 200 and (
            marker is None or _log_count(log_path, marker, log_offset) >= count
        ):
            return
        time.sleep(0.25)
    raise UserError(f"the server was not ready after {timeout_s:.0f} s:\n{tail(log_path)}")


def _log_count(log_path: Path, marker: str, offset: int) -> int:
    """Lines of the log written after byte ``offset`` that contain ``marker``."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        return sum(marker.encode() in line for line in log)


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM, SIGKILL after ``grace_s``; then whatever is left of the process group it leads (``running``
    starts each server in its own session: LitServe's worker processes, uvicorn's) is killed too."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group of the server we started (pgid == its pid)


@contextlib.contextmanager
def running(
    command: Sequence[str],
    env: dict[str, str],
    log_path: Path,
    ready_timeout_s: float = 300.0,
    ready_marker: str | None = None,
    ready_count: int = 1,
) -> Iterator[str]:
    port = free_port()
    argv = [part.replace("{port}", str(port)) for part in command]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(
            argv, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://{HOST}:{port}"
    try:
        wait_ready(proc, url, ready_timeout_s, log_path, ready_marker, ready_count, offset)
        yield url
    finally:
        stop(proc)


def batch_counters(url: str) -> tuple[float, float] | None:
    """(images run, batches run) from the service's Prometheus metrics; None if it has none."""
    status, body = get(f"{url}/metrics")
    if status != 200:
        return None
    values = {}
    for line in body.decode(errors="replace").splitlines():
        name, _, value = line.partition(" ")
        if name in ("refinedet_batch_size_sum", "refinedet_batch_size_count"):
            values[name] = float(value)
    if len(values) != 2:
        return None
    return values["refinedet_batch_size_sum"], values["refinedet_batch_size_count"]

"""Issue #25, finding 4: a cache fault must not become permanent. Restarts ``refinedet serve --device cpu``
(the shipped model) on a CPU engine cache after each fault and asks ``GET /v1/model`` what it serves:

- ``build``: a healthy cache (a copy of ``/tmp/fs-cache`` when there is one, else empty: ~45 s of export);
  what it serves is the fastest engine, the reference for the rest;
- ``truncate`` / ``flip``: the served INT8 model cut in half / one bit flipped; the 1st restart must
  serve the reference engine again (rebuilt), the 2nd from the cache without rebuilding;
- ``copy``: the cache copied elsewhere, the original moved away: served from the copy;
- ``read_only``: the copy mounted read-only serves the reference engine; an empty read-only cache serves
  torch with the cause in one log line (``mount``: needs root; else reported as skipped);
- ``full_disk``: a tmpfs too small for the INT8 model (the FP32 export seeded): a provisional choice, one
  log line with the cause; after the tmpfs grows (space returns), the next start serves the reference
  engine again;
- ``killed_export``: the INT8 model removed, the start's ``refinedet export cpu`` killed while it
  rebuilds it (torch serves meanwhile): its ``.tmp`` is left; the next start removes it and serves the
  reference engine again.

Starts that decide (``build`` from a version-3 cache, ``full_disk``) take 0.5-4 min each on 2 cores:
the phase took 3.5 min on a quiet machine, up to 17 min loaded; ``--quick`` leaves out ``full_disk``.

Each start reports the engine, its first request's latency (``p50_ms`` of a few sequential ``/detect``) and
its start time. ``python -m bench.attacks --phases cache --port 18400 --out /tmp/h-cache/attacks.json``
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.attacks import Context
from bench.soak import BCCD_IMAGE, ServerProcess, http

NAME = "cache"
HELP = "CPU engine cache faults (corrupt INT8, copied, read-only, full disk, killed export) heal on restart"
WARM_CACHE = Path("/tmp/fs-cache")  # another run's CPU engine cache, copied (never changed)


def run(ctx: Context) -> dict[str, Any]:
    work = ctx.work_dir
    for leftover in ("cache", "copy", "copy.ro", "empty.ro", "full"):
        _unmount(work / leftover)
        shutil.rmtree(work / leftover, ignore_errors=True)
    attack = _Attack(ctx)
    cache = work / "cache"
    if WARM_CACHE.is_dir():
        shutil.copytree(WARM_CACHE, cache)
    build = attack.start("build", cache)
    ref = build["engine"]
    result: dict[str, Any] = {"reference_engine": ref, "build": build}
    for damage in ("truncate", "flip"):
        _damage(_served_file(build), damage)
        first, second = attack.start(f"{damage}_1", cache), attack.start(f"{damage}_2", cache)
        result[damage] = {"restart_1": first, "restart_2": second,
                          "ok": first["engine"] == second["engine"] == ref and not second["rebuilt"]}  # fmt: skip
    result["copy"] = attack.copied(cache, ref)
    result["read_only"] = attack.read_only(work / "copy", ref)
    result["full_disk"] = {"ok": None, "skipped": "--quick"} if ctx.quick else attack.full_disk(cache, ref)
    result["killed_export"] = attack.killed_export(cache, ref)
    checks = [
        result[k]["ok"] for k in ("truncate", "flip", "copy", "read_only", "full_disk", "killed_export")
    ]
    result["ok"] = ref.endswith("-int8") and all(c is not False for c in checks)
    return result


class _Attack:
    """Starts servers on one port after another, each on the cache a step gives it."""

    def __init__(self, ctx: Context) -> None:
        self.ctx, self.port = ctx, ctx.port
        self.image = BCCD_IMAGE.read_bytes()

    def start(self, name: str, cache: Path, during: Any = None) -> dict[str, Any]:
        """One server on ``cache``: what it serves, how fast, what its log says about the CPU engine;
        ``during(server)`` runs while it starts."""
        log = self.ctx.work_dir / f"{name}.log"
        began = time.monotonic()
        server = ServerProcess(self.port, {**self.ctx.env, "REFINEDET_CACHE_DIR": str(cache)}, log)
        try:
            if during is not None:
                during(server)
            server.wait_ready(timeout_s=900)
            ready_s = round(time.monotonic() - began, 1)
            info = json.loads(asyncio.run(http(self.port, "GET", "/v1/model"))[2])
            p50 = self._p50_ms()
        finally:
            server.stop()
        lines = _engine_lines(log)
        served = re.search(r'"serving \w+ (\S+) (?:with|\()', log.read_text(errors="replace"))
        return {"engine": _engine(info), "artifact": served[1] if served else None, "ready_s": ready_s, "p50_ms": p50,
                "rebuilt": any("building it again" in line or "the very file" in line for line in lines),
                "decided": "against the checkpoint on" in log.read_text(errors="replace"),  # checked anew
                "warnings": [line for line in lines if line.startswith("WARNING")]}  # fmt: skip

    def _p50_ms(self, count: int = 5) -> float:
        headers = {"Content-Type": "image/jpeg"}
        times = [
            asyncio.run(http(self.port, "POST", "/detect", self.image, headers))[3] for _ in range(count + 1)
        ]
        return round(statistics.median(times[1:]) * 1e3, 1)

    def copied(self, cache: Path, ref: str) -> dict[str, Any]:
        copy = Path(shutil.copytree(cache, self.ctx.work_dir / "copy"))
        away = cache.rename(cache.with_name("cache.away"))  # the original out of reach
        try:
            served = self.start("copy", copy)
        finally:
            away.rename(cache)
        served["ok"] = served["engine"] == ref and str(served["artifact"]).startswith(f"{copy}/")
        return served

    def read_only(self, copy: Path, ref: str) -> dict[str, Any]:
        held, empty = self.ctx.work_dir / "copy.ro", self.ctx.work_dir / "empty.ro"
        try:
            _mount(["--bind", str(copy)], held)
            _mount(["-o", "remount,ro,bind"], held)
            _mount(["-t", "tmpfs", "-o", "size=1m,ro", "tmpfs"], empty)
        except (OSError, subprocess.CalledProcessError) as exc:
            _unmount(held)
            return {"ok": None, "skipped": f"cannot mount here ({exc})"}
        try:
            holding, nothing = self.start("read_only_held", held), self.start("read_only_empty", empty)
        finally:
            _unmount(held)
            _unmount(empty)
        causes = [w for w in nothing["warnings"] if "read-only (EROFS)" in w and "serving torch-fp32" in w]
        ok = holding["engine"] == ref and nothing["engine"] == "torch-fp32" and len(causes) >= 1
        return {"ok": ok, "held": holding, "empty": nothing, "cause_lines": causes}

    def full_disk(self, cache: Path, ref: str) -> dict[str, Any]:
        full = self.ctx.work_dir / "full"
        fp32 = next(cache.glob("cpu/*/fp32-decoded.onnx"))
        size_mb = fp32.stat().st_size // 2**20 + 16  # the FP32 export fits, the INT8 model (~35 MB) not
        try:
            _mount(["-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs"], full)
        except (OSError, subprocess.CalledProcessError) as exc:
            return {"ok": None, "skipped": f"cannot mount a tmpfs here ({exc})"}
        try:
            folder = full / fp32.parent.relative_to(cache)
            folder.mkdir(parents=True)
            for path in (fp32, fp32.with_name(fp32.name + ".json")):
                shutil.copy(path, folder / path.name)
            faulted = self.start("full_disk", full)
            subprocess.run(["mount", "-o", "remount,size=1g", str(full)], check=True)  # space returns
            healed, again = self.start("full_disk_healed", full), self.start("full_disk_healed_2", full)
        finally:
            _unmount(full)
        causes = [w for w in faulted["warnings"] if "(ENOSPC)" in w and "serving" in w]
        ok = not _int8(faulted["engine"]) and len(causes) >= 1 and _int8(healed["engine"])
        ok = ok and again["engine"] == healed["engine"] and not again["decided"]
        return {"ok": ok, "size_mb": size_mb, "faulted": faulted, "healed": healed, "healed_2": again,
                "cause_lines": causes}  # fmt: skip

    def killed_export(self, cache: Path, ref: str) -> dict[str, Any]:
        folder = next(cache.glob("cpu/*/"))
        for path in folder.glob("int8-decoded-*.onnx*"):  # the start rebuilds it: killed while it does
            path.unlink()
        killed: dict[str, Any] = {}

        def kill_mid_build(server: ServerProcess) -> None:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not killed:
                temps = list(folder.glob(".int8-decoded-*.tmp"))
                child = _child(server.proc.pid, "export cpu")
                if temps and child:
                    os.kill(child, signal.SIGKILL)
                    killed.update(pid=child, temp=temps[0].name)
                time.sleep(0.2)

        first = self.start("killed_export", cache, kill_mid_build)
        left = [p.name for p in cache.rglob("*.tmp")]
        second = self.start("killed_export_next", cache)
        after = [p.name for p in cache.rglob("*.tmp")]
        ok = bool(killed) and bool(left) and after == [] and second["engine"] == ref
        return {"ok": ok, "killed": killed, "served_meanwhile": first, "tmp_left": left, "next": second,
                "tmp_after_next_start": after}  # fmt: skip


def _int8(engine: str) -> bool:
    """The fastest kind on this CPU: a start that decided again (timing both INT8 engines anew) may pick
    the other INT8 runtime when their timings are within noise; a repaired one serves the same engine."""
    return engine.endswith("-int8")


def _engine(info: dict[str, Any]) -> str:
    return "torch-fp32" if info["backend"] == "torch" else f"{info['backend']}-{info['precision']}"


def _served_file(start: dict[str, Any]) -> Path:
    return Path(start["artifact"])


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
        return
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x01]))


def _engine_lines(log: Path) -> list[str]:
    """``LEVEL message`` of the log's lines about the CPU engine and the cache."""
    lines = []
    for raw in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(raw)
            level, message = str(entry.get("level", "")).upper(), str(entry.get("message", ""))
        except ValueError:
            level, message = "", raw
        if any(word in message for word in ("CPU engine", "cache", "building it again", "killed")):
            lines.append(f"{level} {message}".strip())
    return lines


def _child(pid: int, words: str) -> int | None:
    """A child process of ``pid`` whose command line contains ``words``."""
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid and words in cmdline:
            return int(proc.name)
    return None


def _mount(args: list[str], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *args, str(target)], check=True, capture_output=True, text=True)


def _unmount(target: Path) -> None:
    """Unmount ``target`` while something is mounted there (``os.path.ismount`` misses bind mounts)."""
    where = str(target.absolute())
    while any(line.split()[1] == where for line in Path("/proc/mounts").read_text().splitlines()):
        if subprocess.run(["umount", where], check=False, capture_output=True).returncode != 0:
            return

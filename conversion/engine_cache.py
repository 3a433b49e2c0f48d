"""The engine cache: keys, paths, an inter-process build lock and atomic publishing.

A TensorRT engine only runs on the GPU model, TensorRT version and precision it was built for, so it is
cached under a key made of exactly those inputs plus the ONNX file's hash and the max batch size.
``build_once`` builds a missing artifact under an ``flock`` (two replicas sharing the cache volume never
build the same thing at once) and moves it into place only when complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("refinedet.deploy")

ENGINE_KEY_VERSION = 1
LOCK_POLL_S = 2.0


class LockTimeout(TimeoutError):
    """Another process held the build lock for longer than the timeout."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def _capability(compute_capability: str | tuple[int, int]) -> str:
    if isinstance(compute_capability, tuple):
        return f"{compute_capability[0]}.{compute_capability[1]}"
    return str(compute_capability).strip()


def _sm(capability: str) -> str:
    return "sm" + re.sub(r"[^0-9]", "", capability)


def engine_cache_key(
    onnx_sha256: str,
    gpu_name: str,
    compute_capability: str | tuple[int, int],
    trt_version: str,
    precision: str,
    max_batch: int,
) -> str:
    """A file-name-safe key that changes whenever any input does, e.g.
    ``nvidia-h100-80gb-hbm3-sm90-trt10.11.0.33-fp16-b8-<16 hex>``. The readable prefix is for people;
    the digest covers every field (including the full ONNX hash and the key format version)."""
    capability, trt = _capability(compute_capability), trt_version.strip()
    fields = {
        "version": ENGINE_KEY_VERSION,
        "onnx_sha256": onnx_sha256.strip().lower(),
        "gpu_name": " ".join(gpu_name.split()),
        "compute_capability": capability,
        "trt_version": trt,
        "precision": precision.strip().lower(),
        "max_batch": int(max_batch),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    parts = [_slug(gpu_name), _sm(capability), f"trt{_slug(trt)}", _slug(precision), f"b{int(max_batch)}"]
    return "-".join([*parts, digest])


def plan_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "engines" / f"{key}.plan"


def timing_cache_path(
    cache_dir: str | Path, gpu_name: str, compute_capability: str | tuple[int, int], trt_version: str
) -> Path:
    """TensorRT's timing cache is valid for one GPU model and TensorRT version; any precision may share it."""
    name = f"{_slug(gpu_name)}-{_sm(_capability(compute_capability))}-trt{_slug(trt_version)}.cache"
    return Path(cache_dir) / "timing" / name


@contextmanager
def exclusive_lock(path: Path, timeout_s: float, what: str = "artifact") -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, waiting up to ``timeout_s`` for another process.
    The kernel drops the lock when its holder dies, so a crashed build never leaves a stale lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"waited {timeout_s:.0f}s for another process holding {path}") from None
                if not announced:
                    log.info("another replica is building the %s; waiting for it (lock %s)", what, path)
                    announced = True
                time.sleep(LOCK_POLL_S)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{socket.gethostname()} pid {os.getpid()}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def publish(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(out)`` with ``out`` named like ``final`` in a fresh directory beside it, then move the
    files it wrote into place, ``final`` itself last: readers see the complete artifact or none."""
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        out = tmpdir / final.name
        build(out)
        if not out.is_file() or out.stat().st_size == 0:
            raise RuntimeError(f"the build finished without writing {final.name}")
        for path in [p for p in tmpdir.iterdir() if p != out] + [out]:
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(path, final.parent / path.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return final


def build_once(final: Path, build: Callable[[Path], None], lock_timeout_s: float, what: str) -> Path:
    """Return ``final``, building it with ``build(tmp_path)`` under a lock unless it already exists."""
    if final.is_file():
        log.info("reusing cached %s %s", what, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(final.with_suffix(".lock"), lock_timeout_s, what):
        if final.is_file():  # another replica built it while we waited
            log.info("reusing %s built by another replica: %s", what, final)
            return final
        publish(final, build)
    return final

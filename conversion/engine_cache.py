"""The engine cache: keys, paths, an inter-process build lock and atomic publishing.

A TensorRT engine only runs on the GPU model, TensorRT version and precision it was built for, so it is
cached under a key made of exactly those inputs plus the ONNX file's hash and the max batch size.
``build_once`` builds a missing artifact under an ``flock`` (two replicas sharing the cache volume never
build the same thing at once) and moves it into place only when complete; given a ``check``, it also
rebuilds a cached artifact that fails it (truncated, bit-flipped), and it removes what a killed build left.
``describe_fault`` tells a cache that cannot hold an artifact (full, read-only, not ours to write, a build
lock held too long) from a build that failed on its own, in one line with the fix.
"""

from __future__ import annotations

import errno
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
from typing import NamedTuple

log = logging.getLogger("refinedet.deploy")

ENGINE_KEY_VERSION = 1
LOCK_POLL_S = 2.0


LEFTOVER = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # publish's folders, atomic_write's files


class LockTimeout(TimeoutError):
    """Another process held the build lock for longer than the timeout."""


class Fault(NamedTuple):
    """Why the cache could not hold an artifact (``cause``) and what to do about it (``fix``)."""

    cause: str
    fix: str
    code: str  # ENOSPC, EROFS, ... or LockTimeout


_FAULTS = {  # errno -> (what the cache is, the fix)
    errno.ENOSPC: ("is full", "free space on its disk"),
    errno.EDQUOT: ("is over its disk quota", "raise the quota or free space"),
    errno.EROFS: ("is read-only", "mount it writable, or point REFINEDET_CACHE_DIR at a writable folder"),
    errno.EACCES: ("is not writable by this user", "give this user (uid {uid}) write access to it"),
    errno.EPERM: ("is not writable by this user", "give this user (uid {uid}) write access to it"),
}


def describe_fault(exc: BaseException, cache_dir: Path) -> Fault | None:
    """The fault of the environment behind ``exc`` (in it or in what caused it), or None when ``exc`` is a
    build, check or crash of its own: a full disk or quota, a read-only file system, a folder this user
    cannot write, a build lock another process held too long. Such a failure says nothing about the
    artifact, so a choice made without it is worth making again once the fault is gone."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, LockTimeout):
            return Fault(str(seen), "stop the process holding it, or raise the lock timeout", "LockTimeout")
        if isinstance(seen, OSError) and seen.errno in _FAULTS:
            state, fix = _FAULTS[seen.errno]
            code = errno.errorcode[seen.errno]
            where = Path(seen.filename) if isinstance(seen.filename, str) else None
            inside = where is None or where.is_relative_to(cache_dir) or cache_dir.is_relative_to(where)
            cause = f"cache {cache_dir} {state} ({code})" if inside else f"{where}: {seen.strerror} ({code})"
            return Fault(cause, fix.format(uid=os.getuid()), code)
        seen = seen.__cause__ or seen.__context__
    return None


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


def remove_leftovers(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the ``.<name>.<8 random>.tmp`` folders (``publish``) and files (``atomic_write``) that a
    build or write killed mid-way left in ``folder`` (only those of artifact ``name`` and its manifest when
    given); returns them.
    Call it holding the lock that every writer of them holds: then none is still being written."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    removed = []
    for path in entries:
        match = LEFTOVER.match(path.name)
        if match is None or (name is not None and match["name"] not in (name, f"{name}.json")):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as exc:
            log.warning("cannot remove %s, left by a killed build: %s", path, exc)
            continue
        removed.append(path)
    if removed:
        log.info("removed what killed builds left in %s: %s", folder, ", ".join(p.name for p in removed))
    return removed


def build_once(
    final: Path,
    build: Callable[[Path], None],
    lock_timeout_s: float,
    what: str,
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Return ``final``, building it with ``build(tmp_path)`` under a lock unless it already exists.
    ``check(path)`` raises for a damaged artifact (e.g. ``model.artifacts.read_manifest``, which compares
    the file's sha256 with its manifest's): a cached one that fails it is removed and built again, and a
    new one that fails it raises."""
    if final.is_file() and _damage(final, check) is None:
        log.info("reusing cached %s %s", what, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(final.with_suffix(".lock"), lock_timeout_s, what):
        remove_leftovers(final.parent, final.name)
        if final.is_file():
            damage = _damage(final, check)
            if damage is None:  # another replica built (or rebuilt) it while we waited
                log.info("reusing %s built by another replica: %s", what, final)
                return final
            log.warning("cached %s %s is damaged (%s): building it again", what, final, damage)
            final.unlink()
        publish(final, build)
        damage = _damage(final, check)
        if damage is not None:
            raise RuntimeError(f"the {what} just built at {final} fails its check: {damage}")
    return final


def _damage(path: Path, check: Callable[[Path], object] | None) -> str | None:
    """Why ``path`` fails ``check``, or None when it passes (or there is no check)."""
    if check is None:
        return None
    try:
        check(path)
    except Exception as exc:  # whatever the check raises, the artifact cannot be served as it is
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None

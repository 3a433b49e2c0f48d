"""Engine cache keys and paths, the inter-process build lock and atomic publishing."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conversion import engine_cache
from conversion.engine_cache import engine_cache_key, plan_path, timing_cache_path

SHA = "ab" * 32


def test_cache_key_is_stable_readable_and_normalised():
    key = engine_cache_key(SHA, "NVIDIA H100 80GB HBM3", "9.0", "10.11.0.33", "fp16", 8)
    assert key == engine_cache_key(SHA.upper(), " NVIDIA  H100 80GB HBM3 ", (9, 0), "10.11.0.33", "FP16", 8)
    assert re.fullmatch(r"nvidia-h100-80gb-hbm3-sm90-trt10\.11\.0\.33-fp16-b8-[0-9a-f]{16}", key)
    assert plan_path("/cache", key) == Path("/cache/engines") / f"{key}.plan"


def test_cache_key_changes_with_every_input():
    base = dict(
        onnx_sha256=SHA, gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
        trt_version="10.11.0.33", precision="fp16", max_batch=8,
    )  # fmt: skip
    changes = dict(
        onnx_sha256="cd" * 32, gpu_name="NVIDIA A100-SXM4-80GB", compute_capability="8.0",
        trt_version="10.11.0.34", precision="fp32", max_batch=16,
    )  # fmt: skip
    keys = {engine_cache_key(**base)} | {engine_cache_key(**{**base, k: v}) for k, v in changes.items()}
    assert len(keys) == 1 + len(changes)
    # Two GPUs whose names slug alike still differ in the digest.
    assert engine_cache_key(**{**base, "gpu_name": "GPU X"}) != engine_cache_key(
        **{**base, "gpu_name": "GPU-X"}
    )


def test_timing_cache_is_shared_across_precisions_but_not_gpus():
    h100 = timing_cache_path("/c", "NVIDIA H100 80GB HBM3", "9.0", "10.11.0.33")
    assert h100 == Path("/c/timing/nvidia-h100-80gb-hbm3-sm90-trt10.11.0.33.cache")
    assert h100 != timing_cache_path("/c", "NVIDIA L4", "8.9", "10.11.0.33")


def test_lock_of_a_killed_builder_is_released(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_cache, "LOCK_POLL_S", 0.02)
    lock = tmp_path / "x.lock"
    code = f"import fcntl,time; f=open({str(lock)!r},'a+'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(engine_cache.LockTimeout), engine_cache.exclusive_lock(lock, 0.1):
            pass
    finally:
        proc.kill()
        proc.wait()
    with engine_cache.exclusive_lock(lock, 1.0):
        assert lock.read_text().split()[1:] == ["pid", str(os.getpid())]


def test_publish_never_leaves_a_partial_artifact(tmp_path):
    final = tmp_path / "engines" / "k.plan"
    final.parent.mkdir()

    def crash(out: Path) -> None:
        out.write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="mid-build"):
        engine_cache.publish(final, crash)
    with pytest.raises(RuntimeError, match=r"without writing k\.plan"):
        engine_cache.publish(final, lambda out: None)
    assert list(final.parent.iterdir()) == []


def test_what_a_killed_build_left_is_removed_by_the_next_build(tmp_path):
    """Before: a build killed mid-way left its ``.<name>.<random>.tmp`` folder beside the artifact for good."""
    final = tmp_path / "engines" / "k.plan"
    final.parent.mkdir()
    killed = final.parent / ".k.plan.x7f3k2a9.tmp"
    killed.mkdir()
    (killed / "k.plan").write_bytes(b"half a pl")
    manifest_write = final.parent / ".k.plan.json.q0w9e8r7.tmp"
    manifest_write.write_bytes(b"{")
    others = final.parent / ".other.plan.a1b2c3d4.tmp"  # another artifact's: its own lock guards it
    others.mkdir()
    engine_cache.build_once(final, lambda out: out.write_bytes(b"plan"), 1.0, "engine")
    assert sorted(p.name for p in final.parent.iterdir()) == [".other.plan.a1b2c3d4.tmp", "k.lock", "k.plan"]
    assert engine_cache.remove_leftovers(final.parent) == [others] and not others.exists()


def test_a_cached_artifact_that_fails_its_check_is_built_again(tmp_path):
    final = tmp_path / "k.plan"
    builds = []

    def build(out: Path) -> None:
        builds.append(out)
        out.write_bytes(b"good plan")

    def check(path: Path) -> None:
        if path.read_bytes() != b"good plan":
            raise ValueError("sha256 differs from its manifest\nsecond line")

    engine_cache.build_once(final, build, 1.0, "engine", check)
    final.write_bytes(b"good pl")  # truncated
    assert engine_cache.build_once(final, build, 1.0, "engine", check) == final
    assert final.read_bytes() == b"good plan" and len(builds) == 2
    assert engine_cache.build_once(final, build, 1.0, "engine", check) == final and len(builds) == 2
    final.unlink()
    with pytest.raises(RuntimeError, match=r"just built at .* fails its check: sha256 differs"):
        engine_cache.build_once(final, lambda out: out.write_bytes(b"bad"), 1.0, "engine", check)


@pytest.mark.parametrize(
    ("error", "cause", "fix"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "{cache}/cpu/x/.a.tmp/a.onnx"), "cache {cache} is full (ENOSPC)", "free space"),
        (OSError(errno.EROFS, "Read-only file system", "{cache}"), "cache {cache} is read-only (EROFS)", "mount it writable"),
        (PermissionError(errno.EACCES, "Permission denied", "{cache}/cpu"), "cache {cache} is not writable by this user (EACCES)", "write access"),
        (OSError(errno.ENOSPC, "No space left on device", "/tmp/ort/q.onnx"), "/tmp/ort/q.onnx: No space left on device (ENOSPC)", "free space"),
        (engine_cache.LockTimeout("waited 5s for another process holding {cache}/x.lock"), "waited 5s", "lock timeout"),
    ],
)  # fmt: skip
def test_a_fault_of_the_cache_is_told_from_a_failed_build(tmp_path, error, cause, fix):
    cache = tmp_path / "cache"
    if isinstance(error, OSError) and error.filename:
        error.filename = error.filename.format(cache=cache)
    wrapped = RuntimeError("export failed")
    wrapped.__cause__ = error
    fault = engine_cache.describe_fault(wrapped, cache)
    assert fault is not None and fault.cause.startswith(cause.format(cache=cache)) and fix in fault.fix
    assert engine_cache.describe_fault(RuntimeError("the quantizer crashed"), cache) is None
    assert engine_cache.describe_fault(OSError(errno.EIO, "Input/output error"), cache) is None

"""The CPU engine decision as ``conversion.cpu_engine`` caches it: ``CpuArtifact`` (what to serve and why)
and its JSON file, read back against the cache it is found in.

The file names its artifact relative to the cache folder (``cpu/<sha>/int8-....onnx``; none for torch-fp32,
which serves the checkpoint it is given), so a cache copied or mounted elsewhere serves its own files, and
records the artifact's sha256: a file truncated, bit-flipped or deleted since is found at the next start
(``Cached.damage``) and rebuilt. A decision made while the cache could not hold an artifact (full,
read-only, a lock held too long) records that fault (``CpuArtifact.fault``): it is served for now, and
the next start decides again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

from conversion.engine_cache import Fault, describe_fault
from model.artifacts import atomic_write_bytes, read_manifest
from model.errors import UserError

log = logging.getLogger("refinedet.cpu_engine")


class CpuArtifact(NamedTuple):
    """What to serve on this CPU: ``artifact`` (an .onnx with its manifest, or the checkpoint),
    ``engine`` (one of ``ENGINES``), ``reason`` (one line: why this one and not a faster one) and
    ``record`` (the decision as cached: CPU, candidates, checks, timings, precisions, fault)."""

    artifact: Path
    engine: str
    reason: str
    record: dict[str, Any]

    @property
    def backend(self) -> str:
        """The service's ``--backend`` for it."""
        return "torch" if self.engine == "torch-fp32" else self.engine.rsplit("-", 1)[0]

    @property
    def precision(self) -> str:
        """The precision it computes in: the engine's, or what OpenVINO compiled (e.g. bf16 for FP32)."""
        return str(self.record.get("precisions", {}).get(self.engine) or self.engine.rsplit("-", 1)[1])

    @property
    def fault(self) -> str:
        """One line, when this was chosen while the cache could not hold a faster candidate: the cause, what
        is served meanwhile and the fix (the next start decides again); else empty."""
        return str(self.record.get("fault") or "")

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": str(self.artifact), "engine": self.engine, "backend": self.backend,
                "precision": self.precision, "reason": self.reason, "fault": self.fault,
                "record": self.record}  # fmt: skip


class Cached(NamedTuple):
    """A decision read from the cache: ``choice``, and ``damage``: why its artifact cannot be served as it
    is (missing, or not the file that was verified), else None."""

    choice: CpuArtifact
    damage: str | None

    @property
    def final(self) -> bool:
        """Made on the candidates' merits, with its artifact intact: served as it is."""
        return self.damage is None and not self.choice.fault


def read_decision(path: Path, cache_dir: Path, checkpoint: Path) -> Cached | None:
    """The decision in ``path``, its artifact found in ``cache_dir`` and checked, or None when there is no
    readable decision. An absolute artifact path (a decision edited, or written by hand) is looked up by
    its name in the decision's folder: never outside this cache."""
    try:
        data = json.loads(path.read_text())
        engine, reason, record = str(data["engine"]), str(data["reason"]), dict(data["record"])
        stored = data["artifact"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if engine == "torch-fp32":
        return Cached(CpuArtifact(checkpoint, engine, reason, record), None)
    if not isinstance(stored, str) or not stored:
        return None
    artifact = path.parent / Path(stored).name if Path(stored).is_absolute() else cache_dir / stored
    return Cached(CpuArtifact(artifact, engine, reason, record), artifact_damage(artifact, record))


def artifact_damage(artifact: Path, record: dict[str, Any]) -> str | None:
    """Why ``artifact`` is not the file the decision ``record`` verified (missing, its sha256 differs from
    its manifest's, or the manifest's from the recorded one), else None."""
    if not artifact.is_file():
        return f"{artifact.name} is missing"
    try:
        manifest = read_manifest(artifact)  # hashes the file, compares with its manifest
    except (OSError, UserError) as exc:
        return str(exc).splitlines()[0]  # names the file
    expected = record.get("artifact_sha256")
    if expected and manifest.artifact_sha256 != expected:
        return f"{artifact.name} is not the file verified (sha256 {manifest.artifact_sha256[:12]}, not {expected[:12]})"
    return None


def write_decision(path: Path, choice: CpuArtifact, cache_dir: Path) -> None:
    """Write ``choice`` to ``path`` atomically, its artifact relative to ``cache_dir`` (none for torch)."""
    data = choice.to_dict()
    torch = choice.engine == "torch-fp32"
    data["artifact"] = None if torch else choice.artifact.relative_to(cache_dir).as_posix()
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def decision_stamp(path: Path) -> tuple[int, int] | None:
    """What changes when ``path`` is written again (it is replaced atomically): inode and mtime."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def serve_without_cache(checkpoint: Path, cached: Cached | None, fault: Fault) -> CpuArtifact:
    """What to serve when the cache cannot be written: the decision it holds when its artifact is intact,
    else torch on the checkpoint; either way with the fault in one line (nothing is cached: the next start
    tries again)."""
    if cached is not None and cached.damage is None:
        choice = cached.choice
        line = f"{fault.cause}: serving the cached {choice.engine} as it is; fix: {fault.fix}"
        log.info("CPU engine: %s", line)
        return choice._replace(reason=f"{line}; {choice.reason}", record={**choice.record, "fault": line})
    damage = f" and its {cached.choice.artifact.name} is damaged ({cached.damage})" if cached else ""
    line = f"{fault.cause}{damage}: serving torch-fp32 without a cache; fix: {fault.fix}"
    log.info("CPU engine: %s", line)
    return CpuArtifact(checkpoint, "torch-fp32", line, {"fault": line, "precisions": {"torch-fp32": "fp32"}})


def save_decision(path: Path, choice: CpuArtifact, cache_dir: Path) -> None:
    """Cache the decision; one that cannot be written is served all the same (and made again next time)."""
    try:
        write_decision(path, choice, cache_dir)
    except OSError as exc:
        fault = describe_fault(exc, cache_dir)
        log.warning("CPU engine: the decision is served but not cached (%s): the next start decides again",
                    fault.cause if fault else exc)  # fmt: skip

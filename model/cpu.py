"""What the CPU offers: model name, the instruction-set flags that decide INT8 speed, and how many cores
this process may use. One source for the CPU engine choice (``conversion.cpu_engine``: its cache key),
the service's thread counts (``service.backends``) and the benchmarks' reports.

Usable cores are the fewer of the CPU affinity mask (``taskset``, cpusets) and the cgroup CPU quota
(``docker run --cpus``, a Kubernetes limit), rounded up: ``os.cpu_count()`` sees the host's cores
inside a container and would oversubscribe it. Standard library only.
"""

from __future__ import annotations

import math
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

# Flags that change what INT8 / FP32 kernels ONNX Runtime and oneDNN can use, in /proc/cpuinfo spelling.
# VNNI (avx512_vnni, avx_vnni) and AMX are what make uint8 x int8 products fast; without them an x86
# CPU multiplies INT8 with AVX2/AVX-512BW pairs that gain much less over FP32.
FEATURE_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                 "amx_tile", "amx_int8", "amx_bf16")  # fmt: skip
INT8_ACCELERATING_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2; v1 below
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


@dataclass(frozen=True)
class CpuInfo:
    model_name: str  # e.g. "AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+"
    machine: str  # platform.machine(): x86_64, aarch64
    flags: tuple[str, ...]  # the FEATURE_FLAGS present (aarch64: its own feature names, e.g. asimddp)
    usable_cores: int

    @property
    def int8_accelerated(self) -> bool:
        """Whether the CPU has dot-product instructions for uint8 x int8 (VNNI / AMX; ARM: dot product)."""
        return any(f in self.flags for f in (*INT8_ACCELERATING_FLAGS, "asimddp", "i8mm"))

    def key(self) -> str:
        """File-name-safe identity of what the kernels depend on: machine, model name and flags (not the
        core count), e.g. ``x86_64-amd-epyc-avx2.avx512f.avx512_vnni``."""
        name = re.sub(r"[^a-z0-9]+", "-", self.model_name.lower()).strip("-") or "unknown"
        return f"{self.machine}-{name}-{'.'.join(self.flags) or 'baseline'}"

    def to_dict(self) -> dict[str, object]:
        return {"model_name": self.model_name, "machine": self.machine, "flags": list(self.flags),
                "usable_cores": self.usable_cores, "int8_accelerated": self.int8_accelerated}  # fmt: skip


def cpu_info(cpuinfo: str | None = None) -> CpuInfo:
    """This machine's CPU (``cpuinfo``: the text of /proc/cpuinfo, for tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor's entry
            fields[key.strip()] = value.strip()
    present = set((fields.get("flags") or fields.get("Features") or "").split())
    arm = ("asimd", "asimddp", "i8mm", "sve", "bf16")
    flags = tuple(f for f in (*FEATURE_FLAGS, *arm) if f in present)
    name = fields.get("model name") or fields.get("CPU part") or platform.processor() or "unknown"
    return CpuInfo(" ".join(name.split()), platform.machine() or "unknown", flags, usable_cores())


def usable_cores() -> int:
    """Cores this process may run on: the affinity mask, capped by the cgroup CPU quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota)) if quota else cores)


def cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup quota (``cpu.max`` "200000 100000" -> 2.0), None when unlimited."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = (p.read_text().strip() for p in CGROUP_V1)
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return int(quota) / int(period) if int(period) > 0 and int(quota) > 0 else None
    except ValueError:
        return None


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Intra-op threads for each of ``workers`` processes sharing the usable cores: cores // workers,
    at least 1 (more workers than cores share single threads)."""
    return max(1, (cores or usable_cores()) // max(1, workers))

"""model.cpu: what the CPU offers (name, the flags that decide INT8 speed, usable cores) and how
workers split the cores."""

from __future__ import annotations

import os

from model import cpu
from model.cpu import cpu_info, threads_per_worker

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni
processor\t: 1
model name\t: something else
"""
OLD_XEON = "model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz\nflags\t\t: sse avx avx2 fma\n"


def test_flags_and_name_come_from_the_first_processor():
    info = cpu_info(ZEN4)
    assert info.model_name == "AMD EPYC 9R14"
    assert info.flags == ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16")
    assert info.int8_accelerated and info.to_dict()["int8_accelerated"] is True
    old = cpu_info(OLD_XEON)
    assert old.flags == ("avx2", "fma") and not old.int8_accelerated


def test_the_key_changes_with_the_flags_not_the_core_count():
    a, b = cpu_info(ZEN4), cpu_info(OLD_XEON)
    assert a.key() != b.key() and a.key().endswith("avx512_vnni.avx_vnni.avx512_bf16")
    assert all(c.isalnum() or c in "-._" for c in a.key())


def test_the_cgroup_quota_caps_the_usable_cores(tmp_path, monkeypatch):
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(cpu, "CGROUP_CPU_MAX", cpu_max)
    monkeypatch.setattr(cpu, "CGROUP_V1", (tmp_path / "none", tmp_path / "none"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpu.usable_cores() == 16  # no cgroup file: the affinity mask
    cpu_max.write_text("max 100000\n")
    assert cpu.cgroup_cpu_quota() is None and cpu.usable_cores() == 16
    cpu_max.write_text("250000 100000\n")  # docker run --cpus 2.5
    assert cpu.cgroup_cpu_quota() == 2.5 and cpu.usable_cores() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu.usable_cores() == 2


def test_workers_split_the_cores():
    assert threads_per_worker(1, cores=8) == 8
    assert threads_per_worker(4, cores=8) == 2
    assert threads_per_worker(3, cores=8) == 2
    assert threads_per_worker(4, cores=2) == 1  # more workers than cores: one thread each

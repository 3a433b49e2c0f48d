"""The service benchmark's results: the ratios of the service to each peer and to the network-only
ceiling, the per-concurrency summary, and the printed report (``bench.service_bench`` writes the rows)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bench.common import format_table

APPS = ("service", "naive", "litserve")
PEERS = ("naive", "litserve")

COLUMNS = (
    ("app", "app"), ("engine", "engine"), ("workers", "workers"), ("concurrency", "conc"), ("requests_per_s", "req/s"), ("p50", "p50 ms"),
    ("p90", "p90 ms"), ("p99", "p99 ms"), ("errors", "errors"), ("mean_batch", "batch"),
    ("detections_per_response", "det/resp"),
)  # fmt: skip


def ratios(rows: list[dict], peer: str = "naive") -> list[dict[str, Any]]:
    """Service over ``peer`` requests/s at each (service workers, concurrency) both measured."""
    other = {r["concurrency"]: r["requests_per_s"] for r in rows if r["app"] == peer}
    out = []
    service = [r for r in rows if r["app"] == "service"]
    for r in sorted(service, key=lambda r: (r.get("workers", 1), r["concurrency"])):
        c, rps = r["concurrency"], r["requests_per_s"]
        if other.get(c):
            out.append({"concurrency": c, "workers": r.get("workers", 1), "service_rps": rps,
                        f"{peer}_rps": other[c], "ratio": round(rps / other[c], 2)})  # fmt: skip
    return out


def level_ceiling(
    ceiling: dict[str, Any] | None, ceilings: Sequence[dict[str, Any]], c: int
) -> dict[str, Any] | None:
    """The ceiling measured just before level ``c`` (with ``--rounds`` > 1), else the run's mean."""
    return next((m for m in ceilings if m.get("level") == c), ceiling)


def versus_ceiling(
    rows: list[dict], ceiling: dict[str, Any] | None, ceilings: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Each service row against the network-only ceiling (``level_ceiling``): requests/s over its img/s,
    p50 minus its batch-1 ms (the request path's cost at that load)."""
    out = []
    for r in rows:
        at = level_ceiling(ceiling, ceilings, r["concurrency"]) or {}
        if r["app"] == "service" and at.get("images_per_s"):
            p50 = r.get("p50")
            out.append({"concurrency": r["concurrency"], "workers": r.get("workers", 1),
                        "ceiling_images_per_s": at["images_per_s"], "ceiling_batch1_ms": at["batch1_ms"],
                        "rps_over_ceiling": round(r["requests_per_s"] / at["images_per_s"], 2),
                        "p50_minus_batch1_ms": None if p50 is None else round(p50 - at["batch1_ms"], 1)})  # fmt: skip
    return out


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per concurrency (one-worker service): each app's req/s, p50, p99, and the service's ratios
    to each peer and to the ceiling."""
    by = {(r["app"], r["concurrency"]): r for r in result["rows"] if r.get("workers", 1) == 1}
    ceiling = result.get("ceiling") or {}
    out = []
    for c in sorted({c for _, c in by}):
        row: dict[str, Any] = {"concurrency": c}
        for app in APPS:
            r = by.get((app, c))
            if r is not None:
                row.update(
                    {f"{app}_rps": r["requests_per_s"], f"{app}_p50": r["p50"], f"{app}_p99": r["p99"]}
                )
        service = by.get(("service", c))
        for peer in PEERS:
            other = by.get((peer, c))
            if service and other and other["requests_per_s"]:
                row[f"vs_{peer}"] = round(service["requests_per_s"] / other["requests_per_s"], 2)
        at = level_ceiling(ceiling, result.get("ceilings", ()), c) or {}
        if at.get("images_per_s"):
            row["ceiling"] = at["images_per_s"]
            if service:
                row["vs_ceiling"] = round(service["requests_per_s"] / at["images_per_s"], 2)
        out.append(row)
    return out


SUMMARY_COLUMNS = (
    ("concurrency", "conc"),
    *((f"{app}_{k}", f"{app} {h}") for app in APPS for k, h in (("rps", "req/s"), ("p50", "p50"), ("p99", "p99"))),
    ("ceiling", "ceiling img/s"), ("vs_naive", "svc/naive"), ("vs_litserve", "svc/litserve"),
    ("vs_ceiling", "svc/ceiling"),
)  # fmt: skip


def mean_ceiling(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """The ceilings measured during a run -> one: the mean of batch-1 ms and img/s (the machine's load
    moves during a run; each measurement is in ``ceilings``)."""
    last = measured[-1]
    return {**{k: last[k] for k in ("engine", "threads", "streams")},
            "batch1_ms": round(statistics.fmean(m["batch1_ms"] for m in measured), 2),
            "images_per_s": round(statistics.fmean(m["images_per_s"] for m in measured), 2),
            "measurements": len(measured)}  # fmt: skip


def report(result: dict[str, Any]) -> str:
    env = result["environment"]
    cpu = env.get("cpu_info") or {}
    lines = [f"CPU: {cpu.get('model_name')} ({cpu.get('machine')}), flags {' '.join(cpu.get('flags', [])) or '-'}, "
             f"{cpu.get('usable_cores')} usable cores; load average at start {env.get('load_average')}",
             format_table(result["rows"], COLUMNS)]  # fmt: skip
    ceiling = result.get("ceiling")
    if ceiling:
        spread = ", ".join(f"{m['images_per_s']} ({m['when']})" for m in result.get("ceilings", []))
        lines.append(f"network-only ceiling ({ceiling['engine']}, {ceiling['threads']} threads, no HTTP, no decode): "
                     f"batch-1 {ceiling['batch1_ms']} ms; {ceiling['images_per_s']} img/s with {ceiling['streams']} "
                     f"concurrent streams (mean of: {spread or '-'} img/s)")  # fmt: skip
    for peer in PEERS:
        for r in result.get(f"service_vs_{peer}", []):
            lines.append(f"service ({r['workers']} workers) vs {peer} at concurrency {r['concurrency']}: "
                         f"{r['service_rps']} / {r[f'{peer}_rps']} req/s = {r['ratio']}x")  # fmt: skip
    for r in result.get("service_vs_ceiling", []):
        lines.append(f"service ({r['workers']} workers) at concurrency {r['concurrency']}: {r['rps_over_ceiling']}x "
                     f"the ceiling's {r['ceiling_images_per_s']} img/s; p50 - batch-1 ({r['ceiling_batch1_ms']} ms) = "
                     f"{r['p50_minus_batch1_ms']} ms")  # fmt: skip
    if result.get("summary"):
        present = {k for row in result["summary"] for k in row}
        lines += ["", format_table(result["summary"], [c for c in SUMMARY_COLUMNS if c[0] in present])]
    return "\n".join(lines)

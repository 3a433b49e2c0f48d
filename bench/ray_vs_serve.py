"""One Ray Serve replica against ``refinedet serve`` on the same cores: the same engine plan (each makes
``deploy.prepare``'s decision from the same cache), the same photos, the same closed-loop load.

A one-node Ray cluster is started in a network namespace that has only loopback (``unshare``, root), with
Serve's HTTP ingress on 127.0.0.1; the script re-runs itself there. Then, one after the other, for each
``--ingress`` (``scaleout.ingress.start``: HAProxy, Serve's Python proxy): the Ray Serve app
(``scaleout.serve.build_app``, 1 replica) in both shapes, ingress -> Ingress -> replica (``retry``, the
default) and ingress -> replica (``direct``), then ``refinedet serve`` (Ray stopped), each at every
``--concurrency`` for ``--duration`` s after ``--warmup`` s, all of it ``--rounds`` times. Prints a table
(req/s, p50, the ratio, and the CPU milliseconds every process but the load generator spent per answered
request: the cost of Ray's processes is in it) and the engine each one reported (/v1/model), and writes
JSON. ``--hops`` measures instead what a request costs in each with no inference in the way (``hop_costs``)::

    REFINEDET_CACHE_DIR=~/.cache/refinedet python -m bench.ray_vs_serve --concurrency 1,4 --duration 15 \
        --rounds 2 --json bench/results/ray_vs_serve_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RAY_PORT, PROXY_PORT = 6391, 18391
INSIDE = "REFINEDET_RAY_BENCH_INSIDE"


def namespace_cpu_s() -> float:
    """CPU seconds (user + system) of every process in this PID namespace but this one (the load generator):
    the server side's whole cost, Ray's raylet, GCS, proxy and replicas included."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        if stat.parent.name == str(os.getpid()):
            continue
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def hop_costs(url: str, n: int = 200) -> dict[str, float]:
    """What a request costs with no inference in the way: ``n`` of each, one after another, CPU ms (every
    process in the namespace but this one) and wall ms per request, for ``GET /v1/model`` and for a 23 KB
    body the app rejects unread as not an image (400); and the CPU ms per second of the idle server."""
    import httpx

    body = os.urandom(23_000)  # a BCCD JPEG's size
    calls = {
        "get": lambda c: c.get(url + "/v1/model"),
        "post_23kb": lambda c: c.post(url + "/detect", content=body, headers={"content-type": "image/jpeg"}),
    }
    out: dict[str, float] = {}
    with httpx.Client(timeout=30) as client:
        for _ in range(20):
            for call in calls.values():
                call(client)
        time.sleep(3)
        before = namespace_cpu_s()
        time.sleep(10)
        out["idle_cpu_ms_per_s"] = round((namespace_cpu_s() - before) * 100, 1)
        for name, call in calls.items():
            before, start = namespace_cpu_s(), time.monotonic()
            for _ in range(n):
                call(client)
            out[f"{name}_cpu_ms"] = round((namespace_cpu_s() - before) * 1000 / n, 2)
            out[f"{name}_wall_ms"] = round((time.monotonic() - start) * 1000 / n, 2)
    return out


def measure_url(url: str, bodies: list[bytes], levels: list[int], duration: float, warmup: float,
                hops: bool = False) -> dict:  # fmt: skip
    """The server at ``url``: its engine (``/v1/model``) and each concurrency level, or with ``hops`` what a
    request costs there without inference (``hop_costs``)."""
    import httpx

    from bench.load_gen import run_level

    info = httpx.get(f"{url}/v1/model", timeout=30).json()
    if hops:
        return {"model": {k: info.get(k) for k in ("backend", "precision", "device")}, "hops": hop_costs(url)}
    rows = {}
    for c in levels:
        before = namespace_cpu_s()
        row = run_level(url + "/detect", bodies, c, duration, warmup)
        spent = (namespace_cpu_s() - before) * duration / (duration + warmup)  # the measured window's share
        row["server_cpu_ms_per_request"] = round(1000 * spent / row["ok"], 1) if row["ok"] else None
        rows[c] = row
    return {"model": {k: info.get(k) for k in ("backend", "precision", "device")}, "levels": rows}


def wait_ready(url: str, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready in {timeout_s:.0f} s")


def measure_ray(
    bodies: list[bytes], levels: list[int], duration: float, warmup: float, ingresses: list[str],
    hops: bool = False,
) -> dict[str, dict]:  # fmt: skip
    """Both shapes of ``scaleout.serve.build_app`` with 1 replica behind each of ``ingresses`` (Serve started
    by ``scaleout.ingress.start``), one after the other on one Ray node; rows named ``<ingress>/<shape>``."""
    import ray
    from ray import serve

    from scaleout.ingress import start
    from scaleout.serve import APP_NAME, build_app
    from service.settings import Settings

    ray.init(address=f"127.0.0.1:{RAY_PORT}", log_to_driver=False)
    url = f"http://127.0.0.1:{PROXY_PORT}"
    rows = {}
    try:
        for ingress in ingresses:
            start("127.0.0.1", PROXY_PORT, "HeadOnly", ingress)
            for shape, retry in (("retry", True), ("direct", False)):
                app = build_app(Settings(access_log=False), 1, 0.0, retry=retry)
                serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
                wait_ready(url)
                rows[f"{ingress}/{shape}"] = measure_url(url, bodies, levels, duration, warmup, hops)
                serve.delete(APP_NAME)
            serve.shutdown()
        return rows
    finally:
        serve.shutdown()
        ray.shutdown()


def measure_serve(
    bodies: list[bytes], levels: list[int], duration: float, warmup: float, logs: Path, hops: bool = False
) -> dict:
    from bench import servers

    command = [*servers.refinedet_command(), "serve", "--port", "{port}", "--host", servers.HOST]
    env = servers.server_env({"REFINEDET_ACCESS_LOG": "false"})
    with servers.running(command, env, logs / "serve.log") as url:
        return measure_url(url, bodies, levels, duration, warmup, hops)


def inside(args: argparse.Namespace) -> dict[str, Any]:
    """In the namespace, ``--rounds`` times: start Ray, measure both shapes, stop Ray, measure serve."""
    from bench.common import find_jpegs, read_jpegs
    from bench.load_gen import combine_rounds

    bodies = read_jpegs(find_jpegs(None, limit=16))
    levels = [int(c) for c in args.concurrency.split(",")]
    ingresses = args.ingress.split(",")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    ray_bin = str(Path(sys.executable).parent / "ray")
    # A stopped HAProxy-ingress replica drains 30 s by default (for load balancers); nothing balances here.
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }
    rounds: list[dict[str, dict]] = []
    for _ in range(args.rounds):
        subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={RAY_PORT}",
                        "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True)  # fmt: skip
        try:
            measured = measure_ray(bodies, levels, args.duration, args.warmup, ingresses, args.hops)
        finally:
            subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True)
        logs = Path(args.log_dir)
        measured["serve"] = measure_serve(bodies, levels, args.duration, args.warmup, logs, args.hops)
        rounds.append(measured)
    result: dict[str, Any] = {"rounds": args.rounds, "servers": list(rounds[-1])}
    if args.hops:
        return {**result, **{name: rounds[-1][name] for name in result["servers"]}}
    for name in result["servers"]:
        levels_by_round = {c: [r[name]["levels"][c] for r in rounds] for c in levels}
        combined = {}
        for c, rows in levels_by_round.items():
            combined[c] = combine_rounds(rows)
            cpu = [row["server_cpu_ms_per_request"] for row in rows if row["server_cpu_ms_per_request"]]
            combined[c]["server_cpu_ms_per_request"] = round(statistics.mean(cpu), 1) if cpu else None
            combined[c]["requests_per_s_by_round"] = [row["requests_per_s"] for row in rows]
        result[name] = {"model": rounds[0][name]["model"], "levels": combined}
    return result


SHAPES = {"retry": "retrying ingress (default)", "direct": "`--direct`"}


def label(name: str) -> str:
    """``haproxy/direct`` -> "haproxy, `--direct`"."""
    ingress, _, shape = name.partition("/")
    return f"{ingress}, {SHAPES[shape]}"


def ray_servers(result: dict[str, Any]) -> list[str]:
    return [name for name in result["servers"] if name != "serve"]


def hops_table(result: dict[str, Any]) -> str:
    keys = ["idle_cpu_ms_per_s", "get_cpu_ms", "get_wall_ms", "post_23kb_cpu_ms", "post_23kb_wall_ms"]
    lines = ["| server | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name in result["servers"]:
        lines.append(f"| {name} | " + " | ".join(str(result[name]["hops"][k]) for k in keys) + " |")
    return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
    if "hops" in result["serve"]:
        return hops_table(result)
    serve_rows = result["serve"]
    lines = [
        "engines: " + ", ".join(f"{name} {result[name]['model']}" for name in result["servers"]),
        "| clients | Ray Serve, 1 replica (ingress, shape) | req/s (p50 ms) | refinedet serve req/s (p50 ms) "
        "| replica / serve | server CPU ms/request: Ray / serve |",
        "|---|---|---|---|---|---|",
    ]
    for c in serve_rows["levels"]:
        s = serve_rows["levels"][c]
        for name in ray_servers(result):
            r = result[name]["levels"][c]
            ratio = r["requests_per_s"] / s["requests_per_s"] if s["requests_per_s"] else float("nan")
            lines.append(
                f"| {c} | {label(name)} | {r['requests_per_s']:.2f} ({r['latency_ms']['p50']:.0f}) | "
                f"{s['requests_per_s']:.2f} ({s['latency_ms']['p50']:.0f}) | {ratio:.2f} | "
                f"{r.get('server_cpu_ms_per_request')} / {s.get('server_cpu_ms_per_request')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=1, help="Ray (both shapes) then serve, this many times")
    p.add_argument(
        "--ingress",
        default="haproxy,serve-proxy",
        help="Serve's HTTP ingresses to measure, comma-separated (scaleout.ingress.INGRESSES; default both)",
    )
    p.add_argument(
        "--hops",
        action="store_true",
        help="instead: what a request costs in each with no inference in the way",
    )
    p.add_argument("--log-dir", default="/tmp/refinedet-ray-bench")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    out = Path(args.log_dir) / "result.json"
    if os.environ.get(INSIDE) != "1":
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            print("needs root and unshare (a loopback-only network namespace for Ray)", file=sys.stderr)
            return 2
        argv_inside = [
            sys.executable,
            "-m",
            "bench.ray_vs_serve",
            *(argv if argv is not None else sys.argv[1:]),
        ]
        done = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", *argv_inside],
                              env={**os.environ, INSIDE: "1"}, check=False)  # fmt: skip
        if done.returncode != 0 or not out.is_file():
            return done.returncode or 1
        result = json.loads(out.read_text())
        print(table(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    out.write_text(json.dumps(inside(args), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

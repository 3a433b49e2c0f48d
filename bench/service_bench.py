"""Service benchmark: ``refinedet serve`` versus its peers serving the same model file, through HTTP on
127.0.0.1, with real JPEG photos (BCCD, 640x480) and a closed-loop concurrency sweep.

    python -m bench.service_bench --cpu-engine auto --concurrency 1,4,16 --apps service,naive,litserve \
        --json bench/results/service_bench_cpu_peers.json

Apps (``--apps``): ``service`` (``refinedet serve``; ``--workers`` uvicorn workers to sweep), ``naive``
(``bench.naive_app``: a sync FastAPI handler around one session of the file) and ``litserve``
(``bench.litserve_app``: LitServe's usual CPU set-up, 2 workers x 1 thread). With ``--cpu-engine`` every
app serves the artifact the service's CPU-engine decision picked (``conversion.cpu_engine``, as
``refinedet prepare`` prints it), the peers on ``--runtime`` (default: the runtime that decision serves it
with); without it, the checkpoint (the peers on eager PyTorch). On a CPU the run starts with the chosen
engine's network-only ceiling (``bench.ceiling``: the service's own backend, batch-1 ms and img/s with 2
concurrent streams, no HTTP, no decoding), measured in the same run, with no server up.

For each app, worker count and concurrency: requests/s, p50/p90/p99 latency and errors (non-200 answers
and client exceptions); for a one-worker service also the mean dynamic batch size (from /metrics, which
is per worker process). Then the service's requests/s over each peer's at each concurrency, and over the
ceiling's img/s (its p50 at one client beside the ceiling's batch-1 ms): ``bench.service_report``. See
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench import servers
from bench.common import (
    environment,
    find_jpegs,
    parse_list,
    read_jpegs,
    resolve_checkpoint,
    write_json,
)
from bench.engine_session import RUNTIMES, default_runtime
from bench.load_gen import combine_rounds, run_level
from bench.service_report import APPS, PEERS, mean_ceiling, ratios, report, summary, versus_ceiling
from model.artifacts import file_kind
from model.errors import UserError

READY_LOG_MARKER = "refinedet.service: ready: "  # logged by each worker once its model is warmed up


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.service_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint for both apps (default: the shipped one, else random weights)")
    p.add_argument("--backend", default="torch", help="the service's --backend (default torch)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="both apps' device")
    p.add_argument(
        "--max-batch-size", type=int, help="service: REFINEDET_MAX_BATCH_SIZE (default: the service's)"
    )
    p.add_argument("--cpu-engine", choices=["auto", "int8", "fp32", "torch"],
                   help="the service serves conversion.cpu_engine's artifact of --model (auto: the default CPU "
                        "engine), the naive app the checkpoint")  # fmt: skip
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="--cpu-engine's cache (default REFINEDET_CACHE_DIR or ~/.cache/refinedet)",
    )
    p.add_argument("--rounds", type=int, default=1,
                   help="split each level into this many rounds, the apps taking turns (all servers up at once), so "
                        "that load from other processes falls on every app alike (default 1: app after app)")  # fmt: skip
    p.add_argument("--max-delay-ms", type=float, default=0.0, help="service: REFINEDET_MAX_DELAY_MS")
    p.add_argument("--max-queue-size", type=int, default=1024, help="service: REFINEDET_MAX_QUEUE_SIZE")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="more REFINEDET_* settings for the service (repeatable)")  # fmt: skip
    p.add_argument(
        "--workers", default="1", help="service: uvicorn worker processes to sweep, e.g. 1,4 (default 1)"
    )
    p.add_argument("--concurrency", default="1,4,16,64", help="closed-loop client counts (default 1,4,16,64)")
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per level (default 8)")
    p.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds before each level")
    p.add_argument("--client-processes", type=int, default=1, help="load-generator processes (default 1)")
    p.add_argument("--apps", default="service,naive", help=f"which apps to measure, of {', '.join(APPS)} "
                   "(default service,naive)")  # fmt: skip
    p.add_argument("--runtime", choices=["auto", *RUNTIMES], default="auto",
                   help="the peers' runtime (default auto: the one the service serves the file with; onnxruntime "
                        "or openvino for an ONNX model, torch for a checkpoint)")  # fmt: skip
    p.add_argument("--litserve-workers", type=int, default=2, help="LitServe workers x 1 thread (default 2)")
    p.add_argument("--ceiling", choices=["auto", "on", "off"], default="auto",
                   help="measure the network-only ceiling first (auto: on a CPU)")  # fmt: skip
    p.add_argument(
        "--ceiling-duration", type=float, default=5.0, help="seconds of the ceiling's 2-stream run"
    )
    p.add_argument("--images", action="append", default=[], help="JPEG file or folder (default: BCCD)")
    p.add_argument("--max-images", type=int, default=64, help="distinct photos sent (default 64)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /readyz")
    p.add_argument("--log-dir", type=Path, help="server logs here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write the results here (atomically)")
    return p


def check(args: argparse.Namespace) -> tuple[list[int], list[str], dict[str, str]]:
    levels = parse_list(args.concurrency, int)
    apps = parse_list(args.apps)
    workers = parse_list(args.workers, int)
    if not levels or min(levels) < 1 or max(levels) > 1024:
        raise UserError("--concurrency takes client counts between 1 and 1024")
    if not workers or min(workers) < 1 or max(workers) > 64:
        raise UserError("--workers takes worker counts between 1 and 64")
    if set(apps) - set(APPS) or not apps:
        raise UserError(f"--apps takes {', '.join(APPS)}")
    if args.duration <= 0 or args.duration > 600 or args.warmup < 0 or args.client_processes < 1:
        raise UserError("--duration must be in (0, 600], --warmup >= 0, --client-processes >= 1")
    if not 1 <= args.rounds <= 20:
        raise UserError("--rounds takes 1 to 20")
    if "litserve" in apps and args.device == "cuda":
        raise UserError("--apps litserve: the LitServe peer runs on the CPU only (--device cpu)")
    if not 1 <= args.litserve_workers <= 16:
        raise UserError("--litserve-workers takes 1 to 16")
    extra = {}
    for item in args.server_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("REFINEDET_"):
            raise UserError(f"--server-env takes REFINEDET_NAME=VALUE, got {item!r}")
        extra[key] = value
    return levels, apps, extra


def app_command(
    app: str, args: argparse.Namespace, model: Path, workers: int = 1, runtime: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """(argv with ``{port}``, extra environment) that starts ``app`` on ``model`` (the service with
    ``workers``; a peer on ``runtime``, default: ``default_runtime(model)``)."""
    device = args.device
    if app in PEERS:
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        runtime = runtime or default_runtime(model)
        argv = [sys.executable, "-m", f"bench.{app}_app", "--model", str(model), "--runtime", runtime]
        if app == "naive":
            argv += ["--device", device]
        else:
            argv += ["--workers", str(args.litserve_workers)]
        return [*argv, "--host", servers.HOST, "--port", "{port}"], {}
    argv = [*servers.refinedet_command(), "serve", "--host", servers.HOST, "--port", "{port}", "--plain-logs"]
    env = {
        "REFINEDET_MODEL": str(model),
        "REFINEDET_BACKEND": args.backend,
        "REFINEDET_DEVICE": device,
        "REFINEDET_MAX_DELAY_MS": str(args.max_delay_ms),
        "REFINEDET_MAX_QUEUE_SIZE": str(args.max_queue_size),
        "REFINEDET_WORKERS": str(workers),
        "REFINEDET_LOG_LEVEL": "info",  # each worker's "ready: ..." line (see READY_LOG_MARKER)
        "REFINEDET_ACCESS_LOG": "false",  # no access log lines: they would dominate the log file
    }
    if args.max_batch_size is not None:
        env["REFINEDET_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    return argv, env


def peer_runtime(args: argparse.Namespace, served: Path, backend: str | None) -> str:
    """The peers' runtime: ``--runtime``, else the service's backend where a peer can run it, else the
    file's default."""
    if args.runtime != "auto":
        return str(args.runtime)
    return backend if backend in RUNTIMES else default_runtime(served)


def measure(app: str, workers: int, url: str, bodies: list[bytes], c: int, duration: float,
            args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """One (app, workers, concurrency) measurement of ``duration`` seconds after ``--warmup``."""
    # /metrics is per worker process: with several, two scrapes may reach different workers.
    before = servers.batch_counters(url) if workers == 1 else None
    level = run_level(f"{url}/detect", bodies, c, duration, args.warmup, args.client_processes)
    after = servers.batch_counters(url) if workers == 1 else None
    if before and after and after[1] > before[1]:
        level["batches"] = (after[0] - before[0], after[1] - before[1])
    return level


def finish_row(app: str, workers: int, engine: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The row of one (app, workers, concurrency) from its rounds' measurements."""
    level = combine_rounds(parts)
    batches = [p["batches"] for p in parts if "batches" in p]
    if batches and sum(b[1] for b in batches) > 0:
        level["mean_batch"] = round(sum(b[0] for b in batches) / sum(b[1] for b in batches), 2)
    row = {"app": app, "engine": engine, "workers": workers, **level, **level["latency_ms"]}
    print(f"  {app} ({engine}) workers={workers} c={row['concurrency']}: {row['requests_per_s']} req/s, "
          f"p50 {row['p50']} ms, p99 {row['p99']} ms, errors {row['errors']}", flush=True)  # fmt: skip
    return row


def engine_of(url: str) -> str:
    """What the app serves, from its /v1/model: "<backend>-<precision>" (e.g. onnxruntime-int8)."""
    status, body = servers.get(f"{url}/v1/model")
    if status != 200:
        return "unknown"
    info = json.loads(body)
    return f"{info.get('backend', '?')}-{info.get('precision', '?')}"


def image_sizes(bodies: list[bytes]) -> dict[str, int]:
    from PIL import Image

    sizes: Counter = Counter()
    for data in bodies:
        with Image.open(io.BytesIO(data)) as im:
            sizes[f"{im.width}x{im.height}"] += 1
    return dict(sizes)


def open_ceiling(args: argparse.Namespace, served: Path, backend: str | None, jpeg: bytes) -> Any:
    """The network-only ceiling of what the service serves (``bench.ceiling.NetworkCeiling``), fed a
    BCCD photo; None when ``--ceiling`` is off (auto: on a CPU only)."""
    if args.ceiling == "off" or (args.ceiling == "auto" and args.device == "cuda"):
        return None
    from bench.ceiling import NetworkCeiling
    from model.preprocess import load_image

    with tempfile.NamedTemporaryFile(suffix=".jpg") as f:
        f.write(jpeg)
        f.flush()
        image = load_image(f.name)
    return NetworkCeiling(served, backend or args.backend, image=image)


def measure_ceiling(ceiling: Any, args: argparse.Namespace, when: str) -> dict[str, Any] | None:
    if ceiling is None:
        return None
    out = {"when": when, **ceiling.measure(args.ceiling_duration)}
    print(f"network-only ceiling {when} ({out['engine']}, {out['threads']} threads): batch-1 {out['batch1_ms']} ms, "
          f"{out['images_per_s']} img/s with {out['streams']} streams", flush=True)  # fmt: skip
    return out


def service_model(args: argparse.Namespace, checkpoint: Path) -> tuple[Path, str | None]:
    """(what the service serves, its backend or None for --backend): with ``--cpu-engine``,
    ``conversion.cpu_engine``'s artifact of the checkpoint."""
    if args.cpu_engine is None:  # an ONNX model given as --model: the service's backend auto serves it
        return checkpoint, None if file_kind(checkpoint) == "checkpoint" else "auto"
    import os

    from conversion.cpu_engine import prepare_cpu_artifact

    default = Path(os.environ.get("REFINEDET_CACHE_DIR") or Path.home() / ".cache" / "refinedet")
    choice = prepare_cpu_artifact(checkpoint, args.cache_dir or default, engine=args.cpu_engine)
    print(f"CPU engine: {choice.engine} {choice.artifact} ({choice.reason})", flush=True)
    return choice.artifact, choice.backend


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every app's sweep (the ceiling first); the JSON (if asked for) is rewritten after every level."""
    levels, apps, extra = check(args)
    worker_counts = parse_list(args.workers, int)
    model = resolve_checkpoint(args.model, workdir)
    bodies = read_jpegs(find_jpegs(args.images, limit=args.max_images))
    log_dir = args.log_dir or workdir
    served, backend = service_model(args, model)
    runtime = peer_runtime(args, served, backend)
    result: dict[str, Any] = {
        "benchmark": "service",
        "model": str(model),
        "service_model": str(served),
        "peers": {"file": str(served if args.device != "cuda" else model), "runtime": runtime,
                  "litserve_workers": args.litserve_workers},
        "images": {"count": len(bodies), "sizes": image_sizes(bodies), "mean_bytes": sum(map(len, bodies)) // len(bodies)},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {**environment(), "torchvision": _version("torchvision")},
        "ceiling": None,  # the mean of the measurements in "ceilings", taken as the sweep went on
        "ceilings": [],
        "rows": [],
        "service_vs_naive": [],
        "service_vs_litserve": [],
        "service_vs_ceiling": [],
    }  # fmt: skip

    ceiling = open_ceiling(args, served, backend, bodies[0])

    def check_ceiling(when: str, level: int | None = None) -> None:
        measured = measure_ceiling(ceiling, args, when)
        if measured is not None:
            if level is not None:  # measured just before this level, with the servers idle
                measured["level"] = level
            result["ceilings"].append(measured)
            result["ceiling"] = mean_ceiling(result["ceilings"])
            if args.json and result["rows"]:
                write_json(args.json, result)

    def save(row: dict[str, Any]) -> None:
        result["rows"].append(row)
        for peer in PEERS:
            result[f"service_vs_{peer}"] = ratios(result["rows"], peer)
        result["service_vs_ceiling"] = versus_ceiling(result["rows"], result["ceiling"], result["ceilings"])
        result["summary"] = summary(result)
        if args.json:
            write_json(args.json, result)

    targets = [(a, w) for a in apps for w in (worker_counts if a == "service" else [1])]

    def start(stack: contextlib.ExitStack, app: str, workers: int) -> tuple[str, str]:
        """Start ``app`` (stopped when ``stack`` closes); (base URL, engine it serves)."""
        on_gpu = app == "naive" and args.device == "cuda"  # the GPU naive app runs the checkpoint
        argv, env = app_command(app, args, model if on_gpu else served, workers, runtime)
        if app == "service" and backend is not None:
            env["REFINEDET_BACKEND"] = backend
        print(f"{app} (workers {workers}): starting {' '.join(argv)}", flush=True)
        env = servers.server_env({**env, **(extra if app == "service" else {})})
        # Each worker loads its own model and logs "ready: ..." when it has: wait for all of them.
        marker = READY_LOG_MARKER if app == "service" else None
        url = stack.enter_context(servers.running(argv, env, log_dir / f"{app}_server.log",
                                                  args.ready_timeout, marker, workers))  # fmt: skip
        return url, engine_of(url)

    check_ceiling("at the start", levels[0] if args.rounds > 1 else None)
    if args.rounds == 1:  # app after app: one server up at a time; the ceiling again at the end
        for app, workers in targets:
            with contextlib.ExitStack() as stack:
                url, engine = start(stack, app, workers)
                for c in levels:
                    part = measure(app, workers, url, bodies, c, args.duration, args)
                    save(finish_row(app, workers, engine, [part]))
        check_ceiling("at the end")
        return result
    with contextlib.ExitStack() as stack:  # every server up; each level in rounds, the apps taking turns
        urls = {t: start(stack, *t) for t in targets}
        for k, c in enumerate(levels):
            if k > 0:
                check_ceiling(f"before concurrency {c}", c)
            parts: dict[tuple[str, int], list[dict[str, Any]]] = {t: [] for t in targets}
            for _ in range(args.rounds):
                for t in targets:
                    parts[t].append(measure(*t, urls[t][0], bodies, c, args.duration / args.rounds, args))
            for t in targets:
                save(finish_row(*t, urls[t][1], parts[t]))
        check_ceiling("at the end")
    return result


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers
    try:
        with tempfile.TemporaryDirectory(prefix="refinedet-service-bench-") as tmp:
            result = run(args, Path(tmp))
    except UserError as exc:
        print(f"service_bench: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(report(result))
    if args.json:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

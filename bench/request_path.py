"""Where one /detect request's time goes on a CPU, stage by stage, against the network alone.

In this process, one stage after another on the same photos, with the service's own parts (its backend
from the same settings, ``service.detector.Detector``, the route's ``detection_dicts`` and JSON encoding):
header check, JPEG decode (in the engine slot; also at a reduced DCT scale), preprocess, network
(a lone request's call: all the engine's threads), post-processing, response (detection dicts + JSON).
Then through HTTP: ``refinedet serve`` on the same file, one client, keep-alive, the photo as the raw
body: the client's latency, the handler's ``Server-Timing`` total, and what lies outside it (uvicorn,
the protocol, the middleware, sending); ``GET /healthz`` gives a bare round trip through the same stack.

``--compare-rev REV`` also times ``model/preprocess.py`` and ``model/postprocess.py`` as they were at git
revision REV, in the same run (before/after ratios), and checks they give the same detections.

    python -m bench.request_path --cpu-engine auto --requests 60 --compare-rev c13c0ff \\
        --json bench/results/request_path_cpu.json
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bench import servers
from bench.common import (
    REPO_ROOT,
    environment,
    find_jpegs,
    format_table,
    read_jpegs,
    resolve_checkpoint,
    write_json,
)
from model.errors import UserError

COLUMNS = (("stage", "stage"), ("p50_ms", "p50 ms"), ("mean_ms", "mean ms"), ("vs_network", "x network"),
           ("note", ""))  # fmt: skip


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def stage(name: str, samples: list[float], network_ms: float | None, note: str = "") -> dict[str, Any]:
    p50 = median(samples)
    return {"stage": name, "p50_ms": p50, "mean_ms": round(statistics.fmean(samples), 3),
            "vs_network": round(p50 / network_ms, 3) if network_ms else None, "note": note}  # fmt: skip


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1e3


def module_at(rev: str, path: str) -> ModuleType:
    """``path`` (e.g. model/postprocess.py) as it was at git revision ``rev``, imported under a new name."""
    try:
        source = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO_ROOT, check=True,
                                capture_output=True, text=True).stdout  # fmt: skip
    except subprocess.CalledProcessError as exc:
        raise UserError(f"--compare-rev: git show {rev}:{path} failed: {exc.stderr.strip()}") from None
    name = f"_at_{rev}_{Path(path).stem}"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, f.name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def in_process(backend: Any, jpegs: list[bytes], rounds: int, rev: str | None) -> list[dict[str, Any]]:
    """Per-stage samples over ``rounds`` passes of the photos, one request's stages after another."""
    from fastapi.responses import JSONResponse

    from model.preprocess import preprocess
    from service.detector import BatchDetector, stack_if_same_size
    from service.imaging import read_header
    from service.routes.detect import detection_dicts

    detector = BatchDetector(backend)
    config = detector.config
    engine_threads = torch.get_num_threads()  # what the service's loader set (create_backend)
    host_threads = detector.host_threads or engine_threads  # what Detector.detect runs PyTorch's parts on
    torch.set_num_threads(host_threads)
    old = {name: module_at(rev, f"model/{name}.py") for name in ("preprocess", "postprocess")} if rev else {}
    old_post = old["postprocess"].PostProcessor(config) if old else None
    names = ("header", "decode", "decode_reduced", "preprocess", "network", "postprocess", "response",
             "preprocess_before", "postprocess_before", "preprocess_n", "postprocess_n")  # fmt: skip
    t: dict[str, list[float]] = {k: [] for k in names}
    mismatches = 0
    for _ in range(rounds):
        for data in jpegs:
            header, ms = timed(lambda d=data: read_header(d, 1 << 40, 1))
            t["header"].append(ms)
            [pixels], ms = timed(lambda h=header, d=data: detector.decode([h.deferred(d)]))
            t["decode"].append(ms)
            t["decode_reduced"].append(_decode_at(header, data, config.input_size))
            x, ms = timed(
                lambda p=pixels: preprocess(stack_if_same_size([p]), config.input_size, config.normalization)
            )
            t["preprocess"].append(ms)
            outputs, ms = timed(lambda x=x: backend.infer(x))
            t["network"].append(ms)
            detections, ms = timed(lambda o=outputs: detector.postprocess(o))
            t["postprocess"].append(ms)
            boxes, scores, labels = detections.per_image()[0]

            def respond(b=boxes, s=scores, lab=labels, h=header) -> bytes:
                from service.detector import ImageDetections

                result = ImageDetections(b, s, lab, None)  # type: ignore[arg-type]
                found = detection_dicts(result, h.width, h.height, config.class_names, 0.5, None, 200)
                body = {"detections": found, "image": {"width": h.width, "height": h.height}}
                return bytes(JSONResponse(body).body)

            t["response"].append(timed(respond)[1])
            torch.set_num_threads(engine_threads)  # PyTorch's parts on the engine's threads, as before
            t["preprocess_n"].append(timed(lambda p=pixels: preprocess(stack_if_same_size([p]), config.input_size,
                                                                        config.normalization))[1])  # fmt: skip
            t["postprocess_n"].append(timed(lambda o=outputs: detector.postprocess(o))[1])
            torch.set_num_threads(host_threads)
            if old:
                old_pre = old["preprocess"].preprocess
                x_before, ms = timed(
                    # as it was: pil_to_rgb's contiguous copy, torch.stack, the resize in NCHW
                    lambda p=pixels, f=old_pre: f(
                        torch.stack([p.contiguous()]), config.input_size, config.normalization
                    )
                )
                t["preprocess_before"].append(ms)
                mismatches += not torch.equal(x_before, x)
                before, ms = timed(lambda o=outputs: old_post.to_host(o, backend.anchors))
                t["postprocess_before"].append(ms)
                mismatches += not all(torch.equal(getattr(before, k), getattr(detections, k))
                                      for k in ("boxes_xyxy", "scores", "labels"))  # fmt: skip
    network = median(t["network"])
    rows = [
        stage("header check (handler)", t["header"], network),
        stage("JPEG decode (engine slot)", t["decode"], network, "PIL, channels-last view"),
        stage(
            "JPEG decode, reduced to the input", t["decode_reduced"], network, "DCT scaling: off by default"
        ),
        stage("preprocess", t["preprocess"], network, f"{host_threads} torch threads"),
        stage("network", t["network"], network, f"{backend.name}-{backend.precision}"),
        stage("post-process", t["postprocess"], network, f"{host_threads} torch threads"),
        stage("response: dicts + JSON", t["response"], network),
        stage(f"preprocess, {engine_threads} torch threads", t["preprocess_n"], network),
        stage(f"post-process, {engine_threads} torch threads", t["postprocess_n"], network),
    ]
    if old:
        rows.append(stage(f"preprocess at {rev}", t["preprocess_before"], network, "incl. the decode's copy"))
        rows.append(stage(f"post-process at {rev}", t["postprocess_before"], network,
                          f"{mismatches} of {len(t['postprocess'])} differ (input or detections)"))  # fmt: skip
    return rows


def _decode_at(header: Any, data: bytes, at_least: int | None) -> float:
    from service.decoding import decode_on_host

    return timed(lambda: decode_on_host([header.deferred(data)], at_least))[1]


def server_timing(value: str) -> dict[str, float]:
    """``"decode;dur=0.1, total;dur=5"`` -> {"decode": 0.1, "total": 5.0}."""
    out = {}
    for part in value.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def over_http(url: str, jpegs: list[bytes], requests: int) -> list[dict[str, Any]]:
    """One keep-alive client: /detect's latency and Server-Timing, and GET /healthz's round trip."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    client, handler, bare = [], [], []
    timings: dict[str, list[float]] = {}
    for i in range(requests + 3):  # three unrecorded first
        start = time.perf_counter()
        conn.request("POST", "/detect", body=jpegs[i % len(jpegs)], headers={"Content-Type": "image/jpeg"})
        resp = conn.getresponse()
        resp.read()
        elapsed = (time.perf_counter() - start) * 1e3
        if resp.status != 200:
            raise UserError(f"/detect answered {resp.status}")
        if i >= 3:
            parts = server_timing(resp.getheader("Server-Timing") or "")
            client.append(elapsed)
            handler.append(parts.get("total", 0.0))
            for k, v in parts.items():
                timings.setdefault(k, []).append(v)
        start = time.perf_counter()
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        bare.append((time.perf_counter() - start) * 1e3)
    conn.close()
    rows = [stage(f"service Server-Timing: {k}", v, None) for k, v in timings.items()]
    rows.append(stage("HTTP /detect, client latency", client, None))
    rows.append(stage("outside the handler (client - total)", [c - h for c, h in zip(client, handler, strict=True)],
                      None, "uvicorn, protocol, middleware, send, client"))  # fmt: skip
    rows.append(stage("HTTP GET /healthz round trip", bare, None, "the bare stack"))
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.common import service_backend
    from bench.service_bench import service_model
    from service.process import prepare_process
    from service.settings import Settings

    prepare_process()  # the serving process's allocator settings: they matter to every stage's time
    checkpoint = resolve_checkpoint(args.model, Path(tempfile.gettempdir()))
    served, backend_name = service_model(args, checkpoint)
    jpegs = read_jpegs(find_jpegs(args.images, limit=args.max_images))
    backend, _ = service_backend(Settings(model=served, backend=backend_name or "auto", device="cpu"))
    backend.load()
    backend.warmup(2)
    with torch.inference_mode():
        rows = in_process(backend, jpegs, args.rounds, args.compare_rev)
    network_ms = next(r["p50_ms"] for r in rows if r["stage"] == "network")
    del backend
    env = servers.server_env({"REFINEDET_MODEL": str(served), "REFINEDET_BACKEND": backend_name or "auto",
                              "REFINEDET_DEVICE": "cpu", "REFINEDET_ACCESS_LOG": "false"})  # fmt: skip
    argv = [*servers.refinedet_command(), "serve", "--host", servers.HOST, "--port", "{port}", "--plain-logs"]
    with tempfile.TemporaryDirectory(prefix="refinedet-request-path-") as tmp:
        log = Path(args.log_dir or tmp) / "service.log"
        with servers.running(argv, env, log, args.ready_timeout) as url:
            http_rows = over_http(url, jpegs, args.requests)
    for r in http_rows:
        r["vs_network"] = round(r["p50_ms"] / network_ms, 3)
    return {"benchmark": "request_path", "served": str(served), "images": len(jpegs), "rounds": args.rounds,
            "requests": args.requests, "compare_rev": args.compare_rev, "environment": environment(),
            "rows": rows + http_rows}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.request_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint (default: the shipped one)")
    p.add_argument("--cpu-engine", choices=["auto", "int8", "fp32", "torch"], default="auto",
                   help="serve conversion.cpu_engine's artifact of --model, as `refinedet serve` does (default auto)")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, help="--cpu-engine's cache (default REFINEDET_CACHE_DIR)")
    p.add_argument("--images", action="append", default=[], help="JPEG file or folder (default: BCCD)")
    p.add_argument("--max-images", type=int, default=16, help="distinct photos (default 16)")
    p.add_argument("--rounds", type=int, default=2, help="in-process passes over the photos (default 2)")
    p.add_argument("--requests", type=int, default=40, help="HTTP requests, one at a time (default 40)")
    p.add_argument("--compare-rev", help="also time model/{pre,post}process.py at this git revision")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the service")
    p.add_argument("--log-dir", type=Path, help="the service's log here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write the results here (atomically)")
    args = p.parse_args(argv)
    try:
        result = run(args)
    except UserError as exc:
        print(f"request_path: error: {exc}", file=sys.stderr)
        return 2
    cpu = result["environment"].get("cpu_info") or {}
    print(f"CPU: {cpu.get('model_name')}, flags {' '.join(cpu.get('flags', []))}; load average "
          f"{result['environment'].get('load_average')}; served {result['served']}")  # fmt: skip
    print(format_table(result["rows"], COLUMNS))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

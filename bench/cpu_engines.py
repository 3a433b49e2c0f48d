"""Every CPU engine of ``conversion.cpu_engine`` on this CPU: batch-1 latency, 2-stream throughput and
BCCD test VOC07 mAP, one table (``python -m bench.model_bench --cpu-engines``).

Engines: ``torch-fp32`` (the checkpoint, eager), ``onnxruntime-fp32`` / ``onnxruntime-int8`` and
``openvino-fp32`` / ``openvino-int8`` on the same two ONNX files the engine choice makes (the INT8 one
quantized from the shipped ranges table), built into ``--cache-dir`` once. OpenVINO's precision is what
it compiled (bf16 for the FP32 file on a CPU with BF16).

- **batch-1 ms**: median of network-only calls on one normalised 320x320 input with ``--threads``
  threads, the engines interleaved call by call (load from other processes falls on all alike);
- **2-stream img/s**: ``--streams`` Python threads calling at once for ``--stream-seconds`` (in 4
  windows per engine, the engines in turn), each with a one-thread engine (ONNX Runtime: a one-thread session per stream; OpenVINO: one compiled model with a
  one-thread stream per caller; torch: one intra-op thread per calling thread), what the service does
  under load (``service.detector.CpuShare``);
- **mAP**: ``model.evaluation.evaluate_voc`` (the code behind ``refinedet eval``) of the engine on
  ``--data``'s ``--split``, VOC07 11-point, the model's score threshold.

Timing runs ``--repeats`` times (the rows show each run); mAP once. Ratios between engines in one run
are what to compare on a shared machine.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

THROUGHPUT_SLICES = 4  # windows per engine and run, taken in turn
ENGINES = ("torch-fp32", "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-int8")


@dataclass
class EngineOptions:
    checkpoint: Path
    cache_dir: Path
    threads: int
    streams: int
    latency_runs: int
    stream_seconds: float
    repeats: int
    data: Path | None
    split: str
    engines: tuple[str, ...] = ENGINES


def artifacts(checkpoint: Path, cache_dir: Path, precisions: set[str]) -> dict[str, Path]:
    """{"fp32": .onnx, "int8": .onnx} of ``checkpoint`` for the wanted ``precisions``, made like the
    engine choice makes them (the INT8 one from the ranges table beside the checkpoint)."""
    from conversion.cpu_engine import _fp32_onnx, _int8_onnx, _ranges_table
    from model.checkpoint import file_sha256

    folder = cache_dir / "cpu" / file_sha256(checkpoint)[:16]
    files = {"fp32": _fp32_onnx(checkpoint, folder, 1800.0)}
    if "int8" in precisions:
        files["int8"] = _int8_onnx(files["fp32"], folder, _ranges_table(checkpoint), 1800.0)
    return files


def make_engine(name: str, model: Any, files: dict[str, Path], threads: int, streams: int = 1) -> Any:
    """A callable images [B, 3, S, S] -> outputs for engine ``name``; ``streams`` > 1: safe to call from
    that many threads at once, each call on ``threads`` threads."""
    runtime, precision = name.rsplit("-", 1)
    if runtime == "torch":
        return model
    if runtime == "onnxruntime":
        from model.runtime.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(files[precision], intra_op_threads=threads)
    from model.runtime.openvino import OpenVinoRunner

    return OpenVinoRunner(files[precision], threads=threads, streams=streams)


def latency_ms(engines: dict[str, Callable[[Any], Any]], size: int, runs: int) -> dict[str, float]:
    """Median ms of batch-1 calls, the engines interleaved, after two warm-up calls each."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 60
    samples: dict[str, list[float]] = {n: [] for n in engines}
    with torch.inference_mode():
        for call in engines.values():
            call(x), call(x)
        for _ in range(runs):
            for name, call in engines.items():
                start = time.perf_counter()
                call(x)
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {n: round(statistics.median(v), 1) for n, v in samples.items()}


def throughput(calls: list[Callable[[Any], Any]], size: int, seconds: float) -> tuple[int, float]:
    """(images, seconds) of one thread per engine in ``calls`` calling it at once (batch 1) for
    ``seconds`` (after one warm-up call each)."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 60
    counts = [0] * len(calls)
    ready = threading.Barrier(len(calls) + 1)
    stop = threading.Event()

    def work(i: int) -> None:
        torch.set_num_threads(1)  # torch's intra-op threads are per calling thread
        with torch.inference_mode():
            calls[i](x)
            ready.wait()
            while not stop.is_set():
                calls[i](x)
                counts[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for w in workers:
        w.start()
    ready.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return sum(counts), time.perf_counter() - start


def interleaved_throughput(streams: dict[str, list[Callable[[Any], Any]]], size: int, seconds: float,
                           slices: int = THROUGHPUT_SLICES) -> dict[str, float]:  # fmt: skip
    """Images/s of each engine's streams, measured in ``slices`` windows per engine taken in turn (so
    that load from other processes falls on all alike), ``seconds`` in all per engine."""
    done = {name: [0, 0.0] for name in streams}
    for _ in range(slices):
        for name, calls in streams.items():
            images, elapsed = throughput(calls, size, seconds / slices)
            done[name][0] += images
            done[name][1] += elapsed
    return {name: round(images / elapsed, 2) for name, (images, elapsed) in done.items()}


def voc_map(engine: Any, model: Any, data: Path, split: str) -> float:
    """VOC07 mAP (percent) of ``engine`` (the checkpoint's model, or an artifact runner) on the split."""
    from model.data.voc import VOCDetection
    from model.evaluation.artifact import ArtifactNetwork
    from model.evaluation.runner import evaluate_voc

    network = model if engine is model else ArtifactNetwork(engine).eval()
    dataset = VOCDetection(data, split, class_names=model.config.class_names, keep_difficult=True)
    result = evaluate_voc(network, dataset, device="cpu", batch_size=8, use_07_metric=True,
                          postprocess=model.config.postprocess, progress=False)  # fmt: skip
    return round(100.0 * float(result["mAP"]), 2)


def measure(opts: EngineOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Rows {engine, precision, latency_ms: [per run], streams_img_s: [per run], map} for every engine."""
    from model.checkpoint import load_model

    torch.set_num_threads(opts.threads)
    model, _ = load_model(opts.checkpoint, map_location="cpu")
    model = model.eval().requires_grad_(False)
    size = model.config.input_size
    files = artifacts(opts.checkpoint, opts.cache_dir, {n.rsplit("-", 1)[1] for n in opts.engines})
    engines = {n: make_engine(n, model, files, opts.threads) for n in opts.engines}
    rows: dict[str, dict[str, Any]] = {n: {"engine": n, "precision": getattr(e, "precision", "fp32"), "latency_ms": [], "streams_img_s": []}
            for n, e in engines.items()}  # fmt: skip
    # what concurrent calls run: one one-thread engine per stream (OpenVINO: one model, a stream per caller)
    streams: dict[str, list[Any]] = {}
    for name in opts.engines:
        if name.startswith("openvino"):
            streams[name] = [make_engine(name, model, files, 1, opts.streams)] * opts.streams
        else:
            streams[name] = [make_engine(name, model, files, 1) for _ in range(opts.streams)]
    for run in range(opts.repeats):
        torch.set_num_threads(opts.threads)
        for name, ms in latency_ms(engines, size, opts.latency_runs).items():
            rows[name]["latency_ms"].append(ms)
        for name, rate in interleaved_throughput(streams, size, opts.stream_seconds).items():
            rows[name]["streams_img_s"].append(rate)
        log(f"run {run + 1}: " + ", ".join(f"{n} {r['latency_ms'][-1]} ms / {r['streams_img_s'][-1]} img/s"
                                           for n, r in rows.items()))  # fmt: skip
    torch.set_num_threads(opts.threads)
    if opts.data is not None:
        for name, engine in engines.items():
            rows[name]["map"] = voc_map(engine, model, opts.data, opts.split)
            log(f"{name}: mAP {rows[name]['map']}")
    return {"engines": list(rows.values()), "artifacts": {k: str(v) for k, v in files.items()}}


def table(rows: list[dict[str, Any]]) -> str:
    from bench.common import format_table

    flat = [{**r, "latency": " / ".join(map(str, r["latency_ms"])),
             "img_s": " / ".join(map(str, r["streams_img_s"])),
             "map": None if r.get("map") is None else f"{r['map']:.2f}"} for r in rows]  # fmt: skip
    columns = [("engine", "engine"), ("precision", "precision"), ("latency", "batch-1 ms (per run)"),
               ("img_s", "2-stream img/s (per run)"), ("map", "VOC07 mAP")]  # fmt: skip
    return format_table(flat, columns)


def add_arguments(p: Any) -> None:
    """``bench.model_bench``'s options for ``--cpu-engines``."""
    g = p.add_argument_group(
        "--cpu-engines: every CPU engine's latency, throughput and mAP (bench/cpu_engines.py)"
    )
    g.add_argument("--cpu-engines", action="store_true", help="measure the CPU engines instead of the rows")
    g.add_argument(
        "--cache-dir", type=Path, help="where the ONNX files are made (default: REFINEDET_CACHE_DIR)"
    )
    g.add_argument("--data", help="VOC root for mAP (default: BCCD, as the photos); 'none': no mAP")
    g.add_argument("--split", default="test", help="data split for mAP (default test)")
    g.add_argument("--streams", type=int, default=2, help="concurrent one-thread callers (default 2)")
    g.add_argument("--stream-seconds", type=float, default=8.0, help="seconds per throughput run (default 8)")
    g.add_argument("--repeats", type=int, default=2, help="timing runs (default 2)")
    g.add_argument(
        "--latency-runs", type=int, default=15, help="batch-1 calls per engine and run (default 15)"
    )
    g.add_argument("--engines", default=",".join(ENGINES), help=f"from {','.join(ENGINES)}")


def options(args: Any) -> EngineOptions:
    from bench.common import bccd_jpeg_dir, parse_list
    from model.cpu import usable_cores
    from model.errors import UserError
    from model.zoo import default_checkpoint
    from service.settings import Settings

    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    if checkpoint is None or not checkpoint.is_file():
        raise UserError(f"--cpu-engines needs a trained checkpoint (--checkpoint), got {checkpoint}")
    engines = tuple(parse_list(args.engines))
    if set(engines) - set(ENGINES) or args.streams < 1 or args.repeats < 1 or args.stream_seconds <= 0:
        raise UserError(
            f"--engines from {','.join(ENGINES)}; --streams, --repeats >= 1; --stream-seconds > 0"
        )
    bccd = bccd_jpeg_dir()
    data = None if args.data == "none" else Path(args.data) if args.data else (bccd.parent if bccd else None)
    if data is None:
        print("bench: no VOC data set found (give --data VOC_ROOT): no mAP column", flush=True)
    cache = args.cache_dir or Settings().cache_dir
    return EngineOptions(checkpoint, cache, args.threads or usable_cores(), args.streams, max(args.latency_runs, 3),
                         args.stream_seconds, args.repeats, data, args.split, engines)  # fmt: skip


def main(args: Any) -> int:
    from bench.common import environment, write_json
    from model.cpu import cpu_info
    from model.runtime.openvino import openvino_version

    opts = options(args)
    env = {**environment(), "openvino": openvino_version()}
    cpu = cpu_info()
    print(f"CPU engines on {cpu.model_name} ({', '.join(cpu.flags)}; {cpu.usable_cores} usable cores), "
          f"{opts.threads} threads, load average {env['load_average']}", flush=True)  # fmt: skip
    result = {"benchmark": "cpu_engines", "checkpoint": str(opts.checkpoint), "environment": env,
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
              **measure(opts, lambda line: print(line, flush=True))}  # fmt: skip
    print()
    print(table(result["engines"]))
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return 0

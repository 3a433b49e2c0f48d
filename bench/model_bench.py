"""Model benchmark: every backend x precision x batch size x input size, network only and network +
post-processing, with the bare VGG-16 trunk as the floor and PyTorch eager FP32 as the naive baseline.

    python -m bench.model_bench --json out/model_bench.json             # all defaults for this machine
    python -m bench.model_bench --device cpu --threads 2 --sizes 320 --batch-sizes 1
    python -m bench.model_bench --cpu-engines --threads 2 --json bench/results/cpu_engines.json

Rows: ``net`` times ``backend.infer`` on random inputs; ``net+post`` times infer + the shared
post-processing (``BatchDetector.postprocess``) + the copy of the detections to the host, on real photos
(BCCD JPEGs, so the candidate counts are a real image's). Every row also gets the GFLOP/s it achieves
(network FLOPs per image x images/s) and, on the CPU, that as a share of ONNX Runtime's own GEMM
ceiling in its precision (``bench.roofline``). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import cpu_engines, model_report, roofline
from bench.common import environment, find_jpegs, parse_list, resolve_checkpoint, write_json
from bench.model_setup import (
    BACKENDS,
    CALIBRATION_PHOTOS,
    INT8,
    TRUNK,
    RealImages,
    Trunk,
    checkpoint_at_size,
    local_checkpoint,
    make_backend,
    random_images,
    row_precision,
    skip_reason,
)
from bench.timing import summarize, time_iterations
from model.errors import UserError

GPU_DEFAULTS = {"sizes": "320,512", "batch_sizes": "1,8,32,128", "precisions": "fp16,fp32",
                "backends": ",".join(b for b in BACKENDS if b != INT8)}  # fmt: skip
CPU_DEFAULTS = {
    "sizes": "320",
    "batch_sizes": "1",
    "precisions": "fp32",
    "backends": f"torch-eager,onnxruntime,{INT8}",
}


@dataclass
class Options:
    device: torch.device
    checkpoint: str | None
    sizes: list[int]
    batch_sizes: list[int]
    precisions: list[str]
    backends: list[str]
    iters: int
    warmup: int
    time_budget: float
    max_seconds: float | None
    threads: int | None
    images: list[str]
    json: Path | None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.model_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--checkpoint", help="default: the shipped checkpoint, else random weights (BCCD classes)")
    p.add_argument("--sizes", help="input sizes, multiples of 64 (GPU default 320,512; CPU 320)")
    p.add_argument("--batch-sizes", help="GPU default 1,8,32,128; CPU 1")
    p.add_argument("--precisions", help="fp16,fp32 (GPU default both; CPU fp32)")
    p.add_argument("--backends", help=f"from {','.join(BACKENDS)} (CPU default {CPU_DEFAULTS['backends']})")
    p.add_argument("--iters", type=int, default=200, help="timed iterations per row at most (default 200)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations per row (default 5)")
    p.add_argument("--time-budget", type=float, default=2.0, help="seconds of timed iterations per row")
    p.add_argument("--max-seconds", type=float, help="stop starting new rows after this many seconds")
    p.add_argument("--threads", type=int, help="CPU threads for torch and onnxruntime (default: all)")
    p.add_argument("--images", action="append", default=[], help="JPEG file or folder (default: BCCD)")
    p.add_argument("--json", type=Path, help="write the results here (atomically, after every row group)")
    cpu_engines.add_arguments(p)
    return p


def options_from(args: argparse.Namespace) -> Options:
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but PyTorch sees no CUDA GPU; use --device cpu")
    defaults = GPU_DEFAULTS if device_name == "cuda" else CPU_DEFAULTS
    pick = {k: getattr(args, k) or v for k, v in defaults.items()}
    backends = parse_list(pick["backends"])
    unknown = set(backends) - set(BACKENDS)
    precisions = parse_list(pick["precisions"])
    if unknown or set(precisions) - {"fp32", "fp16"}:
        raise UserError(f"--backends from {', '.join(BACKENDS)} and --precisions from fp32, fp16")
    if args.iters < 1 or args.warmup < 0 or args.time_budget <= 0:
        raise UserError("--iters must be >= 1, --warmup >= 0 and --time-budget > 0")
    return Options(
        torch.device(device_name), args.checkpoint, parse_list(pick["sizes"], int),
        parse_list(pick["batch_sizes"], int), precisions, backends, args.iters, args.warmup,
        args.time_budget, args.max_seconds, args.threads, args.images, args.json,
    )  # fmt: skip


class Run:
    """One benchmark run: measures row groups and keeps the results (written after each group)."""

    def __init__(self, opts: Options, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.source = resolve_checkpoint(opts.checkpoint, workdir)
        self.checkpoint, self.ckpt = local_checkpoint(self.source, workdir)
        self.trained = bool(self.ckpt.get("metadata", {}).get("trained", True))
        self.photos = RealImages(find_jpegs(opts.images, limit=max(opts.batch_sizes)))
        self.calibration = find_jpegs(opts.images, limit=CALIBRATION_PHOTOS)
        self.rows: list[dict[str, Any]] = []
        self.flops: dict[int, dict[str, int]] = {}  # per input size: network and trunk FLOPs per image
        self.ceilings = roofline.gemm_ceilings(opts.threads) if opts.device.type == "cpu" else {}
        self.environment = environment()  # before the run: its load average says how quiet the machine was
        self.started = time.perf_counter()

    def result(self) -> dict[str, Any]:
        model_report.add_trunk_ratios(self.rows)
        return {
            "benchmark": "model",
            "checkpoint": str(self.source),
            "trained": self.trained,
            "device": str(self.opts.device),
            "environment": self.environment,
            "settings": {k: v for k, v in vars(self.opts).items() if k not in ("device", "json")},
            "flops_per_image": {str(size): f for size, f in self.flops.items()},
            "gemm_ceilings": self.ceilings,
            "rows": self.rows,
            "summary": model_report.summary(self.rows),
        }

    def save(self) -> None:
        if self.opts.json:
            write_json(self.opts.json, self.result())

    def out_of_time(self) -> bool:
        limit = self.opts.max_seconds
        return limit is not None and time.perf_counter() - self.started > limit

    def all(self) -> None:
        """Row groups in the order precision, backend, size (the targets' FP16 fast-path and trunk rows
        first, so a ``--max-seconds`` cut drops the least important ones)."""
        backbone = self.ckpt["config"].get("backbone", "vgg16")
        sized = {}
        for size in self.opts.sizes:
            sized[size] = checkpoint_at_size(self.checkpoint, self.ckpt, size, self.workdir)
            self.flops[size] = roofline.network_flops(sized[size])
        for precision in self.opts.precisions:
            for name in self.opts.backends:
                for size in self.opts.sizes:
                    reason = skip_reason(name, self.opts.device, precision, backbone)
                    if reason is None and self.out_of_time():
                        reason = "--max-seconds reached"
                    if reason:
                        self.add(name, row_precision(name, precision), size, None, None, skipped=reason)
                    else:
                        self.group(name, precision, size, sized[size])
                    self.save()

    def add(self, backend: str, precision: str, size: int, batch: int | None, mode: str | None, **fields):
        row = {
            "backend": backend,
            "precision": precision,
            "size": size,
            "batch": batch,
            "mode": mode,
            **fields,
        }
        flops = self.flops.get(size, {}).get("trunk" if backend == TRUNK else "network")
        roofline.add_gflops(row, flops, self.ceilings)
        self.rows.append(row)
        stats = f"{row.get('median_ms')} ms median, {row.get('images_per_s')} images/s"
        print(f"  {backend} {precision} {size} b{batch} {mode}: {row.get('skipped') or stats}", flush=True)

    def group(self, name: str, precision: str, size: int, checkpoint: Path) -> None:
        """All batch sizes of one backend x precision x size (one model build)."""
        device, opts = self.opts.device, self.opts
        label = row_precision(name, precision)
        try:
            post_runner = None
            if name == TRUNK:
                runner: Any = Trunk(checkpoint, device, precision, opts.batch_sizes)
            else:
                runner = make_backend(name, checkpoint, device, precision, opts.batch_sizes, self.workdir,
                                      opts.threads, self.calibration)  # fmt: skip
                if getattr(runner, "use_graphs", False):  # torch on CUDA: net+post rows use the fused graphs
                    post_runner = make_backend(name, checkpoint, device, precision, opts.batch_sizes,
                                               self.workdir, fuse_postprocess=True)  # fmt: skip
            for batch in opts.batch_sizes:
                self.measure(name, label, size, batch, runner, post_runner or runner)
        except Exception as exc:  # CUDA out of memory, a runtime's own error...: note it in the row, go on
            self.add(name, label, size, None, None, skipped=f"error: {str(exc).splitlines()[0][:160]}")
        finally:
            runner = post_runner = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def measure(
        self, name: str, precision: str, size: int, batch: int, runner: Any, post_runner: Any
    ) -> None:
        """``runner`` times the network; ``post_runner`` (the same backend, or for torch on CUDA the one
        whose graphs hold the post-processing too) network + post-processing + the copy to the host."""
        from service.detector import BatchDetector

        o = self.opts
        x = random_images(batch, size, o.device)
        samples = time_iterations(lambda: runner.infer(x), o.device, o.warmup, o.iters, o.time_budget)
        self.add(name, precision, size, batch, "net", **summarize(samples, batch))
        if name == TRUNK:
            return
        detector = BatchDetector(post_runner)
        real = self.photos.batch(batch, post_runner.loaded_config, o.device)
        with torch.inference_mode():
            detections = detector.postprocess(post_runner.infer(real))
        per_image = round(float(detections.valid.sum()) / batch, 2)

        @torch.inference_mode()
        def step() -> None:
            detector.postprocess(post_runner.infer(real))  # detections on the host

        samples = time_iterations(step, o.device, o.warmup, o.iters, o.time_budget)
        fused = getattr(post_runner, "fuse_postprocess", None)  # False: the fused capture fell back
        self.add(name, precision, size, batch, "net+post", **summarize(samples, batch),
                 detections_per_image=per_image, **({} if fused is None else {"fused_postprocess": fused}))  # fmt: skip


def measure_all(opts: Options) -> dict[str, Any]:
    """The whole run; torch's CPU thread count is restored afterwards."""
    threads = torch.get_num_threads()
    try:
        if opts.threads:
            torch.set_num_threads(opts.threads)
        with tempfile.TemporaryDirectory(prefix="refinedet-bench-") as tmp:
            run = Run(opts, Path(tmp))
            print(f"model benchmark on {opts.device}: {run.source} (trained: {run.trained})", flush=True)
            run.all()
            run.save()
            return run.result()
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.cpu_engines:
            return cpu_engines.main(args)
        opts = options_from(args)
        result = measure_all(opts)
    except UserError as exc:
        print(f"model_bench: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(model_report.table(result["rows"]))
    print()
    print(model_report.summary_text(result["summary"]))
    if opts.json:
        print(f"\nwrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

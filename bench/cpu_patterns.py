"""How the ways of running one CPU model compare, in one process, on the machine as it is (shared or not):
the measurement behind "Why the service lost to the naive app on a CPU" (docs/benchmarks.md).

    python -m bench.cpu_patterns [--checkpoint C] [--images 4] [--repeats 3] [--json out.json]

Patterns, each timed over ``--images`` batch-1 inferences of the PyTorch model (FP32, eager), the
patterns taking turns ``--repeats`` times so that load from other processes falls on all of them alike:

- ``team``: one inference after another, each on an intra-op team of all usable cores (the service
  before #14, and the naive app at concurrency 1);
- ``threads-N``: N Python threads each running inferences on its own team of all cores (the naive app
  at concurrency N: FastAPI's thread pool);
- ``streams``: as many threads as cores, each inference single-threaded (the service's engine slots under
  load: ``service.detector.CpuShare``);
- ``team-cl``, ``streams-cl``: the same two with the model and input channels-last (the service's torch
  backend's format, on a CPU too).

Reported per pattern: images/s (median over repeats) and CPU seconds per image. Run it twice, with and
without ``OMP_WAIT_POLICY=PASSIVE`` in the environment (libgomp reads it once, when torch loads).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any


def run_threads(
    model: Any, x: Any, images: int, threads: int, per_thread_torch_threads: int | None
) -> tuple[float, float]:
    """(images/s, CPU s per image) of ``images`` inferences spread over ``threads`` Python threads."""
    import torch

    def work(count: int) -> None:
        if per_thread_torch_threads is not None:
            torch.set_num_threads(per_thread_torch_threads)
        with torch.inference_mode():
            for _ in range(count):
                model(x)

    shares = [images // threads + (1 if k < images % threads else 0) for k in range(threads)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    workers = [threading.Thread(target=work, args=(n,)) for n in shares if n]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return images / wall, cpu / images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_patterns", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="default: the shipped checkpoint")
    p.add_argument("--images", type=int, default=4, help="inferences per pattern and repeat (default 4)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive-threads", type=int, default=4, help="N of the threads-N pattern (default 4)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import torch

    from bench.common import environment, resolve_checkpoint, write_json
    from model.checkpoint import load_model
    from model.cpu import usable_cores

    cores = usable_cores()
    torch.set_num_threads(cores)
    model, _ = load_model(
        resolve_checkpoint(str(args.checkpoint) if args.checkpoint else None, Path("/tmp")),
        map_location="cpu",
    )
    model = model.eval().requires_grad_(False)
    x = (
        torch.randn(
            1, 3, model.config.input_size, model.config.input_size, generator=torch.Generator().manual_seed(0)
        )
        * 50
    )
    import copy

    last = torch.channels_last
    model_cl, x_cl = copy.deepcopy(model).to(memory_format=last), x.contiguous(memory_format=last)
    patterns = {
        "team": (1, None, model, x),
        f"threads-{args.naive_threads}": (args.naive_threads, None, model, x),
        "streams": (cores, 1, model, x),
        "team-cl": (1, None, model_cl, x_cl),
        "streams-cl": (cores, 1, model_cl, x_cl),
    }
    run_threads(model, x, 1, 1, None)  # warm-up
    run_threads(model_cl, x_cl, 1, 1, None)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in patterns}
    for _ in range(args.repeats):
        for name, (threads, per_thread, net, inputs) in patterns.items():
            results[name].append(run_threads(net, inputs, args.images, threads, per_thread))
            torch.set_num_threads(cores)
    summary = {
        name: {"images_per_s": round(statistics.median(r[0] for r in runs), 3),
               "cpu_s_per_image": round(statistics.median(r[1] for r in runs), 3),
               "images_per_s_all": [round(r[0], 3) for r in runs]}
        for name, runs in results.items()
    }  # fmt: skip
    wait = os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp spins)")
    print(f"OMP_WAIT_POLICY={wait}, {cores} usable cores, load average {os.getloadavg()}")
    for name, s in summary.items():
        print(f"  {name:12s} {s['images_per_s']:6.3f} images/s  {s['cpu_s_per_image']:6.3f} CPU s/image  "
              f"(repeats {s['images_per_s_all']})")  # fmt: skip
    if args.json:
        write_json(args.json, {"benchmark": "cpu_patterns", "omp_wait_policy": wait, "patterns": summary,
                               "environment": environment()})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What ``deploy.prepare`` needs from the host: GPU / TensorRT / ONNX Runtime probes, the
``refinedet export`` subprocesses (bundled as the injectable ``Probes`` and ``Builders``) and the
readiness check used by the container HEALTHCHECK.

Every probe returns None (or False) when the thing is absent instead of raising, so ``deploy.prepare``
can decide and log one clear fallback line. Nothing heavy is imported at module import time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from model.errors import UserError

BUILD_TIMEOUT_S = 3600
REFINEDET_CLI = (sys.executable, "-m", "refinedet")


@dataclass(frozen=True)
class GpuInfo:
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # e.g. "9.0"


def _first_visible_device(env: Mapping[str, str]) -> str | None:
    """The first CUDA_VISIBLE_DEVICES entry (an index or a GPU UUID), which is the device the server uses."""
    first = env.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return first or None


def parse_nvidia_smi(output: str) -> GpuInfo | None:
    """First row of ``nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader``."""
    for line in output.splitlines():
        name, _, capability = line.rpartition(",")
        if name.strip() and capability.strip():
            return GpuInfo(name.strip(), capability.strip())
    return None


def probe_gpu(env: Mapping[str, str] = os.environ) -> GpuInfo | None:
    """Name and compute capability of the GPU the server will use: nvidia-smi (present when the container
    runs with the NVIDIA runtime), else torch.cuda; None when no GPU is visible."""
    smi = shutil.which("nvidia-smi")
    if smi:
        cmd = [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"]
        device = _first_visible_device(env)
        if device is not None:
            cmd.append(f"--id={device}")
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
            if done.returncode == 0 and (info := parse_nvidia_smi(done.stdout)):
                return info
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return GpuInfo(torch.cuda.get_device_name(0), f"{major}.{minor}")
    except Exception:  # a broken CUDA install is "no GPU" here
        pass
    return None


def probe_tensorrt() -> str | None:
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # ImportError, or OSError for a missing libnvinfer
        return None


def probe_onnxruntime() -> list[str] | None:
    try:
        import onnxruntime

        return list(onnxruntime.get_available_providers())
    except Exception:
        return None


def probe_torch_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def default_checkpoint() -> Path | None:
    """The checkpoint shipped in the package (``model.zoo``), or None."""
    try:
        from model.zoo import default_checkpoint as shipped
    except ImportError:
        return None
    path = shipped()
    return Path(path) if path else None


def _run_cli(args: Sequence[str]) -> None:
    """Run ``refinedet ARGS`` with its output going to ours (the container log); raise on failure, with the
    last line the child wrote on stderr (its error, or a traceback's exception) in the message."""
    what = f"`refinedet {' '.join(args[:2])}`"
    with subprocess.Popen(
        [*REFINEDET_CLI, *args], stderr=subprocess.PIPE, text=True, errors="replace"
    ) as child:
        last: list[str] = []
        relay = threading.Thread(target=_relay, args=(child.stderr, last), daemon=True)
        relay.start()
        try:
            status = child.wait(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            raise RuntimeError(f"{what} ran longer than {BUILD_TIMEOUT_S}s") from None
        finally:
            relay.join(timeout=5)
    said = f": {last[0]}" if last else ""
    if status == 2:  # the CLI's status for bad input (UserError)
        raise UserError(f"{what} rejected its input (status 2){said}")
    if status < 0:
        raise RuntimeError(f"{what} was killed by {signal.Signals(-status).name}")
    if status != 0:
        raise RuntimeError(f"{what} exited with status {status}{said}")


def _relay(stream: Any, last: list[str]) -> None:
    """Copy a child's stderr to ours line by line, keeping its last non-blank line in ``last``."""
    for line in stream:
        sys.stderr.write(line)
        sys.stderr.flush()
        if line.strip():
            last[:] = [line.strip()]


def run_export_onnx(checkpoint: Path, onnx_out: Path) -> None:
    _run_cli(["export", "onnx", "--checkpoint", str(checkpoint), "-o", str(onnx_out)])


def run_build_engine(onnx: Path, plan_out: Path, precision: str, max_batch: int, timing_cache: Path) -> None:
    _run_cli([
        "export", "engine", "--onnx", str(onnx), "-o", str(plan_out), "--precision", precision,
        "--max-batch", str(max_batch), "--timing-cache", str(timing_cache),
    ])  # fmt: skip


class CpuChoice(NamedTuple):
    """What ``refinedet export cpu`` decided: the artifact to serve on this CPU and why."""

    artifact: Path
    backend: str  # openvino | onnxruntime | torch
    engine: str  # e.g. openvino-int8, onnxruntime-int8, onnxruntime-fp32, torch-fp32
    reason: str
    precision: str  # int8 | bf16 | fp32
    fault: str = ""  # one line when the cache could not hold a faster engine (the next start retries)


def run_prepare_cpu(checkpoint: Path, cache_dir: Path, threads: int) -> CpuChoice:
    """``refinedet export cpu``: the fastest verified CPU artifact for ``checkpoint`` (INT8 / FP32 ONNX,
    else the checkpoint itself), made once into ``cache_dir`` (``conversion.cpu_engine``). A subprocess,
    so quantization's memory is not kept by the server."""
    with tempfile.TemporaryDirectory(prefix="refinedet-cpu-") as tmp:
        out = Path(tmp) / "decision.json"
        _run_cli(["export", "cpu", "--checkpoint", str(checkpoint), "--cache-dir", str(cache_dir),
                  "--threads", str(threads), "--json-out", str(out)])  # fmt: skip
        data = json.loads(out.read_text())
    precision = data.get("precision") or data["engine"].rpartition("-")[2]
    return CpuChoice(Path(data["artifact"]), data["backend"], data["engine"], data["reason"], precision,
                     data.get("fault") or "")  # fmt: skip


def run_export_triton(deployment: Any, repo: Path) -> None:
    """``refinedet export triton`` for an ``EnginePlan`` (the engine, when there is one)."""
    if deployment.onnx is None:
        raise UserError("a Triton repository needs an ONNX model or a checkpoint, not only an engine")
    args = ["export", "triton", "--onnx", str(deployment.onnx), "-o", str(repo)]
    if deployment.backend == "tensorrt":
        args += ["--plan", str(deployment.artifact)]
    _run_cli(args)


@dataclass(frozen=True)
class Probes:
    """What this machine has; each returns None (or False) when the thing is absent."""

    gpu: Callable[[], GpuInfo | None] = probe_gpu
    tensorrt_version: Callable[[], str | None] = probe_tensorrt
    onnxruntime_providers: Callable[[], list[str] | None] = probe_onnxruntime
    torch_cuda: Callable[[], bool] = probe_torch_cuda


@dataclass(frozen=True)
class Builders:
    """``export_onnx(checkpoint, onnx_out)``; ``build_engine(onnx, plan_out, precision, max_batch, timing_cache)``;
    ``prepare_cpu(checkpoint, cache_dir, threads) -> CpuChoice``. Each writes its output (and the manifest
    beside it) or raises."""

    export_onnx: Callable[[Path, Path], None] = run_export_onnx
    build_engine: Callable[[Path, Path, str, int, Path], None] = run_build_engine
    prepare_cpu: Callable[[Path, Path, int], CpuChoice] = run_prepare_cpu


def check_ready(port: int, timeout_s: float = 4.0) -> int:
    """Exit status for a container HEALTHCHECK: 0 when GET /readyz on this host's ``port`` answers 200,
    else 1 with one line on stderr saying why (Docker keeps it in ``docker inspect``'s health log)."""
    reason = not_ready_reason(port, timeout_s)
    if reason is None:
        return 0
    print(f"refinedet healthcheck: not ready: {reason}", file=sys.stderr, flush=True)
    return 1


def not_ready_reason(port: int, timeout_s: float = 4.0) -> str | None:
    """Why GET /readyz on this host's ``port`` did not answer 200, in a few words; None when it did."""
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return None if response.status == 200 else f"{url} answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code}{_status_detail(exc)}"
    except urllib.error.URLError as exc:
        cause = exc.reason
        if isinstance(cause, ConnectionRefusedError):
            return f"connection refused on port {port} (nothing listens on 127.0.0.1:{port})"
        if isinstance(cause, TimeoutError):
            return f"no answer from {url} within {timeout_s:g} s"
        return f"{url}: {cause}"
    except TimeoutError:
        return f"no answer from {url} within {timeout_s:g} s"
    except (OSError, ValueError) as exc:
        return f"{url}: {exc}"


def _status_detail(exc: urllib.error.HTTPError) -> str:
    """`` (status loading)`` / `` (status failed: <detail>)`` from the service's JSON body."""
    try:
        body = exc.read(2000).decode("utf-8", "replace")
    except OSError:
        return ""
    try:
        status = json.loads(body)
    except ValueError:
        status = None
    if isinstance(status, dict) and "status" in status:
        detail = f": {status['detail']}" if status.get("detail") else ""
        return f" (status {status['status']}{detail})"
    return " (not the service's JSON status: is the refinedet service on this port?)"

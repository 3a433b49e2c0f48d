"""The model benchmark's roofline: FLOPs per image, and what ONNX Runtime's own matrix multiply
reaches on this CPU in FP32 and INT8 (the ceilings the network's convolutions run against).

- ``network_flops``: ``torch.utils.flop_counter.FlopCounterMode`` over one forward of the network and
  of its bare VGG-16 trunk at batch 1 (a multiply-accumulate counts as 2 FLOPs). A row's GFLOP/s is
  that count times its images/s; an INT8 row counts the same FLOPs (as 8-bit operations).
- ``gemm_ceilings``: a 512^3 ``MatMul`` (float32) and ``MatMulInteger`` (uint8 x int8 -> int32, the
  kernel family QDQ convolutions run on) timed in ONNX Runtime on the CPU with the benchmark's threads;
  the best of 200 runs (the operands fit in cache, so this is the arithmetic ceiling, and the best run
  is the one least disturbed by anything else on the machine).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CEILING_KEYS = {"fp32": "fp32_gflop_s", "int8": "int8_gop_s"}  # row precision -> gemm_ceilings key


def network_flops(checkpoint: Path) -> dict[str, int]:
    """{"network": FLOPs, "trunk": FLOPs} of one image at the checkpoint's input size."""
    from torch.utils.flop_counter import FlopCounterMode

    from model.checkpoint import load_model

    model, _ = load_model(checkpoint)
    size = model.config.input_size
    x = torch.zeros(1, 3, size, size)
    counts = {}
    trunk: torch.nn.Module = model.backbone.features  # type: ignore[assignment]
    for name, module in (("network", model), ("trunk", trunk)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(x)
        counts[name] = int(counter.get_total_flops())
    return counts


def _matmul_model(integer: bool, n: int) -> bytes:
    from onnx import TensorProto, helper

    a_type, b_type = (TensorProto.UINT8, TensorProto.INT8) if integer else (TensorProto.FLOAT,) * 2
    out_type = TensorProto.INT32 if integer else TensorProto.FLOAT
    node = helper.make_node("MatMulInteger" if integer else "MatMul", ["a", "b"], ["c"])
    graph = helper.make_graph(
        [node],
        "gemm",
        [
            helper.make_tensor_value_info("a", a_type, [n, n]),
            helper.make_tensor_value_info("b", b_type, [n, n]),
        ],
        [helper.make_tensor_value_info("c", out_type, [n, n])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def gemm_ceilings(threads: int | None, n: int = 512, repeats: int = 200) -> dict[str, float]:
    """{"fp32_gflop_s", "int8_gop_s"}: the best of ``repeats`` n^3 multiplies (2 n^3 operations)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    inputs = {
        False: {"a": rng.standard_normal((n, n), np.float32), "b": rng.standard_normal((n, n), np.float32)},
        True: {"a": rng.integers(0, 256, (n, n), np.uint8), "b": rng.integers(-128, 128, (n, n), np.int8)},
    }
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    result = {}
    for integer, key in ((False, "fp32_gflop_s"), (True, "int8_gop_s")):
        session = ort.InferenceSession(_matmul_model(integer, n), options, providers=["CPUExecutionProvider"])
        session.run(None, inputs[integer])
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, inputs[integer])
            best = min(best, time.perf_counter() - start)
        result[key] = round(2 * n**3 / best / 1e9, 1)
    return result


def add_gflops(row: dict[str, Any], flops_per_image: int | None, ceilings: dict[str, float]) -> None:
    """Set ``row["gflop_s"]`` (FLOPs per image x images/s) and, where a GEMM ceiling was measured for
    the row's precision, ``row["of_gemm"]`` (the share of it reached); nothing for a skipped row."""
    rate = row.get("images_per_s")
    if not (rate and flops_per_image):
        return
    row["gflop_s"] = round(flops_per_image * rate / 1e9, 1)
    ceiling = ceilings.get(CEILING_KEYS.get(row["precision"], ""))
    if ceiling:
        row["of_gemm"] = round(row["gflop_s"] / ceiling, 2)

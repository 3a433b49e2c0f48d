"""The model benchmark's roofline: FLOP counts, GEMM ceilings and the per-row GFLOP/s."""

from __future__ import annotations

import pytest
import torch

from bench.model_setup import row_precision, skip_reason
from bench.roofline import add_gflops, gemm_ceilings, network_flops

CPU = torch.device("cpu")


def test_network_flops_count_the_convolutions(tiny_checkpoint):
    flops = network_flops(tiny_checkpoint)
    # conv1_1 alone at 64x64: 2 x (3*3*3) x 64 x 64*64 multiply-accumulates
    assert flops["trunk"] > 2 * 27 * 64 * 64 * 64
    assert flops["network"] > flops["trunk"]  # + fc6/fc7, extras, TCBs, heads


def test_gemm_ceilings_are_measured_for_fp32_and_int8():
    ceilings = gemm_ceilings(threads=1, n=64, repeats=2)
    assert set(ceilings) == {"fp32_gflop_s", "int8_gop_s"} and all(v > 0 for v in ceilings.values())


def test_gflops_per_row_and_share_of_the_ceiling_of_its_precision():
    ceilings = {"fp32_gflop_s": 200.0, "int8_gop_s": 800.0}
    fp32 = {"backend": "onnxruntime", "precision": "fp32", "images_per_s": 2.0}
    int8 = {"backend": "onnxruntime-int8", "precision": "int8", "images_per_s": 8.0}
    fp16 = {"backend": "torch", "precision": "fp16", "images_per_s": 100.0}
    skipped = {"backend": "tensorrt", "precision": "fp32", "skipped": "TensorRT needs a CUDA GPU"}
    for row in (fp32, int8, fp16, skipped):
        add_gflops(row, 75 * 10**9, ceilings)
    assert fp32["gflop_s"] == 150.0 and fp32["of_gemm"] == pytest.approx(0.75)
    assert int8["gflop_s"] == 600.0 and int8["of_gemm"] == pytest.approx(0.75)
    assert fp16["gflop_s"] == 7500.0 and "of_gemm" not in fp16  # no fp16 ceiling measured
    assert "gflop_s" not in skipped


def test_the_int8_backend_runs_once_on_the_cpu():
    assert skip_reason("onnxruntime-int8", CPU, "fp32", "vgg16") is None
    assert "once" in skip_reason("onnxruntime-int8", CPU, "fp16", "vgg16")
    assert "CPU" in skip_reason("onnxruntime-int8", torch.device("cuda"), "fp32", "vgg16")
    assert row_precision("onnxruntime-int8", "fp32") == "int8"
    assert row_precision("onnxruntime", "fp32") == "fp32"

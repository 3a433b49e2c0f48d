"""The model benchmark: rebuilding a checkpoint at another size, skip reasons, timing, the report's
ratios, and a whole CPU run on a tiny model that writes the JSON."""

from __future__ import annotations

import json
import time

import pytest
import torch

from bench import model_bench, model_report
from bench.model_setup import Trunk, checkpoint_at_size, local_checkpoint, skip_reason
from bench.timing import MIN_ITERS, summarize, time_iterations
from model.checkpoint import load_model, read_checkpoint

CPU = torch.device("cpu")


def test_checkpoint_at_size_keeps_the_weights_and_rebuilds_the_anchors(tiny_checkpoint, tmp_path):
    ckpt = read_checkpoint(tiny_checkpoint)
    assert checkpoint_at_size(tiny_checkpoint, ckpt, 64, tmp_path) == tiny_checkpoint
    resized = checkpoint_at_size(tiny_checkpoint, ckpt, 128, tmp_path)
    small, _ = load_model(tiny_checkpoint)
    big, _ = load_model(resized)
    assert big.config.input_size == 128 and big.config.class_names == ("a", "b")
    assert big.anchors.shape[0] == big.config.num_anchors == 4 * small.anchors.shape[0]
    for (name, a), (_, b) in zip(small.state_dict().items(), big.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    out = big(torch.randn(1, 3, 128, 128))
    assert out.odm_conf.shape == (1, big.config.num_anchors, 3)


def test_local_checkpoint_reads_once_and_keeps_plain_files(tiny_checkpoint, tmp_path):
    path, ckpt = local_checkpoint(tiny_checkpoint, tmp_path)
    assert path == tiny_checkpoint and ckpt["config"]["input_size"] == 64


def test_skip_reasons_on_the_cpu():
    assert skip_reason("torch-eager", CPU, "fp32", "vgg16") is None
    assert skip_reason("onnxruntime", CPU, "fp32", "vgg16") is None
    assert "fp32 only" in skip_reason("torch-eager", CPU, "fp16", "vgg16")
    assert "CUDA" in skip_reason("torch", CPU, "fp16", "vgg16")
    assert "torch-eager" in skip_reason("torch", CPU, "fp32", "vgg16")
    assert skip_reason("tensorrt", CPU, "fp32", "vgg16") == "TensorRT needs a CUDA GPU"
    assert "VGG-16" in skip_reason("vgg16-trunk", CPU, "fp32", "resnet101")


def test_trunk_is_the_vgg16_features_of_the_checkpoint(tiny_checkpoint):
    trunk = Trunk(tiny_checkpoint, CPU, "fp32", [1])
    model, _ = load_model(tiny_checkpoint)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.backbone.features(x)
    out = trunk.infer(x)
    assert out.shape == (1, 512, 4, 4)  # conv5_3 at stride 16
    torch.testing.assert_close(out, expected)


def test_time_iterations_counts_warmup_and_stops_at_iters():
    calls = []
    samples = time_iterations(lambda: calls.append(1), CPU, warmup=2, iters=3, budget_s=10.0)
    assert len(calls) == 5 and len(samples) == 3
    assert all(s >= 0 for s in samples)


def test_time_iterations_stops_at_the_budget_after_the_minimum():
    samples = time_iterations(lambda: time.sleep(0.002), CPU, warmup=0, iters=10_000, budget_s=0.001)
    assert len(samples) == MIN_ITERS
    assert min(samples) >= 1.5


def test_summarize_median_p99_and_throughput():
    stats = summarize([10.0, 10.0, 20.0, 40.0], batch=8)
    assert stats["median_ms"] == 15.0 and stats["iterations"] == 4
    assert stats["images_per_s"] == pytest.approx(8 * 4 / 0.08)
    assert 20.0 < stats["p99_ms"] <= 40.0


def row(backend, batch, images_per_s, mode="net", precision="fp32", median=None):
    return {"backend": backend, "precision": precision, "size": 320, "batch": batch, "mode": mode,
            "images_per_s": images_per_s, "median_ms": median}  # fmt: skip


def test_report_ratios_to_trunk_best_batch_and_ort_speedup():
    rows = [
        row("vgg16-trunk", 1, 100.0), row("vgg16-trunk", 8, 400.0),
        row("torch-eager", 1, 50.0, "net+post", median=20.0), row("torch-eager", 8, 300.0, "net+post", median=26.7),
        row("onnxruntime", 1, 80.0, "net+post", median=12.5),
        {**row("onnxruntime", None, None), "skipped": "ONNX exports are fp32", "precision": "fp16"},
    ]  # fmt: skip
    model_report.add_trunk_ratios(rows)
    assert rows[2]["vs_trunk"] == 0.5 and rows[3]["vs_trunk"] == 0.75 and "vs_trunk" not in rows[0]
    best = {r["backend"]: r for r in model_report.best_throughput(rows)}
    assert best["torch-eager"]["best_batch"] == 8 and best["torch-eager"]["vs_trunk_best"] == 0.75
    [ort] = model_report.ort_vs_eager(rows)
    assert ort["batch"] == 1 and ort["speedup"] == pytest.approx(1.6)
    assert model_report.summary(rows)["speedups"] == [ort]  # no INT8 rows: no INT8 ratios
    text = model_report.table(rows)
    assert "ONNX exports are fp32" in text and "x trunk" in text


def test_bad_options_are_a_clear_error(capsys):
    assert model_bench.main(["--device", "cpu", "--backends", "tensorflow"]) == 2
    assert "--backends" in capsys.readouterr().err


def run_bench(tmp_path, checkpoint, photos, *extra: str) -> dict:
    out = tmp_path / "model.json"
    argv = ["--device", "cpu", "--checkpoint", str(checkpoint), "--sizes", "64", "--iters", "2",
            "--warmup", "0", "--images", str(photos), "--json", str(out), *extra]  # fmt: skip
    assert model_bench.main(argv) == 0
    return json.loads(out.read_text())


def measured(result: dict) -> set[tuple]:
    return {
        (r["backend"], r["precision"], r["batch"], r["mode"]) for r in result["rows"] if r.get("images_per_s")
    }


def test_cpu_run_measures_eager_and_trunk_and_skips_the_rest(tiny_checkpoint, photos, tmp_path):
    threads = torch.get_num_threads()
    result = run_bench(tmp_path, tiny_checkpoint, photos, "--batch-sizes", "1,2", "--precisions", "fp32,fp16",
                       "--backends", "torch-eager,vgg16-trunk,torch,tensorrt", "--threads", "1")  # fmt: skip
    expected = {("torch-eager", "fp32", b, mode) for b in (1, 2) for mode in ("net", "net+post")}
    expected |= {("vgg16-trunk", "fp32", b, "net") for b in (1, 2)}
    assert measured(result) == expected
    skipped = {(r["backend"], r["precision"]) for r in result["rows"] if r.get("skipped")}
    assert skipped == {("torch", "fp32"), ("torch", "fp16"), ("torch-eager", "fp16"), ("vgg16-trunk", "fp16"),
                       ("tensorrt", "fp32"), ("tensorrt", "fp16")}  # fmt: skip
    rows = [r for r in result["rows"] if r.get("images_per_s")]
    assert all(r["iterations"] == 2 and r["median_ms"] > 0 for r in rows)
    assert all(r["vs_trunk"] > 0 for r in rows if r["backend"] == "torch-eager")
    assert all(r["detections_per_image"] >= 0 for r in rows if r["mode"] == "net+post")
    assert result["trained"] is False and result["environment"]["cpu_count"] >= 1
    assert torch.get_num_threads() == threads  # --threads 1 does not leak out of the run


@pytest.mark.slow
def test_cpu_run_compares_onnxruntime_fp32_and_int8_with_eager(tiny_checkpoint, photos, tmp_path, capsys):
    result = run_bench(tmp_path, tiny_checkpoint, photos, "--batch-sizes", "1", "--threads", "1")
    modes = ("net", "net+post")
    assert {("onnxruntime", "fp32", 1, m) for m in modes} <= measured(result)
    assert {("onnxruntime-int8", "int8", 1, m) for m in modes} <= measured(result)
    pairs = [(r["backend"], r["baseline"], r["mode"]) for r in result["summary"]["speedups"]]
    assert pairs == [(b, base, m) for b, base in model_report.SPEEDUPS for m in modes]
    out = capsys.readouterr().out
    assert "onnxruntime vs torch-eager, size 64 batch 1" in out
    assert "onnxruntime-int8 vs onnxruntime, size 64 batch 1" in out
    rows = [r for r in result["rows"] if r.get("images_per_s")]
    assert all(r["gflop_s"] > 0 and r["of_gemm"] > 0 for r in rows)
    assert result["gemm_ceilings"]["int8_gop_s"] > 0 and result["flops_per_image"]["64"]["network"] > 0


def test_a_failing_backend_is_a_row_not_a_crash(tiny_checkpoint, photos, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB\nmore details")

    monkeypatch.setattr(model_bench, "make_backend", out_of_memory)
    result = run_bench(tmp_path, tiny_checkpoint, photos, "--batch-sizes", "1", "--backends", "torch-eager,vgg16-trunk",
                       "--threads", "1")  # fmt: skip
    [failed] = [r for r in result["rows"] if r["backend"] == "torch-eager"]
    assert failed["skipped"] == "error: CUDA out of memory. Tried to allocate 8.00 GiB"
    assert measured(result) == {("vgg16-trunk", "fp32", 1, "net")}

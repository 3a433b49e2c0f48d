"""bench.cpu_engines: the interleaved latency, the multi-stream throughput and the table (fast, with
stand-in engines), and the whole ``--cpu-engines`` run on the tiny checkpoint (slow)."""

from __future__ import annotations

import json
import threading

import pytest

from bench import cpu_engines, model_bench


def test_latency_calls_every_engine_alike_and_reports_a_median():
    calls = {"a": 0, "b": 0}

    def engine(name):
        def call(x):
            assert tuple(x.shape) == (1, 3, 32, 32)
            calls[name] += 1

        return call

    result = cpu_engines.latency_ms({"a": engine("a"), "b": engine("b")}, 32, runs=4)
    assert set(result) == {"a", "b"} and all(ms >= 0 for ms in result.values())
    assert calls == {"a": 6, "b": 6}  # two warm-up calls and four timed ones each


def test_throughput_runs_each_stream_on_its_own_thread_and_alternates_the_windows():
    seen: dict[str, list[set[int]]] = {"a": [set(), set()], "b": [set(), set()]}
    order: list[str] = []

    def engine(name, i):
        def call(x):
            seen[name][i].add(threading.get_ident())
            if not order or order[-1] != name:
                order.append(name)

        return call

    streams = {n: [engine(n, 0), engine(n, 1)] for n in seen}
    rates = cpu_engines.interleaved_throughput(streams, 16, seconds=0.1, slices=1)
    assert set(rates) == {"a", "b"} and all(r > 0 for r in rates.values())
    for name, (first, second) in seen.items():  # one window: both streams' threads alive at once
        assert len(first) == len(second) == 1 and first != second, name
    order.clear()
    cpu_engines.interleaved_throughput(streams, 16, seconds=0.2, slices=2)
    assert order == ["a", "b", "a", "b"]  # the windows taken in turn


def test_table_shows_each_run():
    rows = [{"engine": "openvino-int8", "precision": "int8", "latency_ms": [16.3, 17.0],
             "streams_img_s": [73.9, 70.1], "map": 87.79}]  # fmt: skip
    text = cpu_engines.table(rows)
    assert "openvino-int8" in text and "16.3 / 17.0" in text and "73.9 / 70.1" in text and "87.79" in text


@pytest.mark.slow
def test_the_whole_run_on_the_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "engines.json"
    status = model_bench.main([
        "--cpu-engines", "--checkpoint", str(tiny_checkpoint), "--cache-dir", str(tmp_path / "cache"),
        "--engines", "torch-fp32,onnxruntime-fp32,openvino-fp32", "--data", "none", "--repeats", "1",
        "--stream-seconds", "0.5", "--latency-runs", "3", "--threads", "1", "--json", str(out),
    ])  # fmt: skip
    assert status == 0
    rows = {r["engine"]: r for r in json.loads(out.read_text())["engines"]}
    assert set(rows) == {"torch-fp32", "onnxruntime-fp32", "openvino-fp32"}
    assert (
        rows["openvino-fp32"]["precision"] in ("bf16", "fp32") and rows["torch-fp32"]["precision"] == "fp32"
    )
    for row in rows.values():
        assert len(row["latency_ms"]) == 1 and row["latency_ms"][0] > 0 and row["streams_img_s"][0] > 0
        assert "map" not in row
    assert "openvino-fp32" in capsys.readouterr().out

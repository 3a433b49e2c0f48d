"""The service benchmark: option checks, the commands it starts, server start/stop, the ratios, the
naive app's answers, and (slow) a whole sweep of both apps on a tiny model."""

from __future__ import annotations

import json
import sys
import time

import pytest
from fastapi.testclient import TestClient

from bench import servers, service_bench
from bench.naive_app import create_app
from model.errors import UserError
from service.benchmark import synthetic_jpeg


def args_for(*extra: str):
    return service_bench.build_parser().parse_args(list(extra))


def test_options_are_checked():
    levels, apps, env = service_bench.check(
        args_for("--concurrency", "1,4", "--server-env", "REFINEDET_FP16=false")
    )
    assert levels == [1, 4] and apps == ["service", "naive"] and env == {"REFINEDET_FP16": "false"}
    for bad in (
        ["--workers", "0"],
        ["--workers", "1,x"],
        ["--concurrency", "0"],
        ["--apps", "triton"],
        ["--server-env", "FP16=false"],
        ["--duration", "0"],
    ):
        with pytest.raises(UserError):
            service_bench.check(args_for(*bad))


def test_app_commands(tmp_path):
    args = args_for("--device", "cpu", "--max-batch-size", "16", "--max-delay-ms", "3")
    argv, env = service_bench.app_command("service", args, tmp_path / "m.pth")
    assert argv[-5:] == ["--host", "127.0.0.1", "--port", "{port}", "--plain-logs"] and "serve" in argv
    assert env["REFINEDET_MODEL"] == str(tmp_path / "m.pth") and env["REFINEDET_DEVICE"] == "cpu"
    assert env["REFINEDET_MAX_BATCH_SIZE"] == "16" and env["REFINEDET_MAX_DELAY_MS"] == "3.0"
    assert env["REFINEDET_WORKERS"] == "1" and env["REFINEDET_ACCESS_LOG"] == "false"
    assert service_bench.app_command("service", args, tmp_path / "m.pth", 4)[1]["REFINEDET_WORKERS"] == "4"
    argv, env = service_bench.app_command("naive", args, tmp_path / "m.pth", runtime="torch")
    assert argv[1:3] == ["-m", "bench.naive_app"] and "--device" in argv and env == {}


def test_ratios_pair_each_concurrency_and_worker_count():
    rows = [
        {"app": "service", "workers": 1, "concurrency": 1, "requests_per_s": 100.0},
        {"app": "service", "workers": 1, "concurrency": 4, "requests_per_s": 300.0},
        {"app": "service", "workers": 4, "concurrency": 1, "requests_per_s": 150.0},
        {"app": "naive", "workers": 1, "concurrency": 1, "requests_per_s": 50.0},
        {"app": "naive", "workers": 1, "concurrency": 4, "requests_per_s": 0.0},
    ]
    assert service_bench.ratios(rows) == [
        {"concurrency": 1, "workers": 1, "service_rps": 100.0, "naive_rps": 50.0, "ratio": 2.0},
        {"concurrency": 1, "workers": 4, "service_rps": 150.0, "naive_rps": 50.0, "ratio": 3.0},
    ]


def test_waiting_for_every_worker_to_log_that_it_is_ready(tmp_path):
    """/readyz answers from any worker: the wait also needs one "ready" log line per worker, written
    after this start (an older run's lines in the same log do not count)."""
    log = tmp_path / "s.log"
    log.write_text("old run: MARK\nold run: MARK\n")
    script = (
        "import http.server, sys, time\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "print('MARK', flush=True); time.sleep(1.0); print('MARK', flush=True)\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
    )
    command = [sys.executable, "-c", script, "{port}"]
    start = time.monotonic()
    with servers.running(command, servers.server_env({}), log, 30, ready_marker="MARK", ready_count=2):
        assert time.monotonic() - start >= 1.0
    assert log.read_text().splitlines().count("MARK") == 2  # both written by this run


def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('boom: no model'); sys.exit(3)"]
    with pytest.raises(UserError, match="boom: no model"), servers.running(command, servers.server_env({}),
                                                                          tmp_path / "x.log", 30):  # fmt: skip
        pass


def test_a_server_that_never_gets_ready_is_stopped(tmp_path):
    log = tmp_path / "h.log"
    command = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "{port}"]
    # http.server has no /readyz (404), so waiting times out; the process must be gone afterwards.
    with (
        pytest.raises(UserError, match="not ready"),
        servers.running(command, servers.server_env({}), log, 1.5),
    ):
        pass
    port = log.read_text().splitlines()[0].split()[-1]
    assert servers.get(f"http://127.0.0.1:{port}/")[0] == 0  # nothing answers any more
    assert servers.batch_counters(f"http://127.0.0.1:{port}") is None


def test_naive_app_answers_like_the_service(tiny_checkpoint):
    client = TestClient(create_app(tiny_checkpoint))
    assert client.get("/readyz").status_code == 200
    r = client.post("/detect", content=synthetic_jpeg(120, 90), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200
    body = r.json()
    assert body["image"] == {"width": 120, "height": 90} and isinstance(body["detections"], list)
    assert (
        client.post("/detect", content=b"not a jpeg", headers={"Content-Type": "image/jpeg"}).status_code
        == 400
    )


@pytest.mark.slow
def test_whole_sweep_of_both_apps(tiny_checkpoint, photos, tmp_path):
    out = tmp_path / "service.json"
    argv = ["--model", str(tiny_checkpoint), "--device", "cpu", "--concurrency", "1,2", "--duration", "1", "--workers", "1,2",
            "--warmup", "0.3", "--max-batch-size", "2", "--images", str(photos), "--log-dir", str(tmp_path),
            "--json", str(out)]  # fmt: skip
    assert service_bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert [(r["app"], r["workers"], r["concurrency"]) for r in result["rows"]] == [
        ("service", 1, 1),
        ("service", 1, 2),
        ("service", 2, 1),
        ("service", 2, 2),
        ("naive", 1, 1),
        ("naive", 1, 2),
    ]
    assert all(r["ok"] > 0 and r["errors"] == 0 and r["p50"] > 0 for r in result["rows"])
    assert result["rows"][0]["mean_batch"] == 1.0 and "mean_batch" not in result["rows"][2]
    assert [(r["workers"], r["concurrency"]) for r in result["service_vs_naive"]] == [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
    ]
    assert result["images"]["count"] == 3
    assert (tmp_path / "service_server.log").is_file() and (tmp_path / "naive_server.log").is_file()


def test_a_port_range_is_respected(monkeypatch):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert servers.free_port(f"{port}-{port + 1}") == port + 1  # the first one is busy
        with pytest.raises(UserError, match="no free port"):
            servers.free_port(f"{port}-{port}")
        monkeypatch.setenv("REFINEDET_BENCH_PORTS", f"{port}-{port + 1}")
        assert servers.free_port() == port + 1


def test_rows_say_which_engine_and_cpu():
    with pytest.raises(UserError, match="rounds"):
        service_bench.check(args_for("--rounds", "0"))
    row = {
        "app": "service",
        "engine": "onnxruntime-int8",
        "workers": 1,
        "concurrency": 4,
        "requests_per_s": 7.0,
    }
    result = {"rows": [row], "service_vs_naive": [],
              "environment": {"cpu_info": {"model_name": "AMD EPYC", "machine": "x86_64", "flags": ["avx512_vnni"],
                                           "usable_cores": 2}, "load_average": [1.0, 1.0, 1.0]}}  # fmt: skip
    text = service_bench.report(result)
    assert "CPU: AMD EPYC (x86_64), flags avx512_vnni, 2 usable cores" in text and "onnxruntime-int8" in text


def test_peer_commands_serve_the_services_file_on_the_chosen_runtime(tmp_path):
    args = args_for("--device", "cpu", "--litserve-workers", "3")
    onnx = tmp_path / "int8.onnx"
    argv, env = service_bench.app_command("litserve", args, onnx, runtime="openvino")
    assert argv[1:3] == ["-m", "bench.litserve_app"] and env == {}
    assert argv[argv.index("--model") + 1] == str(onnx) and argv[argv.index("--runtime") + 1] == "openvino"
    assert argv[argv.index("--workers") + 1] == "3" and "--device" not in argv
    argv, _ = service_bench.app_command("naive", args, onnx, runtime="onnxruntime")
    assert argv[argv.index("--runtime") + 1] == "onnxruntime"
    with pytest.raises(UserError, match="LitServe peer runs on the CPU"):
        service_bench.check(args_for("--apps", "service,litserve", "--device", "cuda"))


def test_peer_runtime_follows_the_service_unless_asked(tiny_checkpoint):
    assert service_bench.peer_runtime(args_for(), tiny_checkpoint, None) == "torch"
    assert service_bench.peer_runtime(args_for(), tiny_checkpoint, "openvino") == "openvino"
    assert service_bench.peer_runtime(args_for(), tiny_checkpoint, "auto") == "torch"
    assert (
        service_bench.peer_runtime(args_for("--runtime", "onnxruntime"), tiny_checkpoint, "torch")
        == "onnxruntime"
    )


def test_summary_pairs_every_app_and_the_ceiling_at_each_concurrency():
    def row(app, c, rps, p50, workers=1):
        return {
            "app": app,
            "workers": workers,
            "concurrency": c,
            "requests_per_s": rps,
            "p50": p50,
            "p99": 2 * p50,
        }

    rows = [row("service", 1, 30.0, 40.0), row("service", 16, 60.0, 260.0), row("service", 16, 50.0, 300.0, 2),
            row("naive", 1, 20.0, 50.0), row("naive", 16, 30.0, 500.0), row("litserve", 16, 40.0, 400.0)]  # fmt: skip
    ceiling = {"images_per_s": 75.0, "batch1_ms": 30.0, "engine": "openvino-int8", "threads": 2, "streams": 2}
    result = {"rows": rows, "ceiling": ceiling}
    assert service_bench.summary(result) == [
        {"concurrency": 1, "service_rps": 30.0, "service_p50": 40.0, "service_p99": 80.0, "naive_rps": 20.0,
         "naive_p50": 50.0, "naive_p99": 100.0, "vs_naive": 1.5, "ceiling": 75.0, "vs_ceiling": 0.4},
        {"concurrency": 16, "service_rps": 60.0, "service_p50": 260.0, "service_p99": 520.0, "naive_rps": 30.0,
         "naive_p50": 500.0, "naive_p99": 1000.0, "litserve_rps": 40.0, "litserve_p50": 400.0,
         "litserve_p99": 800.0, "vs_naive": 2.0, "vs_litserve": 1.5, "ceiling": 75.0, "vs_ceiling": 0.8},
    ]  # fmt: skip
    assert service_bench.versus_ceiling(rows, ceiling)[0] == {
        "concurrency": 1, "workers": 1, "ceiling_images_per_s": 75.0, "ceiling_batch1_ms": 30.0,
        "rps_over_ceiling": 0.4, "p50_minus_batch1_ms": 10.0}  # fmt: skip
    # measured before each level (--rounds): each level against its own, the others against the mean
    per_level = [{"level": 16, "images_per_s": 50.0, "batch1_ms": 40.0}]
    assert [r["rps_over_ceiling"] for r in service_bench.versus_ceiling(rows, ceiling, per_level)] == [
        0.4,
        1.2,
        1.0,
    ]
    assert service_bench.versus_ceiling(rows, None) == []
    assert service_bench.ratios(rows, "litserve") == [
        {"concurrency": 16, "workers": 1, "service_rps": 60.0, "litserve_rps": 40.0, "ratio": 1.5},
        {"concurrency": 16, "workers": 2, "service_rps": 50.0, "litserve_rps": 40.0, "ratio": 1.25},
    ]
    extra = {
        "service_vs_ceiling": service_bench.versus_ceiling(rows, ceiling),
        "summary": service_bench.summary(result),
    }
    text = service_bench.report({**result, **extra, "environment": {}})
    assert "svc/litserve" in text and "0.4x the ceiling" in text


def test_stopping_a_server_also_stops_the_processes_it_started(tmp_path):
    """LitServe runs its workers as child processes: whatever the server leaves behind is stopped too."""
    pid_file = tmp_path / "child.pid"
    script = (
        "import http.server, subprocess, sys, signal\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))  # exits, leaving its child running\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
    )
    with servers.running(
        [sys.executable, "-c", script, "{port}"], servers.server_env({}), tmp_path / "l.log", 30
    ):
        child = int(pid_file.read_text())
        assert _alive(child)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (killed, not yet reaped by init) is not alive
        return f.read().split(") ")[1][0] != "Z"

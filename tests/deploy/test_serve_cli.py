"""`refinedet serve` / `prepare` / `healthcheck`: options and REFINEDET_* variables become the one
Settings, bad values and missing models are clear errors before anything starts, the model is prepared
(ONNX export on a CPU), and uvicorn gets the app (or, for --workers N, the supervisor of the worker processes)."""

from __future__ import annotations

import json
import os

import pytest
import uvicorn

import deploy.prepare
import service.server
import service.workers
from deploy.cli import overrides_from, settings_from
from refinedet.cli import build_parser, main
from service.app import create_app_from_env
from service.settings import Settings


@pytest.fixture
def captured_run(monkeypatch):
    """(app, options) of each start: ``Server.run`` (one worker), or ("workers", the supervisor's options
    and count) for several."""
    calls = []
    monkeypatch.setattr(
        service.workers.Supervisor,
        "run",
        lambda self: calls.append(("workers", {**self.options, "count": self.count})),
    )
    options = ("host", "port", "access_log")
    monkeypatch.setattr(
        uvicorn.Server,
        "run",
        lambda self: calls.append((self.config.app, {k: getattr(self.config, k) for k in options})),
    )
    monkeypatch.setattr(service.server, "check_port", lambda host, port: None)  # port 8000 may be taken here
    monkeypatch.setattr(service.server, "bind", lambda host, port: None)  # the workers' socket: likewise
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the CLI exports settings for workers
    return calls


def test_options_become_settings_and_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("REFINEDET_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("REFINEDET_API_KEY", "k")
    assert Settings().max_batch_size == 3 and Settings().api_key.get_secret_value() == "k"
    args = build_parser().parse_args(
        ["serve", "--max-batch-size", "5", "--device", "cpu", "--enable-benchmark"]
    )
    overrides = overrides_from(args)
    assert overrides == {"device": "cpu", "max_batch_size": 5, "enable_benchmark": True}
    s = settings_from(overrides)
    assert (s.max_batch_size, s.device, s.enable_benchmark, s.api_key.get_secret_value()) == (
        5,
        "cpu",
        True,
        "k",
    )
    assert {k: v for k, v in s.to_env().items() if k != "REFINEDET_API_KEY"} == {
        "REFINEDET_DEVICE": "cpu",
        "REFINEDET_MAX_BATCH_SIZE": "5",
        "REFINEDET_ENABLE_BENCHMARK": "true",
    }


def test_default_batch_limit_slots_threads_and_decoding_depend_on_the_device():
    gpu = Settings().serving_for("cuda")
    assert (gpu.max_batch, gpu.slots, gpu.threads, gpu.decode) == (8, 1, None, "nvjpeg")
    # On a CPU one image per call, CPU_STREAMS calls at once (default: the engine threads).
    assert Settings(cpu_threads=3).serving_for("cpu") == (1, 3, 3, "pil")
    assert Settings(max_batch_size=5, cpu_threads=3, cpu_streams=1).serving_for("cpu") == (5, 1, 3, "pil")
    assert Settings(engine_decode="off").serving_for("cuda").decode == "handler"
    assert Settings(cpu_threads=4, workers=2).serving_for("cpu").threads == 4
    assert Settings(workers=64).serving_for("cpu").threads == 1


def test_engine_decode_setting(monkeypatch):
    """auto|on|off (also as true/false, 1/0, yes/no), from REFINEDET_ENGINE_DECODE or the old
    REFINEDET_GPU_DECODE; the option --engine-decode wins over both."""
    assert Settings().engine_decode == "auto"
    for variable in ("REFINEDET_ENGINE_DECODE", "REFINEDET_GPU_DECODE"):
        for word, value in [("on", "on"), ("OFF", "off"), ("true", "on"), ("0", "off"), ("Yes", "on")]:
            monkeypatch.setenv(variable, word)
            assert Settings().engine_decode == value, (variable, word)
        monkeypatch.setenv(variable, "sometimes")
        with pytest.raises(ValueError, match=r"engine_decode|ENGINE_DECODE|GPU_DECODE"):
            Settings()
        monkeypatch.delenv(variable)
    monkeypatch.setenv("REFINEDET_GPU_DECODE", "on")
    args = build_parser().parse_args(["serve", "--engine-decode", "off"])
    assert (
        overrides_from(args) == {"engine_decode": "off"}
        and settings_from(overrides_from(args)).engine_decode == "off"
    )
    monkeypatch.delenv("REFINEDET_GPU_DECODE")
    assert Settings(engine_decode="on").to_env() == {"REFINEDET_ENGINE_DECODE": "on"}


def test_bad_values_and_missing_models_fail_before_starting(captured_run, capsys, tmp_path):
    assert main(["serve", "--port", "70000"]) == 2
    assert "invalid settings" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "nope.pth")]) == 2
    assert "model not found" in capsys.readouterr().err
    odd = tmp_path / "notes.txt"
    odd.write_text("not a model")
    assert main(["serve", "--model", str(odd)]) == 2
    assert "unknown model file type" in capsys.readouterr().err
    assert main(["serve", "--workers", "0"]) == 2
    assert captured_run == []


def test_serve_runs_uvicorn_with_the_app(captured_run, capsys, tiny_checkpoint):
    assert (
        main(
            [
                "serve",
                "--model",
                str(tiny_checkpoint),
                "--backend",
                "torch",
                "--device",
                "cpu",
                "--port",
                "8123",
            ]
        )
        == 0
    )
    [(app, kwargs)] = captured_run
    plan = app.state.service.plan
    assert (plan.artifact, plan.backend, plan.device, plan.engine) == (
        tiny_checkpoint,
        "torch",
        "cpu",
        "torch-fp32",
    )
    assert (kwargs["host"], kwargs["port"], kwargs["access_log"]) == ("127.0.0.1", 8123, False)
    err = capsys.readouterr().err
    assert "refinedet serve: torch-fp32 (torch, fp32) on cpu" in err and str(tiny_checkpoint) in err
    assert len(err.strip().splitlines()) <= 3, "a short summary, not the whole decision"


def test_workers_use_the_factory_and_the_environment(captured_run, tiny_checkpoint):
    args = [
        "serve",
        "--model",
        str(tiny_checkpoint),
        "--backend",
        "torch",
        "--workers",
        "2",
        "--max-delay-ms",
        "7",
    ]
    assert main(args) == 0
    [(app, kwargs)] = captured_run
    assert app == "workers" and kwargs["count"] == 2 and kwargs["http"] == service.server.PROTOCOL
    assert os.environ["REFINEDET_MAX_DELAY_MS"] == "7.0"
    worker_app = create_app_from_env()
    assert worker_app.state.service.plan.artifact == tiny_checkpoint, "the plan travels to the workers"
    assert worker_app.state.service.plan.backend == "torch"
    assert worker_app.state.service.settings.max_delay_ms == 7.0
    os.environ.pop("REFINEDET_ENGINE_PLAN")
    with pytest.raises(RuntimeError, match="REFINEDET_ENGINE_PLAN is not set"):
        create_app_from_env()


def test_untrained_default_is_announced(captured_run, capsys, monkeypatch):
    import model.zoo

    monkeypatch.setattr(model.zoo, "default_checkpoint", lambda: None)
    assert main(["serve", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "UNTRAINED" in err and "Platelets, RBC, WBC" in err


def test_shipped_default_is_announced(captured_run, capsys):
    from model.zoo import default_checkpoint

    if default_checkpoint() is None:
        pytest.skip("no default checkpoint in this checkout")
    assert main(["serve", "--device", "cpu", "--backend", "torch"]) == 0
    err = capsys.readouterr().err
    assert (
        "torch-fp32 (torch, fp32) on cpu" in err
        and f"{default_checkpoint()} (from the project's default model)" in err
    )


def test_default_start_on_a_cpu_serves_the_cpu_engine(captured_run, capsys, monkeypatch, tmp_path):
    """No options (the container's default start, `.pth.xz` model): the CPU engine step
    (`refinedet export cpu`, faked here; conversion.cpu_engine is tested on its own) gets the shipped
    checkpoint, the cache and the worker's threads, and ONNX Runtime serves what it chose."""
    from deploy.host import CpuChoice
    from model.zoo import default_checkpoint

    if default_checkpoint() is None:
        pytest.skip("no default checkpoint in this checkout")
    calls = []
    chosen = tmp_path / "cache" / "cpu" / "int8.onnx"

    def fake_prepare_cpu(checkpoint, cache_dir, threads):
        calls.append((checkpoint, cache_dir, threads))
        return CpuChoice(chosen, "onnxruntime", "onnxruntime-int8", "fastest verified", "int8")

    real = deploy.prepare.Builders
    monkeypatch.setattr(deploy.prepare, "Builders", lambda: real(prepare_cpu=fake_prepare_cpu))
    monkeypatch.setenv("REFINEDET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("REFINEDET_CPU_THREADS", "2")
    assert main(["serve", "--device", "cpu"]) == 0
    assert calls == [(default_checkpoint(), tmp_path / "cache", 2)]
    err = capsys.readouterr().err
    assert (
        f"onnxruntime-int8 (onnxruntime, int8) on cpu, 2 thread(s), 2 call(s) at once, batch <= 1: {chosen}"
        in err
    )
    [(app, _)] = captured_run
    plan = app.state.service.plan
    assert (plan.artifact, plan.backend, plan.device, plan.reason) == (
        chosen,
        "onnxruntime",
        "cpu",
        "fastest verified",
    )


def test_prepare_prints_the_decision(capsys, tiny_checkpoint, tmp_path):
    assert main(["prepare", "--model", str(tiny_checkpoint), "--backend", "torch", "--device", "cpu"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision == {
        "artifact": str(tiny_checkpoint), "backend": "torch", "device": "cpu", "engine": "torch-fp32",
        "precision": "fp32", "max_batch": 1, "slots": decision["threads"], "threads": decision["threads"],
        "decode": "pil", "onnx": None, "reason": "backend torch asked for",
    }  # fmt: skip


def test_device_cuda_without_a_gpu_is_refused_in_one_line(captured_run, capsys, tiny_checkpoint):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["serve", "--model", str(tiny_checkpoint), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1]
        == "refinedet serve: error: --device cuda but no CUDA GPU is visible here; use --device cpu (or auto)"
    )
    assert captured_run == []


def test_plan_out_writes_the_whole_decision(captured_run, tiny_checkpoint, tmp_path):
    out = tmp_path / "plan.json"
    args = ["serve", "--model", str(tiny_checkpoint), "--backend", "torch", "--device", "cpu"]
    assert main([*args, "--plan-out", str(out)]) == 0
    assert json.loads(out.read_text())["engine"] == "torch-fp32"
    assert main([*args, "--plan-out", str(tmp_path)]) == 2


def test_healthcheck_fails_when_nothing_listens(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["healthcheck", "--port", str(port)]) == 1
    assert capsys.readouterr().err == (
        f"refinedet healthcheck: not ready: connection refused on port {port} (nothing listens on 127.0.0.1:{port})\n"
    )


def test_predict_runs_the_engine_serve_would_run(monkeypatch, capsys, tiny_checkpoint, tmp_path):
    """`refinedet predict` gets its engine from the same decision as `serve` (deploy.prepare): on a CPU the
    CPU engine step's choice (faked here: an FP32 ONNX export of the checkpoint), with the cache from the
    environment; its rows are written by that engine."""
    from PIL import Image

    from conversion.onnx_export import export_checkpoint
    from deploy.host import CpuChoice

    onnx = tmp_path / "cache" / "chosen.onnx"
    onnx.parent.mkdir()
    export_checkpoint(tiny_checkpoint, onnx)
    calls = []

    def fake_prepare_cpu(checkpoint, cache_dir, threads):
        calls.append((checkpoint, cache_dir))
        return CpuChoice(onnx, "onnxruntime", "onnxruntime-fp32", "fastest verified", "fp32")

    real = deploy.prepare.Builders
    monkeypatch.setattr(deploy.prepare, "Builders", lambda: real(prepare_cpu=fake_prepare_cpu))
    monkeypatch.setenv("REFINEDET_CACHE_DIR", str(tmp_path / "cache"))
    Image.new("RGB", (80, 60), (200, 120, 140)).save(tmp_path / "a.jpg")
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(tiny_checkpoint), str(tmp_path / "a.jpg"), "--device", "cpu"]
    assert main([*argv, "--output", str(out), "--no-progress"]) == 0
    assert calls == [(tiny_checkpoint, tmp_path / "cache")]
    assert "refinedet predict: onnxruntime-fp32 (onnxruntime, fp32) on cpu" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == [str(tmp_path / "a.jpg")] and "detections" in rows[0]


def test_serve_stops_with_one_line_when_the_model_cannot_load(capsys, tmp_path):
    """A model that fails to load (here a torn checkpoint served with backend torch, which no earlier step
    reads) stops the server: exit 2 with the reason on the last line, instead of answering 503 forever."""
    bad = tmp_path / "torn.pth"
    bad.write_bytes(b"PK\x03\x04 a torn checkpoint")
    argv = [
        "serve",
        "--model",
        str(bad),
        "--backend",
        "torch",
        "--device",
        "cpu",
        "--port",
        "0",
        "--plain-logs",
    ]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("refinedet serve: error: the model failed to load, so nothing was served: ")
    assert "is not a checkpoint" in last


def test_an_onnx_that_is_not_a_refinedet_model_is_refused_before_serving(captured_run, capsys, tmp_path):
    other = tmp_path / "other.onnx"
    other.write_bytes(b"\x08\x07 some other network")
    assert main(["serve", "--model", str(other), "--device", "cpu"]) == 2
    assert "no manifest beside" in capsys.readouterr().err and captured_run == []


def test_a_taken_port_is_one_line_before_the_server_starts(tiny_checkpoint, monkeypatch, capsys):
    import socket

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("uvicorn started"))
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        argv = ["serve", "--model", str(tiny_checkpoint), "--backend", "torch", "--device", "cpu"]
        assert main([*argv, "--port", str(port)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        f"refinedet serve: error: port {port} is already in use on 127.0.0.1 (another server listens there): "
        "stop it or pick another --port"
    )
    assert not any("address already in use" in line for line in err)  # uvicorn never got to it

"""Host probes, the ``refinedet export`` subprocess command lines and the readiness check, with a fake
nvidia-smi, a fake CLI and a local HTTP server instead of a GPU, TensorRT and the service."""

from __future__ import annotations

import json
import stat
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from deploy import host
from deploy.host import GpuInfo
from model.errors import UserError
from model.runtime.plan import EnginePlan


def test_parse_nvidia_smi():
    assert host.parse_nvidia_smi("NVIDIA H100 80GB HBM3, 9.0\nNVIDIA L4, 8.9\n") == GpuInfo(
        "NVIDIA H100 80GB HBM3", "9.0"
    )
    assert host.parse_nvidia_smi("Tesla T4, 7.5") == GpuInfo("Tesla T4", "7.5")
    assert host.parse_nvidia_smi("") is None
    assert host.parse_nvidia_smi("No devices were found") is None


def fake_nvidia_smi(bin_dir: Path, output: str, status: int = 0) -> Path:
    """An ``nvidia-smi`` on PATH that records its arguments and prints ``output``."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    args_file = bin_dir / "args.json"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"json.dump(sys.argv[1:], open({str(args_file)!r}, 'w'))\n"
        f"print({output!r})\nsys.exit({status})\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return args_file


def test_probe_gpu_asks_nvidia_smi_about_the_first_visible_device(tmp_path, monkeypatch):
    args_file = fake_nvidia_smi(tmp_path / "bin", "NVIDIA A100-SXM4-80GB, 8.0")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    env = {"CUDA_VISIBLE_DEVICES": "GPU-1234abcd,GPU-5678"}
    assert host.probe_gpu(env) == GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")
    assert json.loads(args_file.read_text()) == [
        "--query-gpu=name,compute_cap",
        "--format=csv,noheader",
        "--id=GPU-1234abcd",
    ]
    assert host.probe_gpu({}) is not None
    assert "--id" not in " ".join(json.loads(args_file.read_text()))


def test_probe_gpu_is_none_without_a_gpu(tmp_path, monkeypatch):
    fake_nvidia_smi(
        tmp_path / "bin", "NVIDIA-SMI has failed because it couldn't communicate with the driver", 9
    )
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert host.probe_gpu({}) is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert host.probe_gpu({}) is None


def test_probe_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.11.0.33"))
    assert host.probe_tensorrt() == "10.11.0.33"
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    assert host.probe_tensorrt() is None


def test_probe_onnxruntime_lists_providers(monkeypatch):
    pytest.importorskip("onnxruntime")
    assert "CPUExecutionProvider" in host.probe_onnxruntime()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert host.probe_onnxruntime() is None


def plan(artifact: Path, backend: str, onnx: Path | None) -> EnginePlan:
    return EnginePlan(artifact, backend, "cuda", f"{backend}-fp16", "fp16", 8, 1, None, "nvjpeg", onnx)  # type: ignore[arg-type]


@pytest.fixture
def fake_cli(tmp_path, monkeypatch) -> Path:
    """Replace ``python -m refinedet`` by a script that records its arguments; exit status from a file."""
    record = tmp_path / "cli_args.json"
    code = (
        "import json, pathlib, sys; "
        f"json.dump(sys.argv[1:], open({str(record)!r}, 'w')); "
        f"status = pathlib.Path({str(tmp_path / 'status')!r}); "
        "sys.exit(int(status.read_text()) if status.exists() else 0)"
    )
    monkeypatch.setattr(host, "REFINEDET_CLI", (sys.executable, "-c", code))
    return record


def test_export_commands_follow_the_cli_contract(fake_cli, tmp_path):
    host.run_export_onnx(Path("/m/a.pth"), Path("/c/model.onnx"))
    assert json.loads(fake_cli.read_text()) == [
        "export",
        "onnx",
        "--checkpoint",
        "/m/a.pth",
        "-o",
        "/c/model.onnx",
    ]
    host.run_build_engine(Path("/c/model.onnx"), Path("/c/k.plan"), "fp16", 8, Path("/c/t.cache"))
    assert json.loads(fake_cli.read_text()) == [
        "export", "engine", "--onnx", "/c/model.onnx", "-o", "/c/k.plan", "--precision", "fp16",
        "--max-batch", "8", "--timing-cache", "/c/t.cache",
    ]  # fmt: skip
    host.run_export_triton(plan(Path("/c/k.plan"), "tensorrt", Path("/c/model.onnx")), Path("/repo"))
    assert json.loads(fake_cli.read_text()) == [
        "export", "triton", "--onnx", "/c/model.onnx", "-o", "/repo", "--plan", "/c/k.plan",
    ]  # fmt: skip
    host.run_export_triton(plan(Path("/c/model.onnx"), "onnxruntime", Path("/c/model.onnx")), Path("/r"))
    assert "--plan" not in json.loads(fake_cli.read_text())
    with pytest.raises(UserError, match="needs an ONNX model"):
        host.run_export_triton(plan(Path("/m/x.plan"), "tensorrt", None), Path("/r"))


def test_failed_export_raises_with_the_status(fake_cli, tmp_path):
    (tmp_path / "status").write_text("3")
    with pytest.raises(RuntimeError, match="`refinedet export engine` exited with status 3"):
        host.run_build_engine(Path("a.onnx"), Path("k.plan"), "fp16", 8, Path("t.cache"))
    (tmp_path / "status").write_text("2")  # the CLI's status for bad input: a UserError, not a crash
    with pytest.raises(UserError, match="`refinedet export onnx` rejected its input"):
        host.run_export_onnx(Path("corrupt.pth"), Path("model.onnx"))


class ReadyHandler(BaseHTTPRequestHandler):
    status = 200
    body = b'{"status": "ready", "detail": null}'

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    ("status", "body", "expected", "why"),
    [
        (200, b'{"status": "ready", "detail": null}', 0, ""),
        (503, b'{"status": "loading", "detail": null}', 1, "answered 503 (status loading)\n"),
        (503, b'{"status": "failed", "detail": "the model failed to load"}', 1,
         "answered 503 (status failed: the model failed to load)\n"),
        (500, b"<html>oops</html>", 1, "answered 500 (not the service's JSON status: is the refinedet service on this port?)\n"),
    ],
)  # fmt: skip
def test_check_ready_says_why_on_stderr(status, body, expected, why, capsys):
    handler = type("Handler", (ReadyHandler,), {"status": status, "body": body})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_port
    try:
        assert host.check_ready(port) == expected
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    if why:
        assert err == f"refinedet healthcheck: not ready: http://127.0.0.1:{port}/readyz {why}"
    else:
        assert err == ""
    assert host.check_ready(port, timeout_s=1.0) == 1  # nobody listens
    assert capsys.readouterr().err == (
        f"refinedet healthcheck: not ready: connection refused on port {port} (nothing listens on 127.0.0.1:{port})\n"
    )


def test_check_ready_names_a_silent_server(capsys):
    import socket

    with socket.socket() as listener:  # accepts connections (the backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert host.check_ready(port, timeout_s=0.3) == 1
    assert capsys.readouterr().err == (
        f"refinedet healthcheck: not ready: no answer from http://127.0.0.1:{port}/readyz within 0.3 s\n"
    )


def test_a_failed_export_names_the_childs_error(monkeypatch, capfd):
    """Before: `refinedet export cpu` failing on a read-only cache was logged only as "exited with status 1"
    (the cause was in the child's traceback, lines above)."""
    code = (
        "import sys; print('Traceback (most recent call last):', file=sys.stderr); "
        "print(\"OSError: [Errno 30] Read-only file system: '/cache/cpu'\", file=sys.stderr); "
        "print(file=sys.stderr); sys.exit(int(sys.argv[1]))"
    )
    monkeypatch.setattr(host, "REFINEDET_CLI", (sys.executable, "-c", code))
    with pytest.raises(RuntimeError) as failed:
        host._run_cli(["1", "cpu"])
    assert str(failed.value) == (
        "`refinedet 1 cpu` exited with status 1: OSError: [Errno 30] Read-only file system: '/cache/cpu'"
    )
    assert "Traceback" in capfd.readouterr().err  # the whole of it still reaches the log
    with pytest.raises(UserError, match=r"rejected its input \(status 2\): OSError: \[Errno 30\]"):
        host._run_cli(["2", "cpu"])

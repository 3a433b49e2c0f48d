"""What `refinedet serve` (and so the container) decides to serve: engine cache key, build-or-reuse,
the CPU export, fallback and the build lock. GPU, TensorRT and the builders are fakes, so none of this
needs either."""

from __future__ import annotations

import fcntl
import json
import logging
import threading
import time
from pathlib import Path

import pytest

import deploy.host
from conversion import engine_cache
from deploy.host import Builders, CpuChoice, GpuInfo, Probes
from deploy.prepare import engine_cache_key, plan_path, prepare
from model.checkpoint import file_sha256
from model.errors import UserError
from service.settings import Settings

SHA = "ab" * 32
H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")


def fake_artifact(path: Path, kind: str, data: bytes, precision: str = "fp32") -> Path:
    """A small file with a real manifest beside it (its sha256, the default config), as the builders write."""
    from model.artifacts import Manifest, TensorRTBuild, write_manifest
    from model.config import preset

    path.write_bytes(data)
    build = (
        TensorRTBuild("NVIDIA H100 80GB HBM3", "9.0", "10.11.0.33", 1, 8, 8) if kind == "tensorrt" else None
    )
    manifest = Manifest(kind, preset("refinedet320_vgg16"), file_sha256(path), precision, tensorrt=build)  # type: ignore[arg-type]
    write_manifest(path, manifest)
    return path


class FakeBuilders:
    """Builders that write small files (and a manifest beside each), counting calls; ``fail`` raises."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.exports: list[Path] = []
        self.builds: list[tuple] = []
        self.cpu: list[tuple] = []
        self.fail = fail

    def export_onnx(self, checkpoint: Path, out: Path) -> None:
        self.exports.append(checkpoint)
        fake_artifact(out, "onnx", b"onnx from " + checkpoint.read_bytes())

    def build_engine(self, onnx: Path, out: Path, precision: str, max_batch: int, timing: Path) -> None:
        self.builds.append((onnx, precision, max_batch, timing))
        if self.fail is not None:
            raise self.fail
        fake_artifact(out, "tensorrt", b"plan", precision)

    def prepare_cpu(self, checkpoint: Path, cache_dir: Path, threads: int) -> CpuChoice:
        self.cpu.append((checkpoint, threads))
        out = cache_dir / "cpu" / "int8.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        self.export_onnx(checkpoint, out)
        return CpuChoice(out, "onnxruntime", "onnxruntime-int8", "fastest verified", "int8")

    def bundle(self) -> Builders:
        return Builders(
            export_onnx=self.export_onnx, build_engine=self.build_engine, prepare_cpu=self.prepare_cpu
        )


def probes(
    gpu=H100, trt="10.11.0.33", providers=("CUDAExecutionProvider", "CPUExecutionProvider"), torch_cuda=True
):
    return Probes(
        gpu=lambda: gpu,
        tensorrt_version=lambda: trt,
        onnxruntime_providers=lambda: None if providers is None else list(providers),
        torch_cuda=lambda: torch_cuda,
    )


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "refinedet.pth"
    path.parent.mkdir()
    path.write_bytes(b"weights v1")
    return path


@pytest.fixture
def settings(tmp_path: Path, checkpoint: Path) -> Settings:
    return Settings(
        cache_dir=tmp_path / "cache", model=checkpoint, engine_lock_timeout_s=5.0, max_batch_size=8
    )


def replace(settings: Settings, **changes) -> Settings:
    return settings.model_copy(update=changes)


@pytest.fixture(autouse=True)
def fast_lock_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_cache, "LOCK_POLL_S", 0.02)


def leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


# --- build or reuse --------------------------------------------------------------------------------


def test_first_start_exports_and_builds_later_starts_reuse(settings: Settings, checkpoint: Path):
    fake = FakeBuilders()
    first = prepare(settings, probes(), fake.bundle())
    second = prepare(settings, probes(), fake.bundle())
    assert first == second
    assert first.backend == "tensorrt" and first.device == "cuda"
    assert first.artifact.parent == settings.cache_dir / "engines" and first.artifact.read_bytes() == b"plan"
    assert Path(f"{first.artifact}.json").is_file(), "the manifest moves into place with the plan"
    assert first.onnx.read_bytes() == b"onnx from weights v1" and Path(f"{first.onnx}.json").is_file()
    assert len(fake.exports) == 1 and len(fake.builds) == 1
    onnx, precision, max_batch, timing = fake.builds[0]
    assert (onnx, precision, max_batch) == (first.onnx, "fp16", 8)
    assert timing.parent == settings.cache_dir / "timing" and "sm90" in timing.name
    assert leftovers(settings.cache_dir) == []


def test_another_gpu_tensorrt_or_checkpoint_builds_a_new_engine(settings: Settings, checkpoint: Path):
    fake = FakeBuilders()
    plans = {prepare(settings, probes(), fake.bundle()).artifact}
    plans.add(prepare(settings, probes(trt="10.13.3.9"), fake.bundle()).artifact)
    plans.add(prepare(settings, probes(gpu=GpuInfo("NVIDIA L4", "8.9")), fake.bundle()).artifact)
    plans.add(prepare(replace(settings, max_batch_size=4), probes(), fake.bundle()).artifact)
    checkpoint.write_bytes(b"weights v2")  # retrained: a new ONNX export and a new engine
    plans.add(prepare(settings, probes(), fake.bundle()).artifact)
    assert len(plans) == 5 and len(fake.builds) == 5 and len(fake.exports) == 2


def test_onnx_model_is_used_as_is(settings: Settings, tmp_path: Path):
    onnx = fake_artifact(tmp_path / "models" / "given.onnx", "onnx", b"onnx")
    fake = FakeBuilders()
    result = prepare(replace(settings, model=onnx), probes(), fake.bundle())
    assert fake.exports == [] and fake.builds[0][0] == onnx
    assert result.backend == "tensorrt" and result.onnx == onnx


def test_engine_model_is_served_without_building(settings: Settings, tmp_path: Path):
    plan = fake_artifact(tmp_path / "models" / "mine.plan", "tensorrt", b"plan", "fp16")
    fake = FakeBuilders()
    result = prepare(replace(settings, model=plan), probes(), fake.bundle())
    assert (result.artifact, result.backend, result.device, result.engine) == (
        plan, "tensorrt", "cuda", "tensorrt-fp16"
    )  # fmt: skip
    assert (result.max_batch, result.slots, result.threads, result.decode) == (8, 1, None, "nvjpeg")
    assert fake.builds == [] and fake.exports == []


def test_an_onnx_file_that_is_not_a_refinedet_model_is_refused_at_once(settings, tmp_path):
    """`serve --model other.onnx` fails in one line (no manifest), instead of a server answering 503."""
    other = tmp_path / "models" / "other.onnx"
    other.write_bytes(b"some other network")
    fake = FakeBuilders()
    with pytest.raises(UserError, match="no manifest beside"):
        prepare(replace(settings, model=other, device="cpu"), probes(), fake.bundle())
    assert fake.builds == [] and fake.exports == []


# --- fallback --------------------------------------------------------------------------------------


def test_build_failure_falls_back_to_onnxruntime_with_one_clear_line(settings, caplog):
    fake = FakeBuilders(fail=RuntimeError("Myelin out of memory"))
    with caplog.at_level(logging.INFO, logger="refinedet.deploy"):
        result = prepare(settings, probes(), fake.bundle())
    assert (result.backend, result.device) == ("onnxruntime", "cuda")
    assert result.artifact == result.onnx and result.artifact.suffix == ".onnx"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Myelin out of memory" in warnings[0] and "falling back to onnxruntime on cuda" in warnings[0]
    assert list((settings.cache_dir / "engines").glob("*.plan")) == []
    assert leftovers(settings.cache_dir) == []


@pytest.mark.parametrize(
    ("probe_args", "reason", "device"),
    [
        (dict(gpu=None), None, "cpu"),  # device auto without a GPU: the CPU path, nothing to warn about
        (dict(trt=None), "TensorRT Python package is not installed", "cuda"),
        (
            dict(trt=None, providers=("CPUExecutionProvider",), torch_cuda=False),
            "TensorRT Python package",
            "cpu",
        ),
    ],
)
def test_missing_gpu_or_tensorrt_falls_back_without_building(settings, caplog, probe_args, reason, device):
    fake = FakeBuilders()
    with caplog.at_level(logging.WARNING, logger="refinedet.deploy"):
        result = prepare(settings, probes(**probe_args), fake.bundle())
    assert (result.backend, result.device) == ("onnxruntime", device)
    assert fake.builds == []
    if reason is None:
        assert caplog.records == []
    else:
        assert reason in caplog.text
    if probe_args.get("gpu", H100) is None:  # asked for explicitly, a missing GPU is refused, not hidden
        with pytest.raises(UserError, match="--device cuda but no CUDA GPU is visible"):
            prepare(replace(settings, device="cuda"), probes(**probe_args, torch_cuda=False), fake.bundle())


def test_gpu_without_onnxruntime_cuda_serves_torch_on_cuda(settings, checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="refinedet.deploy"):
        result = prepare(
            settings, probes(trt=None, providers=("CPUExecutionProvider",)), FakeBuilders().bundle()
        )
    assert (result.artifact, result.backend, result.device) == (checkpoint, "torch", "cuda")
    assert "falling back to torch on cuda" in caplog.text


def test_without_onnxruntime_falls_back_to_torch_on_the_checkpoint(settings, checkpoint):
    fake = FakeBuilders(fail=RuntimeError("boom"))
    result = prepare(settings, probes(providers=None), fake.bundle())
    assert (result.artifact, result.backend, result.device) == (checkpoint, "torch", "cuda")
    cpu = prepare(settings, probes(providers=None, torch_cuda=False), fake.bundle())
    assert (cpu.backend, cpu.device) == ("torch", "cpu")


def test_failed_onnx_export_falls_back_to_torch(settings, checkpoint, caplog):
    def broken_export(checkpoint: Path, out: Path) -> None:
        raise RuntimeError("onnx is not installed")

    with caplog.at_level(logging.WARNING, logger="refinedet.deploy"):
        result = prepare(settings, probes(), Builders(export_onnx=broken_export))
    assert (result.artifact, result.backend) == (checkpoint, "torch")
    assert "ONNX export failed" in caplog.text and "onnx is not installed" in caplog.text


def test_an_unreadable_checkpoint_stops_the_start_instead_of_falling_back(settings, checkpoint):
    def rejecting_export(checkpoint: Path, out: Path) -> None:
        raise UserError("`refinedet export onnx` rejected its input (status 2, reason above)")

    with pytest.raises(UserError, match=r"ONNX export of .* failed: .*rejected its input"):
        prepare(settings, probes(), Builders(export_onnx=rejecting_export))


def test_backend_tensorrt_is_strict(settings):
    with pytest.raises(UserError, match=r"backend tensorrt but no engine.*boom"):
        prepare(replace(settings, backend="tensorrt"), probes(), FakeBuilders(RuntimeError("boom")).bundle())


def test_cpu_device_and_onnxruntime_backend_skip_the_engine(settings, checkpoint):
    fake = FakeBuilders()
    cpu = prepare(replace(settings, device="cpu", cpu_threads=3), probes(), fake.bundle())
    ort = prepare(replace(settings, backend="onnxruntime"), probes(), fake.bundle())
    assert (cpu.backend, cpu.device) == ("onnxruntime", "cpu") and cpu.artifact.name == "int8.onnx"
    assert (cpu.engine, cpu.precision, cpu.threads, cpu.slots, cpu.decode) == (
        "onnxruntime-int8", "int8", 3, 3, "pil"
    )  # fmt: skip
    assert fake.cpu == [(checkpoint, 3)], (
        "auto on a CPU asks conversion.cpu_engine, with the worker's threads"
    )
    assert (ort.backend, ort.device) == ("onnxruntime", "cuda")
    assert fake.builds == [] and len(fake.exports) == 2


def test_cpu_engine_failure_falls_back_to_torch_but_bad_input_stops(settings, checkpoint, caplog):
    def broken(checkpoint: Path, cache_dir: Path, threads: int) -> CpuChoice:
        raise RuntimeError("quantizer crashed")

    def refused(checkpoint: Path, cache_dir: Path, threads: int) -> CpuChoice:
        raise UserError("not a readable checkpoint")

    cpu = replace(settings, device="cpu")
    with caplog.at_level(logging.WARNING, logger="refinedet.deploy"):
        result = prepare(cpu, probes(), Builders(prepare_cpu=broken))
    assert (result.artifact, result.backend, result.device) == (checkpoint, "torch", "cpu")
    assert "quantizer crashed" in caplog.text and "quantizer crashed" in result.reason
    with pytest.raises(UserError, match="not a readable checkpoint"):
        prepare(cpu, probes(), Builders(prepare_cpu=refused))


def test_backend_torch_needs_a_checkpoint(settings, tmp_path):
    onnx = fake_artifact(tmp_path / "models" / "m.onnx", "onnx", b"x")
    with pytest.raises(UserError, match="needs a checkpoint"):
        prepare(replace(settings, backend="torch", model=onnx), probes(), FakeBuilders().bundle())


def test_model_errors_are_user_errors(settings, tmp_path):
    with pytest.raises(UserError, match="model not found"):
        prepare(replace(settings, model=tmp_path / "missing.pth"), probes())
    odd = tmp_path / "model.bin"
    odd.write_bytes(b"x")
    with pytest.raises(
        UserError, match=r"unknown model file type; expected one of \.pth\.xz, .*\.onnx, \.plan"
    ):
        prepare(replace(settings, model=odd), probes())


def test_no_model_anywhere_serves_the_untrained_network(settings, monkeypatch, caplog):
    monkeypatch.setattr(deploy.host, "default_checkpoint", lambda: None)
    with caplog.at_level(logging.WARNING, logger="refinedet.deploy"):
        result = prepare(replace(settings, model=None), probes(), FakeBuilders().bundle())
    assert (result.artifact, result.backend, result.device) == (None, "torch", "cuda")
    assert "UNTRAINED" in caplog.text


# --- the build lock --------------------------------------------------------------------------------


def hold_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 -- held past return; a separate open file description conflicts even in-process
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def engine_path(settings: Settings) -> Path:
    onnx = prepare(replace(settings, backend="onnxruntime"), probes(), FakeBuilders().bundle()).onnx
    key = engine_cache_key(file_sha256(onnx), H100.name, "9.0", "10.11.0.33", "fp16", 8)
    return plan_path(settings.cache_dir, key)


def test_replica_waits_for_the_builder_and_reuses_its_engine(settings):
    plan = engine_path(settings)
    holder = hold_lock(plan.with_suffix(".lock"))

    def other_replica_finishes() -> None:
        time.sleep(0.3)
        engine_cache.publish(plan, lambda out: fake_artifact(out, "tensorrt", b"built elsewhere", "fp16"))
        holder.close()  # releases the lock

    thread = threading.Thread(target=other_replica_finishes)
    thread.start()
    fake = FakeBuilders(fail=AssertionError("must not build while another replica does"))
    start = time.monotonic()
    result = prepare(settings, probes(), fake.bundle())
    thread.join()
    assert result.artifact == plan and plan.read_bytes() == b"built elsewhere"
    assert fake.builds == [] and time.monotonic() - start >= 0.25


def test_lock_held_too_long_falls_back(settings, caplog):
    holder = hold_lock(engine_path(settings).with_suffix(".lock"))
    try:
        with caplog.at_level(logging.WARNING, logger="refinedet.deploy"):
            result = prepare(replace(settings, engine_lock_timeout_s=0.2), probes(), FakeBuilders().bundle())
    finally:
        holder.close()
    assert result.backend == "onnxruntime"
    assert "LockTimeout" in caplog.text


# --- kinds of model file ---------------------------------------------------------------------------


def test_compressed_and_unsuffixed_checkpoints_are_checkpoints(settings, tmp_path):
    """The shipped model is a .pth.xz (the container's default start once refused it); a checkpoint
    without a known suffix is recognised by its first bytes."""
    fake = FakeBuilders()
    for name, head in [("shipped.pth.xz", b"\xfd7zXZ\x00rest"), ("weights", b"PK\x03\x04rest")]:
        path = tmp_path / "models" / name
        path.write_bytes(head)
        result = prepare(replace(settings, model=path, device="cpu"), probes(), fake.bundle())
        assert (result.backend, result.device) == ("onnxruntime", "cpu") and result.onnx is not None
    assert [p.name for p in fake.exports] == ["shipped.pth.xz", "weights"]


def test_engine_refused_on_the_cpu(settings, tmp_path):
    plan = fake_artifact(tmp_path / "models" / "mine.engine", "tensorrt", b"plan")
    with pytest.raises(UserError, match="runs with backend tensorrt on a CUDA GPU only"):
        prepare(replace(settings, model=plan, device="cpu"), probes(), FakeBuilders().bundle())


@pytest.mark.slow
def test_real_onnx_export_then_reuse(tmp_path):
    """The real `refinedet export onnx` subprocess into the cache, then a restart that reuses it."""
    from model.checkpoint import save_checkpoint
    from model.config import preset
    from model.network import build_model

    checkpoint = tmp_path / "tiny.pth"
    save_checkpoint(
        checkpoint,
        build_model(preset("refinedet320_vgg16", input_size=64, class_names=("a", "b"))),
        half=True,
    )
    settings = Settings(cache_dir=tmp_path / "cache", model=checkpoint, device="cpu")
    first = prepare(settings)
    assert (first.backend, first.device) == ("onnxruntime", "cpu") and first.artifact == first.onnx
    manifest = json.loads(Path(f"{first.onnx}.json").read_text())
    assert manifest["kind"] == "onnx" and manifest["artifact_sha256"] == file_sha256(first.onnx)
    mtime = first.onnx.stat().st_mtime_ns
    assert prepare(settings) == first and first.onnx.stat().st_mtime_ns == mtime
    assert leftovers(settings.cache_dir) == []


# --- a cache that heals (issue #25, finding 4) -----------------------------------------------------


def test_a_damaged_cached_export_or_engine_is_built_again(settings: Settings):
    """Before: a truncated or bit-flipped engine in the cache was reused as it was (and failed to load)."""
    fake = FakeBuilders()
    first = prepare(settings, probes(), fake.bundle())
    first.artifact.write_bytes(b"pla")  # truncated
    first.onnx.write_bytes(b"onnx from weights v2")  # a flipped bit
    second = prepare(settings, probes(), fake.bundle())
    assert second == first and second.artifact.read_bytes() == b"plan"
    assert second.onnx.read_bytes() == b"onnx from weights v1"
    assert len(fake.exports) == 2 and len(fake.builds) == 2
    assert prepare(settings, probes(), fake.bundle()) == first and len(fake.builds) == 2


def test_a_cpu_engine_chosen_under_a_cache_fault_is_logged_in_one_line(settings, checkpoint, caplog):
    line = "cache /c is full (ENOSPC): openvino-int8 could not be made, serving torch-fp32 until ...; fix: free space"

    def full(checkpoint: Path, cache_dir: Path, threads: int) -> CpuChoice:
        return CpuChoice(checkpoint, "torch", "torch-fp32", f"{line}; the only engine left", "fp32", line)

    with caplog.at_level(logging.INFO, logger="refinedet.deploy"):
        result = prepare(replace(settings, device="cpu"), probes(), Builders(prepare_cpu=full))
    assert (result.artifact, result.engine) == (checkpoint, "torch-fp32") and line in result.reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"CPU engine: {line}"]

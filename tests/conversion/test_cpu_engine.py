"""The CPU engine choice (conversion.cpu_engine) on the tiny random RefineDet: made once into the cache
and reused, verified before it is returned, and falling back with the reason recorded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conversion import cpu_engine
from conversion.calibration_table import build_table, table_path_for
from conversion.cpu_engine import ENGINES, CpuArtifact, _Candidate, _rank, prepare_cpu_artifact
from conversion.quantize import QuantizeOptions
from conversion.verify import TOLERANCES, Tolerance, image_files
from model.artifacts import read_manifest
from model.errors import UserError

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning")


@pytest.fixture(scope="module")
def checkpoint_with_table(tmp_path_factory, tiny_checkpoint, image_dir) -> Path:
    folder = tmp_path_factory.mktemp("shipped")
    checkpoint = Path(shutil.copy(tiny_checkpoint, folder / "tiny.pth"))
    options = QuantizeOptions(files=tuple(image_files(image_dir)), source="test images")
    build_table(checkpoint, table_path_for(checkpoint), options)
    return checkpoint


@pytest.mark.slow
def test_auto_verifies_times_and_caches_the_choice(checkpoint_with_table, tmp_path, monkeypatch):
    choice = prepare_cpu_artifact(checkpoint_with_table, tmp_path, threads=1)
    assert choice.engine in ENGINES and choice.artifact.is_file()
    record = choice.record
    assert set(record["timings_ms"]) | set(record["skipped"]) == set(ENGINES)
    assert record["checks"]["onnxruntime-fp32"]["passed"]
    # The tiny random model's INT8 version may miss the INT8 agreement limit on the smears: then it
    # must have been passed over for that reason, never served.
    if not record["checks"]["onnxruntime-int8"]["passed"]:
        assert "failed its check" in record["skipped"]["onnxruntime-int8"] and choice.engine != ENGINES[0]
    assert record["cpu"]["usable_cores"] >= 1 and record["threads"] == 1
    if choice.engine != "torch-fp32":
        assert read_manifest(choice.artifact).precision == choice.engine.rsplit("-", 1)[1]
    # A second start reads the decision: nothing is exported, checked or timed again.
    monkeypatch.setattr(cpu_engine, "_decide", lambda *a, **k: pytest.fail("decided twice"))
    assert prepare_cpu_artifact(checkpoint_with_table, tmp_path, threads=1) == choice


@pytest.mark.slow
def test_an_int8_model_that_fails_its_check_is_passed_over(checkpoint_with_table, tmp_path, monkeypatch):
    monkeypatch.setitem(TOLERANCES, "int8", Tolerance(0.0, 0.0, 0.0, 1.0))
    choice = prepare_cpu_artifact(checkpoint_with_table, tmp_path, engine="int8", threads=1)
    assert choice.engine == "onnxruntime-fp32" and choice.artifact.name == "fp32.onnx"
    assert "failed its check against the checkpoint" in choice.record["skipped"]["onnxruntime-int8"]
    assert "passed over onnxruntime-int8" in choice.reason


def test_without_a_ranges_table_int8_is_skipped_with_the_reason(tiny_checkpoint, tmp_path):
    choice = prepare_cpu_artifact(tiny_checkpoint, tmp_path, engine="int8", threads=1)
    assert choice.engine == "onnxruntime-fp32"
    assert "no INT8 ranges table" in choice.record["skipped"]["onnxruntime-int8"]


def test_asking_for_torch_serves_the_checkpoint(tiny_checkpoint, tmp_path):
    choice = prepare_cpu_artifact(tiny_checkpoint, tmp_path, engine="torch", threads=1)
    assert (choice.artifact, choice.engine, choice.backend) == (tiny_checkpoint, "torch-fp32", "torch")
    with pytest.raises(UserError, match="must be one of"):
        prepare_cpu_artifact(tiny_checkpoint, tmp_path, engine="fp16")


def test_int8_is_chosen_only_where_this_cpu_gains_from_it():
    def cands(*names: str) -> list[_Candidate]:
        return [_Candidate(n, Path(n), lambda x: x) for n in names]

    skipped: dict[str, str] = {}
    ranked = _rank(
        cands(*ENGINES), {"onnxruntime-int8": 95.0, "onnxruntime-fp32": 100.0, "torch-fp32": 150.0}, skipped
    )
    assert [c.engine for c in ranked] == ["onnxruntime-fp32", "torch-fp32"]
    assert "not faster on this CPU" in skipped["onnxruntime-int8"]
    ranked = _rank(
        cands(*ENGINES), {"onnxruntime-int8": 40.0, "onnxruntime-fp32": 100.0, "torch-fp32": 90.0}, {}
    )
    assert [c.engine for c in ranked] == ["onnxruntime-int8", "torch-fp32", "onnxruntime-fp32"]


def test_the_answer_unpacks_and_names_its_backend(tmp_path):
    choice = CpuArtifact(tmp_path / "m.onnx", "onnxruntime-int8", "why", {})
    artifact, engine, reason, _ = choice
    assert (artifact, engine, reason, choice.backend) == (
        tmp_path / "m.onnx",
        "onnxruntime-int8",
        "why",
        "onnxruntime",
    )

"""The CPU engine choice (conversion.cpu_engine) on the tiny random RefineDet: made once into the cache
and reused, verified before it is returned, and falling back with the reason recorded; an OpenVINO
candidate that crashes, hangs or fails in its child process costs only itself."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from conversion import cpu_engine
from conversion.calibration_table import build_table, table_path_for
from conversion.cpu_candidate import FAULT_ENV, CandidateError, check_in_child
from conversion.cpu_engine import ENGINES, CpuArtifact, _rank, prepare_cpu_artifact, wanted_engines
from conversion.quantize import QuantizeOptions
from conversion.verify import TOLERANCES, Tolerance, image_files
from model.artifacts import read_manifest
from model.checkpoint import file_sha256
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


@pytest.fixture
def seeded_cache(tmp_path, tiny_checkpoint, tiny_onnx) -> Path:
    """A cache folder already holding the tiny checkpoint's FP32 export, decoding in the graph (as a first
    start leaves it), so that a test does not export the network again."""
    from conversion.onnx_export import export_checkpoint
    from model.checkpoint import file_sha256

    folder = tmp_path / "cpu" / file_sha256(tiny_checkpoint)[:16]
    folder.mkdir(parents=True)
    export_checkpoint(tiny_checkpoint, folder / "fp32-decoded.onnx", outputs="decoded")
    return tmp_path


@pytest.mark.slow
def test_auto_verifies_times_and_caches_the_choice(checkpoint_with_table, tmp_path, monkeypatch):
    choice = prepare_cpu_artifact(checkpoint_with_table, tmp_path, threads=1)
    assert choice.engine in ENGINES and choice.artifact.is_file()
    record = choice.record
    assert set(record["timings_ms"]) | set(record["skipped"]) == set(ENGINES)
    assert record["checks"]["onnxruntime-fp32"]["passed"]
    assert record["precisions"]["onnxruntime-fp32"] == "fp32"
    # The tiny random model's INT8 (or BF16) versions may miss their agreement limits on the smears:
    # such an engine must have been passed over for that reason, never served.
    for name, check in record["checks"].items():
        if not check["passed"]:
            assert "failed its check" in record["skipped"][name] and choice.engine != name
    assert record["cpu"]["usable_cores"] >= 1 and record["threads"] == 1
    if choice.engine != "torch-fp32":
        assert read_manifest(choice.artifact).precision == choice.engine.rsplit("-", 1)[1]
    assert choice.precision == record["precisions"][choice.engine]
    # A second start reads the decision: nothing is exported, checked or timed again.
    monkeypatch.setattr(cpu_engine._Decision, "run", lambda *a, **k: pytest.fail("decided twice"))
    assert prepare_cpu_artifact(checkpoint_with_table, tmp_path, threads=1) == choice


@pytest.mark.slow
def test_an_int8_model_that_fails_its_check_is_passed_over(checkpoint_with_table, tmp_path, monkeypatch):
    monkeypatch.setitem(TOLERANCES, "int8", Tolerance(0.0, 0.0, 0.0, 1.0))
    choice = prepare_cpu_artifact(checkpoint_with_table, tmp_path, engine="int8", threads=1)
    assert choice.engine == "onnxruntime-fp32" and choice.artifact.name == "fp32-decoded.onnx"
    assert "failed its check against the checkpoint" in choice.record["skipped"]["onnxruntime-int8"]
    assert "passed over onnxruntime-int8" in choice.reason


def test_without_a_ranges_table_int8_is_skipped_with_the_reason(tiny_checkpoint, seeded_cache):
    choice = prepare_cpu_artifact(tiny_checkpoint, seeded_cache, engine="int8", threads=1)
    assert choice.engine == "onnxruntime-fp32"
    assert "no INT8 ranges table" in choice.record["skipped"]["onnxruntime-int8"]


def test_asking_for_torch_serves_the_checkpoint(tiny_checkpoint, tmp_path):
    choice = prepare_cpu_artifact(tiny_checkpoint, tmp_path, engine="torch", threads=1)
    assert (choice.artifact, choice.engine, choice.backend) == (tiny_checkpoint, "torch-fp32", "torch")
    with pytest.raises(UserError, match="must be one of"):
        prepare_cpu_artifact(tiny_checkpoint, tmp_path, engine="fp16")


def test_int8_is_chosen_only_where_this_cpu_gains_from_it():
    skipped: dict[str, str] = {}
    timings = {"openvino-int8": 90.0, "onnxruntime-int8": 95.0, "openvino-fp32": 98.0,
               "onnxruntime-fp32": 100.0, "torch-fp32": 150.0}  # fmt: skip
    assert _rank(list(ENGINES), timings, skipped) == ["openvino-fp32", "onnxruntime-fp32", "torch-fp32"]
    assert "not faster on this CPU (90.0 ms vs openvino-fp32 98.0 ms)" in skipped["openvino-int8"]
    assert "onnxruntime-int8" in skipped
    timings = {"onnxruntime-int8": 40.0, "onnxruntime-fp32": 100.0, "torch-fp32": 90.0}
    ranked = _rank(["onnxruntime-int8", "onnxruntime-fp32", "torch-fp32"], timings, {})
    assert ranked == ["onnxruntime-int8", "torch-fp32", "onnxruntime-fp32"]


def test_a_requested_engine_falls_back_within_its_runtime_then_to_torch():
    assert wanted_engines("auto") == list(ENGINES)
    assert wanted_engines("openvino-int8") == ["openvino-int8", "openvino-fp32", "torch-fp32"]
    assert wanted_engines("onnxruntime-int8") == ["onnxruntime-int8", "onnxruntime-fp32", "torch-fp32"]
    assert wanted_engines("torch-fp32") == ["torch-fp32"]


def test_the_answer_unpacks_and_names_its_backend_and_precision(tmp_path):
    choice = CpuArtifact(tmp_path / "m.onnx", "onnxruntime-int8", "why", {})
    artifact, engine, reason, _ = choice
    assert (artifact, engine, reason, choice.backend, choice.precision) == (
        tmp_path / "m.onnx",
        "onnxruntime-int8",
        "why",
        "onnxruntime",
        "int8",
    )
    bf16 = CpuArtifact(tmp_path / "m.onnx", "openvino-fp32", "why", {"precisions": {"openvino-fp32": "bf16"}})
    assert (bf16.backend, bf16.precision, bf16.to_dict()["precision"]) == ("openvino", "bf16", "bf16")


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("crash", "its process crashed (SIGSEGV)"), ("hang", "no answer within 2 s (hung)"),
     ("fail", "its process failed (status 1): openvino-fp32: injected failure")],
)  # fmt: skip
def test_a_bad_child_is_reported_as_the_candidates_failure(tmp_path, monkeypatch, fault, reason):
    monkeypatch.setenv(FAULT_ENV, f"openvino-fp32={fault}")
    with pytest.raises(CandidateError) as caught:
        check_in_child("openvino-fp32", tmp_path / "m.onnx", tmp_path / "ref.pt", 1, 2.0, tmp_path)
    assert reason in str(caught.value)


@pytest.mark.parametrize("fault", ["crash", pytest.param("hang", marks=pytest.mark.slow)])
def test_a_crashing_or_hanging_openvino_candidate_costs_only_itself(
    tiny_checkpoint, tmp_path, monkeypatch, fault
):
    pytest.importorskip("openvino")
    monkeypatch.setenv(FAULT_ENV, f"openvino-fp32={fault}")
    choice = prepare_cpu_artifact(tiny_checkpoint, tmp_path, threads=1, child_timeout_s=4.0)
    record = choice.record
    expected = "its process crashed (SIGSEGV)" if fault == "crash" else "no answer within 4 s (hung)"
    assert expected in record["skipped"]["openvino-fp32"] and "openvino-fp32" not in record["timings_ms"]
    assert "no INT8 ranges table" in record["skipped"]["openvino-int8"]
    assert {"onnxruntime-fp32", "torch-fp32"} <= set(record["timings_ms"])  # the others were still timed
    assert choice.engine in ("onnxruntime-fp32", "torch-fp32") and expected in choice.reason


@pytest.mark.slow
def test_a_healthy_openvino_candidate_is_checked_in_its_child(tiny_checkpoint, seeded_cache):
    pytest.importorskip("openvino")
    choice = prepare_cpu_artifact(tiny_checkpoint, seeded_cache, engine="openvino-fp32", threads=1)
    record = choice.record
    check = record["checks"]["openvino-fp32"]
    assert check["images"] == 8 and check["precision"] in ("bf16", "fp32")
    if check["passed"]:  # the tiny random model may miss the BF16 limits: then torch, with the reason
        assert (choice.engine, choice.backend, choice.precision) == (
            "openvino-fp32",
            "openvino",
            check["precision"],
        )
        assert read_manifest(choice.artifact).precision == "fp32" and record["openvino"]
    else:
        assert choice.engine == "torch-fp32" and "failed its check" in record["skipped"]["openvino-fp32"]


@pytest.mark.slow
def test_a_failed_timing_process_costs_only_the_openvino_candidates(
    tiny_checkpoint, seeded_cache, monkeypatch
):
    pytest.importorskip("openvino")
    monkeypatch.setitem(TOLERANCES, "bf16", Tolerance(1e9, 1e9, 1e9, 0.0))  # the tiny model passes as BF16
    monkeypatch.setenv(FAULT_ENV, "timing=crash")
    choice = prepare_cpu_artifact(tiny_checkpoint, seeded_cache, threads=1)
    record = choice.record
    assert record["checks"]["openvino-fp32"]["passed"]
    assert "timing process: its process crashed (SIGSEGV)" in record["skipped"]["openvino-fp32"]
    assert set(record["timings_ms"]) == {"onnxruntime-fp32", "torch-fp32"}  # timed here instead
    assert choice.engine in ("onnxruntime-fp32", "torch-fp32")


@pytest.mark.slow
def test_openvino_is_timed_with_the_others_in_one_child(tiny_checkpoint, seeded_cache, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setitem(TOLERANCES, "bf16", Tolerance(1e9, 1e9, 1e9, 0.0))
    choice = prepare_cpu_artifact(tiny_checkpoint, seeded_cache, threads=1)
    assert set(choice.record["timings_ms"]) == {"openvino-fp32", "onnxruntime-fp32", "torch-fp32"}
    assert choice.engine == min(choice.record["timings_ms"], key=choice.record["timings_ms"].get)


def test_export_cpu_prints_the_engine_backend_and_precision(tiny_checkpoint, tmp_path, capsys):
    from refinedet.cli import main

    out = tmp_path / "decision.json"
    argv = ["export", "cpu", "--checkpoint", str(tiny_checkpoint), "--cache-dir", str(tmp_path)]
    assert main([*argv, "--engine", "torch", "--threads", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["engine"], printed["backend"], printed["precision"]) == ("torch-fp32", "torch", "fp32")
    # With --json-out the decision goes to the file, nothing to stdout (`serve` runs it at a first start: its
    # log line names the engine, in the server's log format).
    assert main([*argv, "--engine", "torch", "--threads", "1", "--json-out", str(out)]) == 0
    assert json.loads(out.read_text()) == printed and capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--engine", "openvino-fp16"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


# --- a cache that heals (issue #25, finding 4) -----------------------------------------------------

LOOSE = Tolerance(1e9, 1e9, 1e9, 0.0)  # the tiny random model's INT8 version passes its check


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory, checkpoint_with_table) -> Path:
    """A cache in which ONNX Runtime INT8 was chosen (decided once for the module; tests change copies)."""
    cache = tmp_path_factory.mktemp("int8-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(TOLERANCES, "int8", LOOSE)
        choice = prepare_cpu_artifact(checkpoint_with_table, cache, engine="int8", threads=1)
    assert choice.engine == "onnxruntime-int8"
    return cache


@pytest.fixture
def cache(int8_cache, tmp_path, monkeypatch) -> Path:
    monkeypatch.setitem(TOLERANCES, "int8", LOOSE)
    return Path(shutil.copytree(int8_cache, tmp_path / "cache"))


def int8_file(cache: Path) -> Path:
    (path,) = cache.glob("cpu/*/int8-decoded-*.onnx")
    return path


def no_decision(*args, **kwargs):
    pytest.fail("decided again: the cache should have been enough")


def cpu_leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_corrupt_int8_model_is_rebuilt_and_the_same_engine_served_again(
    cache, checkpoint_with_table, monkeypatch, damage
):
    """Before: the damaged INT8 model was detected, then reused as it was; it failed its check and the FP32
    choice that followed was cached for good (every later start 2.1x slower)."""
    int8 = int8_file(cache)
    original = file_sha256(int8)
    if damage == "truncate":
        os.truncate(int8, int8.stat().st_size // 2)
    elif damage == "flip":
        with open(int8, "r+b") as f:
            f.seek(int8.stat().st_size // 2)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 0x10]))
    else:
        int8.unlink()
    repaired = prepare_cpu_artifact(checkpoint_with_table, cache, engine="int8", threads=1)
    assert (repaired.engine, repaired.artifact) == ("onnxruntime-int8", int8)
    assert file_sha256(int8) == original and not repaired.fault
    monkeypatch.setattr(cpu_engine._Decision, "run", no_decision)  # the next start reads it again
    assert prepare_cpu_artifact(checkpoint_with_table, cache, engine="int8", threads=1) == repaired


def test_a_choice_made_while_the_disk_was_full_is_retried_once_there_is_space(
    cache, checkpoint_with_table, monkeypatch, caplog
):
    """Before: FP32 (or torch) chosen on a full disk was cached as the decision, kept after space came back."""
    import conversion.calibration_table as calibration_table

    for path in [int8_file(cache), *cache.glob("cpu/*/decision-*.json")]:
        path.unlink()

    def full_disk(fp32: Path, out: Path, table: Path) -> None:
        out.write_bytes(b"half an int8 mod")
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    with monkeypatch.context() as patch:
        patch.setattr(calibration_table, "quantize_with_table", full_disk)
        full = prepare_cpu_artifact(checkpoint_with_table, cache, engine="int8", threads=1)
    with caplog.at_level(logging.INFO, logger="refinedet.cpu_engine"):
        again = prepare_cpu_artifact(checkpoint_with_table, cache, engine="int8", threads=1)
    assert (full.engine, again.engine) == ("onnxruntime-fp32", "onnxruntime-int8")
    assert f"cache {cache} is full (ENOSPC)" in full.fault and "fix: free space" in full.fault
    assert not again.fault
    assert "retrying" in caplog.text and cpu_leftovers(cache) == []
    monkeypatch.setattr(cpu_engine._Decision, "run", no_decision)  # final now: read, not decided again
    assert prepare_cpu_artifact(checkpoint_with_table, cache, engine="int8", threads=1) == again


def read_only(path: Path, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", str(path))


def test_a_read_only_cache_serves_what_it_holds_and_says_why_when_it_holds_nothing(
    cache, checkpoint_with_table, tmp_path, monkeypatch
):
    """Before: an unwritable cache failed the whole preparation (a traceback, the parent's fallback to torch
    saying only "exited with status 1")."""
    monkeypatch.setattr(cpu_engine, "exclusive_lock", read_only)  # as on a read-only mount
    held = prepare_cpu_artifact(checkpoint_with_table, cache, engine="int8", threads=1)
    assert (held.engine, held.artifact.parent.parent.parent) == ("onnxruntime-int8", cache)
    empty = tmp_path / "empty"
    nothing = prepare_cpu_artifact(checkpoint_with_table, empty, engine="int8", threads=1)
    assert (nothing.engine, nothing.artifact) == ("torch-fp32", checkpoint_with_table)
    assert f"cache {empty} is read-only (EROFS)" in nothing.fault and "writable" in nothing.fault
    assert nothing.fault in nothing.reason
    assert list(empty.rglob("decision-*.json")) == []  # nothing cached: the next start tries again


def test_a_cache_copied_elsewhere_serves_its_own_files(cache, checkpoint_with_table, tmp_path, monkeypatch):
    """Before: the decision held absolute paths; a copy of the cache served the original's files."""
    moved = Path(shutil.copytree(cache, tmp_path / "moved"))
    monkeypatch.setattr(cpu_engine._Decision, "run", no_decision)
    choice = prepare_cpu_artifact(checkpoint_with_table, moved, engine="int8", threads=1)
    assert choice.engine == "onnxruntime-int8" and choice.artifact == int8_file(moved)
    (decision,) = moved.glob("cpu/*/decision-*.json")
    assert not Path(json.loads(decision.read_text())["artifact"]).is_absolute()
    assert str(cache) not in decision.read_text() and str(tmp_path) not in decision.read_text()


def test_a_decision_written_with_absolute_paths_is_served_from_this_cache(
    cache, checkpoint_with_table, monkeypatch
):
    """Decisions written before the paths became relative name the file where it was first made."""
    (decision,) = cache.glob("cpu/*/decision-*.json")
    data = json.loads(decision.read_text())
    data["artifact"] = f"/elsewhere/cache/{data['artifact']}"
    decision.write_text(json.dumps(data))
    monkeypatch.setattr(cpu_engine._Decision, "run", no_decision)
    choice = prepare_cpu_artifact(checkpoint_with_table, cache, engine="int8", threads=1)
    assert choice.artifact == int8_file(cache)


def test_a_start_removes_what_a_killed_export_left(cache, checkpoint_with_table):
    """Before: a build killed mid-way left its ``.*.tmp`` folder in the cache for good."""
    folder = int8_file(cache).parent
    int8_file(cache).unlink()
    (decision,) = folder.glob("decision-*.json")
    decision.unlink()
    stale = folder / f".{int8_file_name(folder)}.k1lled00.tmp"
    stale.mkdir()
    (folder / f".{decision.name}.k1lled00.tmp").write_bytes(b"{")
    choice = prepare_cpu_artifact(checkpoint_with_table, cache, engine="int8", threads=1)
    assert choice.engine == "onnxruntime-int8" and cpu_leftovers(cache) == []


def int8_file_name(folder: Path) -> str:
    (manifest,) = folder.glob("int8-decoded-*.onnx.json")
    return manifest.name.removesuffix(".json")


def test_export_cpu_refuses_a_file_for_a_cache(tiny_checkpoint, tmp_path, capsys):
    """An unwritable cache folder is not refused any more (what it holds is served, else torch, with the
    fault); a file where the folder should be still is."""
    from refinedet.cli import main

    afile = tmp_path / "cache"
    afile.write_bytes(b"")
    assert main(["export", "cpu", "--checkpoint", str(tiny_checkpoint), "--cache-dir", str(afile)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err

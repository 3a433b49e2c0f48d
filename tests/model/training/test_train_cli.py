"""``refinedet train`` end to end: the console entry, torchrun DDP on CPU (gloo), a real kill + resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.checkpoint import read_checkpoint
from refinedet.cli import main

REPO = Path(__file__).resolve().parents[3]
TINY = ["--input-size", "64", "--device", "cpu", "--workers", "0", "--no-progress", "--log-every", "1"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_cli_trains_and_reports(voc_root, tmp_path, capsys):
    code = main(
        [
            "train",
            "--data",
            str(voc_root),
            "--iterations",
            "2",
            "--batch-size",
            "1",
            "--output",
            str(tmp_path / "r"),
            *TINY,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"data      {voc_root.name} (trainval): 4 images, classes cat, dog" in out
    assert "finished at iteration 2/2" in out and str(tmp_path / "r" / "last.pth") in out
    # --no-progress --log-every 1: one loss line per step on the console
    steps = [line for line in out.splitlines() if line.startswith("iteration ")]
    assert [line.split()[1] for line in steps] == ["1/2", "2/2"]
    assert all(" loss " in line and " arm " in line and " odm " in line for line in steps)


def test_missing_pretrained_file_leaves_no_run_folder(voc_root, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", "--data", str(voc_root), "--output", str(out), "--pretrained", str(tmp_path / "no.pth")]
    assert main([*argv, *TINY]) == 2
    err = capsys.readouterr().err
    assert "--pretrained" in err and "no such file" in err and "Traceback" not in err
    assert not out.exists()


def test_output_paths_are_checked_before_the_data_loads(tmp_path, capsys, monkeypatch):
    import model.training.build

    monkeypatch.setattr(model.training.build, "open_train_set", lambda *a: pytest.fail("the data was loaded"))
    taken = tmp_path / "taken"
    taken.write_text("a file")
    data = ["--data", str(tmp_path / "missing")]  # would fail too: the output is checked first
    assert main(["train", *data, "--output", str(taken), *TINY]) == 2
    assert (
        capsys.readouterr().err
        == f"refinedet train: error: --output {taken}: is a file, not a folder; give a folder (new or existing)\n"
    )
    assert main(["train", *data, "--output", str(taken / "run"), *TINY]) == 2
    assert (
        capsys.readouterr().err
        == f"refinedet train: error: --output {taken / 'run'}: {taken} is a file, not a folder\n"
    )
    missing = tmp_path / "weights.pth"
    assert main(["train", *data, "--pretrained", str(missing), *TINY]) == 2
    assert capsys.readouterr().err == (
        f"refinedet train: error: --pretrained {missing}: no such file (or give imagenet or none)\n"
    )
    assert taken.read_text() == "a file"


def test_cli_dataset_errors_are_one_line_messages(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "r"), *TINY])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("refinedet train: error: dataset root") and "Traceback" not in err
    assert main(["train", "--data", str(tmp_path), "--coco-ann", "x.json", *TINY]) == 2
    assert "not both or neither" in capsys.readouterr().err


def test_two_process_gloo_ddp_run(voc_root, tmp_path):
    """torchrun, 2 CPU processes, gloo: ~11 s on 2 cores (process start-up dominates)."""
    out = tmp_path / "ddp"
    started = time.perf_counter()
    proc = run_cli(
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "refinedet", "train", "--data", str(voc_root), "--iterations", "2", "--batch-size", "2",
        "--output", str(out), "--checkpoint-every", "1", *TINY,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("finished at iteration 2/2") == 1  # rank 0 alone reports
    assert "global batch 2 over 2 process(es)" in proc.stdout
    ckpt = read_checkpoint(out / "last.pth")
    assert ckpt["training"]["iteration"] == 2 and ckpt["metadata"]["world_size"] == 2
    assert (out / "metrics.csv").read_text().count("\n") == 3  # header + 2 rows, written once
    print(f"ddp run took {time.perf_counter() - started:.1f} s")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_iteration(voc_root, tmp_path):
    """SIGKILL a CLI run after its first checkpoint, then --resume: it ends at the planned iteration."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "refinedet", "train", "--data", str(voc_root), "--iterations", "6",
           "--batch-size", "1", "--checkpoint-every", "2", "--output", str(out), *TINY]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "last.pth").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = read_checkpoint(out / "last.pth")["training"]["iteration"]
    assert done in (2, 4), "killed before or after the run"
    resumed = run_cli("-m", "refinedet", "train", "--resume", str(out / "last.pth"), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"schedule  6 iterations from {done}" in resumed.stdout
    assert "finished at iteration 6/6" in resumed.stdout
    assert read_checkpoint(out / "last.pth")["training"]["iteration"] == 6


@pytest.mark.slow
def test_sigint_stops_cleanly_with_a_checkpoint(voc_root, tmp_path):
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "refinedet", "train", "--data", str(voc_root), "--iterations", "200",
           "--batch-size", "1", "--checkpoint-every", "1000", "--output", str(out), *TINY]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "metrics.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130
    done = read_checkpoint(out / "last.pth")["training"]["iteration"]
    assert 1 <= done < 200 and f"stopped at iteration {done}/200" in stdout
    assert f"refinedet train --resume {out / 'last.pth'}" in stdout

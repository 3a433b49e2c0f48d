"""``model.evaluation.predict``: folders and list files streamed, bad images as error rows, resumable output."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import load_model
from model.errors import UserError
from model.evaluation.predict import (
    ImagePredictor,
    PredictionLog,
    iter_inputs,
    predict_files,
    read_ahead,
)

RUN = {"model": "tiny", "score_threshold": 0.0}


@pytest.fixture
def tree(tmp_path) -> Path:
    """root/a.jpg, root/sub/b.png, root/sub/bad.jpg (not an image), root/notes.txt (not an image suffix)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(root / "a.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(root / "sub" / "b.png")
    (root / "sub" / "bad.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("hello")
    return root


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint) -> ImagePredictor:
    return ImagePredictor(load_model(tiny_checkpoint)[0], "cpu", score_threshold=0.0)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]


def test_inputs_from_folders_and_list_files(tree, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# images\nroot/a.jpg\n\n{tree / 'sub' / 'b.png'}\nroot/missing.jpg\n")
    got = list(iter_inputs([tree], [listing]))
    assert got == [
        str(tree / "a.jpg"), str(tree / "sub" / "b.png"), str(tree / "sub" / "bad.jpg"),
        str(tmp_path / "root" / "a.jpg"), str(tree / "sub" / "b.png"), str(tmp_path / "root" / "missing.jpg"),
    ]  # fmt: skip
    with pytest.raises(UserError, match="no such list file"):
        list(iter_inputs([], [tmp_path / "nope.txt"]))


def test_read_ahead_streams_an_endless_input():
    """Only a bounded window is read ahead: the first rows of an endless stream of paths come back."""
    endless = (f"/nonexistent/{i}.jpg" for i in itertools.count())
    first = list(itertools.islice(read_ahead(endless, threads=2, ahead=4), 3))
    assert first == [(f"/nonexistent/{i}.jpg", "file not found") for i in range(3)]


def test_bad_image_is_an_error_row_and_the_run_goes_on(tree, tmp_path, predictor):
    out = tmp_path / "out"
    log = PredictionLog(out, RUN, overwrite=False, retry_errors=False)
    counts = predict_files(predictor, iter_inputs([tree]), log, batch_size=2)
    log.close()
    rows = rows_of(out)
    assert counts == {"images": 3, "errors": 1, "skipped": 0}
    assert [Path(r["file"]).name for r in rows] == ["a.jpg", "b.png", "bad.jpg"]
    assert "not a readable image" in rows[2]["error"] and "detections" not in rows[2]
    assert rows[0]["detections"] and (rows[1]["width"], rows[1]["height"]) == (40, 50)


def test_resume_skips_finished_images_and_cuts_a_torn_line(tree, tmp_path, predictor):
    out = tmp_path / "out"
    log = PredictionLog(out, RUN, overwrite=False, retry_errors=False)
    predict_files(predictor, iter_inputs([tree]), log, batch_size=1)
    log.close()
    complete = (out / "detections.jsonl").read_text()
    lines = complete.splitlines(keepends=True)
    # A crash while the third row was being written: two rows and half of the third on disk.
    (out / "detections.jsonl").write_text("".join(lines[:2]) + lines[2][:10])
    log = PredictionLog(out, RUN, overwrite=False, retry_errors=False)
    assert log.done == {str(tree / "a.jpg"), str(tree / "sub" / "b.png")}
    counts = predict_files(predictor, iter_inputs([tree]), log, batch_size=2)
    log.close()
    assert counts == {"images": 1, "errors": 1, "skipped": 2}
    assert (out / "detections.jsonl").read_text() == complete  # the same rows as one uninterrupted run

    log = PredictionLog(out, RUN, overwrite=False, retry_errors=True)  # the error row's image runs again
    assert predict_files(predictor, iter_inputs([tree]), log)["images"] == 1
    log.close()
    with pytest.raises(UserError, match="other settings"):
        PredictionLog(out, {**RUN, "score_threshold": 0.5}, overwrite=False, retry_errors=False)


def test_a_failing_batch_fails_only_its_culprit(tree, predictor, monkeypatch):
    """When the network fails on a batch, each image is retried alone: only the one at fault errs."""
    real = predictor.detector.__call__

    def fussy(images, *args, **kwargs):
        if any(im.shape[-1] == 40 for im in images):  # b.png is 40 wide
            raise RuntimeError("out of memory")
        return real(images, *args, **kwargs)

    monkeypatch.setattr(predictor, "detector", type("D", (), {"__call__": staticmethod(fussy)})())
    pixels = [(str(tree / "a.jpg"), torch.zeros(3, 60, 90, dtype=torch.uint8)),
              (str(tree / "sub" / "b.png"), torch.zeros(3, 50, 40, dtype=torch.uint8))]  # fmt: skip
    rows = predictor.rows(pixels)
    assert "detections" in rows[0] and rows[1]["error"].startswith("detection failed (RuntimeError")

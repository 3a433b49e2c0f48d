"""Detection on image files at any scale (``refinedet predict``): streamed, resumable, one JSONL row per image.

Inputs are image files, folders (walked recursively, in sorted order, lazily) and list files (one path per
line; relative paths are relative to the list file). Nothing holds all of them: paths stream through a
bounded read-ahead of decoding threads into batches of the network.

Each image gets one row in ``<output>/detections.jsonl``::

    {"file": "...", "width": W, "height": H, "detections": [{"label", "class_id", "score", "box": {x1,y1,x2,y2}}]}
    {"file": "...", "error": "not a readable image (...)"}

``class_id`` is the 0-based index into the model's ``class_names`` (as ``/detect`` and the OIP ``labels``);
boxes are in the original image's pixels. A bad image is an error row, never the end of the run.

Rows are appended and flushed to disk batch by batch, so the file is its own checkpoint: a rerun with the
same output skips every file that already has a row (``retry_errors`` re-runs the error rows; the later row
of a file wins), and a torn last line from a crash is cut off. ``<output>/run.json`` records the model
and options; a rerun with other ones (``*_path`` keys aside: the model's sha256 is what counts) is refused
rather than mixing two runs in one file.
The Ray Data job (``scaleout.data_job``) writes the same rows through ``ImagePredictor``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import Tensor, nn

from model.drawing import draw_detections
from model.errors import UserError
from model.preprocess import load_image

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
ROWS_FILE, RUN_FILE = "detections.jsonl", "run.json"
Loaded = tuple[str, Tensor | str]  # (file, uint8 RGB [3, H, W] or why it could not be read)


def iter_inputs(sources: Iterable[str | Path], lists: Iterable[str | Path] = ()) -> Iterator[str]:
    """Absolute image paths from files and folders (recursive, sorted, image suffixes only) and list files,
    lazily (a file's path is its key in the output, so the same file resumes whatever the working directory).
    A source that does not exist is a ``UserError`` when reached; a listed path that does not exist is
    passed on (it becomes an error row)."""
    for source in sources:
        path = Path(source).absolute()
        if path.is_dir():
            yield from _walk(path)
        elif path.is_file():
            yield str(path)
        else:
            raise UserError(f"{path}: no such image file or folder")
    for list_file in lists:
        yield from _read_list(Path(list_file))


def _walk(folder: Path) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield os.path.join(root, name)


def _read_list(list_file: Path) -> Iterator[str]:
    if not list_file.is_file():
        raise UserError(f"{list_file}: no such list file")
    with list_file.open(encoding="utf-8") as lines:
        for line in lines:
            entry = line.strip()
            if entry and not entry.startswith("#"):
                yield entry if os.path.isabs(entry) else str(list_file.parent.absolute() / entry)


def read_image_file(file: str) -> Loaded:
    """(file, pixels) or (file, the reason it could not be read): never raises for a bad file."""
    try:
        return file, load_image(file)
    except FileNotFoundError:
        return file, "file not found"
    except Exception as exc:  # PIL raises many types for unreadable data
        return file, f"not a readable image ({type(exc).__name__}: {exc})"


def read_ahead(files: Iterable[str], threads: int, ahead: int) -> Iterator[Loaded]:
    """``read_image_file`` over ``files`` on ``threads`` threads, in order, at most ``ahead`` in flight."""
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="refinedet-read") as pool:
        pending: deque = deque()
        for file in files:
            pending.append(pool.submit(read_image_file, file))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class ImagePredictor:
    """A model (checkpoint or exported artifact) + the shared post-processing -> JSONL rows."""

    def __init__(self, model: nn.Module, device: torch.device | str, score_threshold: float) -> None:
        from model.evaluation.runner import NetworkDetector, network

        model.to(device).eval()
        self.device = torch.device(device)
        config = network(model).config
        self.detector = NetworkDetector(
            model, dataclasses.replace(config.postprocess, score_threshold=score_threshold)
        )
        self.config = self.detector.config

    def rows(self, batch: Sequence[Loaded]) -> list[dict[str, Any]]:
        """One row per (file, pixels | error), in order. If the batch fails, each image is retried alone,
        so only the image at fault gets an error row."""
        good = [(i, pixels) for i, (_, pixels) in enumerate(batch) if isinstance(pixels, Tensor)]
        rows: list[dict[str, Any]] = [{"file": f, "error": p} if isinstance(p, str) else {} for f, p in batch]
        try:
            found = self._detect([pixels for _, pixels in good])
        except Exception:
            found = [self._detect_one(pixels) for _, pixels in good]
        for (i, pixels), detections in zip(good, found, strict=True):
            file = batch[i][0]
            if isinstance(detections, str):
                rows[i] = {"file": file, "error": detections}
            else:
                height, width = pixels.shape[-2:]
                rows[i] = {"file": file, "width": int(width), "height": int(height), "detections": detections}
        return rows

    def _detect(self, images: list[Tensor]) -> list[list[dict[str, Any]] | str]:
        if not images:
            return []
        found = self.detector([im.to(self.device, non_blocking=True) for im in images])
        return [detection_records(det, self.config.class_names) for det in found]

    def _detect_one(self, image: Tensor) -> list[dict[str, Any]] | str:
        try:
            return self._detect([image])[0]
        except Exception as exc:
            return f"detection failed ({type(exc).__name__}: {exc})"


def detection_records(det: dict[str, Tensor], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per-image detections (boxes [N, 4] px xyxy, scores, network labels 1..C-1) -> JSON-ready dicts with
    ``class_id`` the 0-based index into ``class_names``."""
    return [
        {
            "label": class_names[label - 1],
            "class_id": int(label) - 1,
            "score": round(float(score), 5),
            "box": dict(zip(("x1", "y1", "x2", "y2"), (round(v, 2) for v in box), strict=True)),
        }
        for box, score, label in zip(
            det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True
        )
    ]


class PredictionLog:
    """``<output>/detections.jsonl`` as an append-only checkpoint (see the module docstring)."""

    def __init__(self, output: str | Path, run: dict[str, Any], overwrite: bool, retry_errors: bool) -> None:
        self.output = Path(output)
        self.path = self.output / ROWS_FILE
        self.output.mkdir(parents=True, exist_ok=True)
        run_path = self.output / RUN_FILE
        if overwrite:
            self.path.unlink(missing_ok=True)
        elif run_path.is_file() and self.path.is_file():
            before = json.loads(run_path.read_text())
            changed = sorted(
                k
                for k in run.keys() | before.keys()
                if run.get(k) != before.get(k) and not k.endswith("_path")
            )
            if changed:
                raise UserError(
                    f"{self.output} holds a run with other settings ({', '.join(changed)}); "
                    "use --overwrite to start over or another --output"
                )
        run_path.write_text(json.dumps(run, indent=2) + "\n")
        self.done = self._finished(retry_errors)
        self._file = self.path.open("a", encoding="utf-8")

    def _finished(self, retry_errors: bool) -> set[str]:
        if not self.path.is_file():
            return set()
        done = set()
        with self.path.open("rb+") as f:
            good_end = 0
            for line in f:
                if not line.endswith(b"\n"):
                    break  # torn by a crash: cut off below
                good_end += len(line)
                row = json.loads(line)
                if retry_errors and "error" in row:
                    done.discard(row["file"])
                else:
                    done.add(row["file"])
            f.truncate(good_end)
        return done

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        self._file.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def batched(items: Iterable[Loaded], size: int) -> Iterator[list[Loaded]]:
    batch: list[Loaded] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_files(
    predictor: ImagePredictor,
    files: Iterable[str],
    log: PredictionLog,
    batch_size: int = 8,
    threads: int = 2,
    annotate: Path | None = None,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, int]:
    """Detect on every file not already in ``log``; returns counts: images (this run), errors, skipped."""
    counts = {"images": 0, "errors": 0, "skipped": 0}

    def todo() -> Iterator[str]:
        for file in files:
            if file in log.done:
                counts["skipped"] += 1
            else:
                yield file

    for batch in batched(read_ahead(todo(), threads, ahead=2 * batch_size + threads), batch_size):
        rows = predictor.rows(batch)
        if annotate is not None:
            save_annotated(batch, rows, annotate)
        log.write(rows)
        counts["images"] += len(rows)
        counts["errors"] += sum("error" in r for r in rows)
        if on_batch:
            on_batch(rows)
    return counts


def save_annotated(batch: Sequence[Loaded], rows: Sequence[dict[str, Any]], folder: Path) -> None:
    """``<stem>_<8 hex of the path>_pred.jpg`` per image read (a stable name, unique across folders)."""
    from model.checkpoint import atomic_write

    for (file, pixels), row in zip(batch, rows, strict=True):
        if isinstance(pixels, Tensor) and "detections" in row:
            name = f"{Path(file).stem}_{hashlib.sha1(file.encode()).hexdigest()[:8]}_pred.jpg"
            canvas = draw_detections(pixels, row["detections"])
            atomic_write(folder / name, partial(_save_jpeg, canvas))
            row["annotated"] = name


def _save_jpeg(canvas: Image.Image, f: BinaryIO) -> None:
    canvas.save(f, format="JPEG", quality=92)

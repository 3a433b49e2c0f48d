"""``refinedet predict`` on Ray Data, for archives that need many machines.

The driver streams the inputs (folders, list files), leaves out those already in ``<output>/detections.jsonl``
and writes the rest to a list file that Ray Data reads in blocks (``read_text``), so no process holds every
path. ``map_batches`` runs ``PredictActor`` in an actor pool: each actor builds, once, the engine plan that
``deploy.prepare`` decides on its node (the same decision as ``refinedet predict`` and ``refinedet serve``
there: on a CPU the fastest verified engine from the node's cache, on a GPU a TensorRT engine), reads its
batch's images and returns the same rows as ``refinedet predict``
(``model.evaluation.predict.ImagePredictor``). The driver appends the rows to the same JSONL checkpoint as
the local command, so a crashed job (driver or workers) resumes where it stopped, and either command can
finish the other's run. Actors that die are restarted and their batches retried by Ray.

Images are read by path on the workers: the paths must be visible to every node (a shared or mounted
file system).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from model.evaluation.predict import PredictionLog


class PredictActor:
    """One model per actor: a batch of paths -> JSONL rows (as strings)."""

    def __init__(
        self, model: str | None, device: str, score_threshold: float, batch_size: int, threads: int | None
    ) -> None:
        from deploy.prepare import plan_for_files
        from model.evaluation.predict import ImagePredictor
        from model.runtime.plan import build_network

        plan = plan_for_files(model, device, batch_size, threads)  # on this actor's node
        self.predictor = ImagePredictor(build_network(plan), plan.device, score_threshold)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        from model.evaluation.predict import read_image_file

        rows = self.predictor.rows([read_image_file(str(f)) for f in batch["text"]])
        return {"row": [json.dumps(r, separators=(",", ":")) for r in rows]}


def pending_list(files: Iterable[str], done: set[str], folder: Path) -> tuple[Path, int, int]:
    """Write the paths not in ``done`` to a list file in ``folder``; (its path, pending, skipped)."""
    pending = skipped = 0
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".pending-", suffix=".txt", delete=False) as out:
        for file in files:
            if file in done:
                skipped += 1
            else:
                out.write(file.replace("\n", " ") + "\n")
                pending += 1
    return Path(out.name), pending, skipped


def run_job(
    files: Iterable[str],
    log: PredictionLog,
    model: str | None,
    score_threshold: float,
    actors: int,
    batch_size: int,
    gpus_per_actor: float,
    on_rows: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Detect on every file not yet in ``log`` with ``actors`` Ray actors; returns counts as
    ``predict_files`` (images this run, errors, skipped). Ray must be initialised."""
    import ray

    listing, pending, skipped = pending_list(files, log.done, log.output)
    counts = {"images": 0, "errors": 0, "skipped": skipped}
    try:
        if pending == 0:
            return counts
        device = "cuda" if gpus_per_actor > 0 else "cpu"
        dataset = ray.data.read_text(str(listing)).map_batches(
            PredictActor,
            fn_constructor_kwargs={
                "model": model,
                "device": device,
                "score_threshold": score_threshold,
                "batch_size": batch_size,
                "threads": None if gpus_per_actor > 0 else 1,  # one CPU per actor (num_cpus=1)
            },
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus_per_actor,
            num_cpus=1,
            max_restarts=-1,
            max_task_retries=-1,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            rows = [json.loads(r) for r in batch["row"]]
            log.write(rows)
            counts["images"] += len(rows)
            counts["errors"] += sum("error" in r for r in rows)
            if on_rows:
                on_rows(len(rows))
    finally:
        listing.unlink(missing_ok=True)
    return counts

"""The RefineDet trainer: one class wiring data, model, loss, optimizer, schedule, checkpoints and logs.

A run writes into its output folder: ``last.pth`` (every ``checkpoint_every`` iterations and at the
end; resumable), ``best.pth`` (the best validation mAP, weights only), ``options.json``, ``metrics.csv``
/ ``eval.csv`` (and TensorBoard events if installed). Batches arrive as uint8 and are normalised on the
device; on CUDA the forward runs under bf16 autocast. SIGINT/SIGTERM stop the run after the current
step with a checkpoint (a second SIGINT aborts at once). Under torchrun every process trains its shard
(DistributedDataParallel) and rank 0 writes the files.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from model.checkpoint import atomic_write, save_checkpoint, unwrap
from model.config import RefineDetConfig
from model.errors import UserError
from model.loss import RefineDetLoss
from model.network import build_model
from model.preprocess import normalize
from model.training import build
from model.training.control import StopSignals, deterministic_kernels, seed_everything
from model.training.distributed import (
    DistContext,
    any_rank,
    barrier,
    broadcast_object,
    init_distributed,
    mean_over_ranks,
)
from model.training.metrics import MetricsLogger
from model.training.options import PAPER_ITERATIONS, TrainOptions
from model.training.schedule import build_scheduler, default_steps
from model.training.state import read_training_state, save_training_checkpoint, set_rng_state

LOSS_TERMS = ("loss", "arm_loc", "arm_conf", "odm_loc", "odm_conf")
STOP_SYNC_EVERY = 10  # iterations between the ranks' agreement on a stop request


@dataclass(frozen=True)
class TrainResult:
    output: Path
    checkpoint: Path  # last.pth
    iteration: int
    iterations: int
    interrupted: bool
    best: dict[str, Any] | None
    seconds: float


def loss_line(row: dict[str, Any], iterations: int) -> str:
    """A logged training row for the console: iteration, losses, learning rate, throughput."""
    return (
        f"iteration {row['iteration']}/{iterations}  loss {row['loss']:.4f}  "
        f"arm {row['arm_loc']:.3f}/{row['arm_conf']:.3f}  odm {row['odm_loc']:.3f}/{row['odm_conf']:.3f}  "
        f"lr {row['lr']:.3g}  {row['images_per_s']:.3g} img/s"
    )


class Trainer:
    """``Trainer(options, resume=None, overrides=None).run() -> TrainResult``.

    ``resume``: a ``last.pth`` to continue; its stored options are used, with ``overrides`` (the
    options the user set explicitly) allowed only for runtime fields (see ``TrainOptions.resumed``).
    """

    def __init__(
        self,
        options: TrainOptions | None,
        resume: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.ckpt = read_training_state(resume) if resume else None
        if self.ckpt is not None:
            options = TrainOptions.from_dict(self.ckpt["training"]["options"]).resumed(overrides or {})
        if options is None:
            raise ValueError("Trainer needs options or a checkpoint to resume")
        self.options = options
        self.resume_path = Path(resume) if resume else None
        self.stop = StopSignals()
        self.logger: MetricsLogger | None = None

    # --- setup -------------------------------------------------------------------------------------

    def _setup(self) -> None:
        """Device and process group, data and config, model and optimizer, loader and logs."""
        o = self.options
        kind = build.resolve_device(o.device)
        self.ctx: DistContext = init_distributed(kind)
        self.device = build.resolve_device(o.device, self.ctx.local_rank) if kind.type == "cuda" else kind
        seed_everything(o.seed)
        if self.device.type == "cuda" and not o.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels
        stored = RefineDetConfig.from_dict(self.ckpt["config"]) if self.ckpt else None
        self.dataset = build.open_train_set(o, stored.class_names if stored else None)
        self.config = stored or build.build_config(o, tuple(self.dataset.class_names))
        self.output = Path(broadcast_object(self.ctx, str(self._output_dir()) if self.ctx.is_main else None))
        self.global_batch = o.batch_size
        per_epoch = math.ceil(len(self.dataset) / self.global_batch)
        self.iterations = o.iterations or (o.epochs * per_epoch if o.epochs else PAPER_ITERATIONS)
        self.lr_steps = o.lr_steps or default_steps(self.iterations)
        self._setup_model()
        self.val_set = (
            build.open_val_set(o, self.config.class_names) if o.val_split and self.ctx.is_main else None
        )
        self.loader, self.sampler = build.build_loader(
            self.dataset, self.config, o, self.ctx, self.start, self.device
        )
        if self.ctx.is_main:
            self.output.mkdir(parents=True, exist_ok=True)  # only now: a failed setup leaves no empty run
            self._setup_logs()

    def _setup_model(self) -> None:
        """Model (pretrained backbone or resumed weights), loss, optimizer, schedule; DDP wrapper."""
        o = self.options
        model = build_model(self.config)
        self.pretrained_report = None if self.ckpt else build.load_pretrained(model, o.pretrained)
        model.to(self.device)
        if o.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model: torch.nn.Module = model
        self.criterion = RefineDetLoss(self.config).to(self.device)
        self.optimizer = build.build_optimizer(model, o)
        self.scheduler = build_scheduler(self.optimizer, self.lr_steps, o.warmup)
        self.start = 0
        self.best: dict[str, Any] | None = None
        if self.ckpt:
            self._restore(self.ckpt)
        self.ckpt = None  # free the host copy of the weights
        if self.ctx.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def _setup_logs(self) -> None:
        self.logger = MetricsLogger(self.output, self.start if self.resume_path else None)
        if not self.resume_path:
            text = json.dumps(self.options.to_dict(), indent=2)

            def write(f: BinaryIO) -> None:
                f.write(text.encode())

            atomic_write(self.output / "options.json", write)

    def _restore(self, ckpt: dict[str, Any]) -> None:
        training = ckpt["training"]
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        self.start, self.best = int(training["iteration"]), training.get("best")
        if self.start >= self.iterations:
            raise UserError(
                f"{self.resume_path} is already at iteration {self.start} of {self.iterations}: nothing to do"
            )
        set_rng_state(training["rng"])

    def _output_dir(self) -> Path:
        o = self.options
        if o.output:
            out = Path(o.output)
        elif self.resume_path:
            out = self.resume_path.parent
        else:
            out = Path("runs") / f"{self.config.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        if not self.resume_path and (out / "last.pth").exists():
            raise UserError(
                f"{out} already holds a run (last.pth): resume it with --resume {out / 'last.pth'} or pick another --output"
            )
        return out

    def describe(self) -> list[str]:
        """What this run is, for the console (after setup)."""
        o, c = self.options, self.config
        init = (
            "resumed"
            if self.resume_path
            else (o.pretrained if o.pretrained != "none" else "random (no --pretrained)")
        )
        lines = [
            f"data      {getattr(self.dataset, 'name', '')}: {len(self.dataset)} images, classes {', '.join(c.class_names)}",
            f"model     {c.name} input {c.input_size}, normalization {c.normalization.channel_order} mean {c.normalization.mean}, backbone init {init}",
            f"schedule  {self.iterations} iterations from {self.start}, global batch {self.global_batch} over {self.ctx.world_size} process(es), "
            f"lr {o.lr} x0.1 at {list(self.lr_steps)}, warm-up {o.warmup}, augmentation {'on' if o.augment else 'off'}",
            f"run       device {self.device}, {o.workers} loader workers, output {self.output}",
        ]
        if self.pretrained_report:
            lines += [
                f"weights   loaded {self.pretrained_report.get('loaded')} tensors; {note}"
                for note in self.pretrained_report.get("notes", [])
            ] or [f"weights   loaded {self.pretrained_report.get('loaded')} tensors from {o.pretrained}"]
        return lines

    # --- the loop ----------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        started = self._t0 = time.perf_counter()
        with deterministic_kernels(self.options.deterministic):
            self._setup()
            if self.ctx.is_main:
                print("\n".join(self.describe()), flush=True)
            with self.stop:
                iteration = self._loop()
        barrier(self.ctx)
        return TrainResult(
            self.output,
            self.output / "last.pth",
            iteration,
            self.iterations,
            iteration < self.iterations,
            self.best,
            time.perf_counter() - started,
        )

    def _loop(self) -> int:
        from tqdm import tqdm

        o, it = self.options, self.start
        bar = tqdm(total=self.iterations, initial=it, desc="train", unit="it", dynamic_ncols=True,
                   disable=not (self.ctx.is_main and o.progress))  # fmt: skip
        sums, window = torch.zeros(len(LOSS_TERMS), device=self.device), (it, time.perf_counter())
        batches: Iterator = iter(self.loader)
        self.model.train()
        try:
            while it < self.iterations:
                batch = next(batches)
                sums += self.step(batch.images, batch.targets(self.device))
                it += 1
                bar.update(1)
                if it % o.log_every == 0 or it == self.iterations:
                    window = self._log(it, sums, window, bar)
                    sums.zero_()
                if o.val_split:
                    self._maybe_evaluate(it)
                stop = self._stop_now(it)
                if it % o.checkpoint_every == 0 or it == self.iterations or stop:
                    self._save(it)
                if stop:
                    break
        finally:
            bar.close()
            if self.logger is not None:
                self.logger.close()
        return it

    def step(self, images: Tensor, targets: list[dict[str, Any]]) -> Tensor:
        """One optimizer step on a batch; returns the loss terms Tensor[5] (detached, on the device)."""
        dev = self.device
        x = normalize(images.to(dev, non_blocking=True).float(), self.config.normalization)
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        targets = [
            {"boxes": t["boxes"].to(dev, non_blocking=True), "labels": t["labels"].to(dev, non_blocking=True)}
            for t in targets
        ]
        amp = dev.type == "cuda" and self.options.amp
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            outputs = self.model(x)
        losses = self.criterion(outputs, unwrap(self.model).anchors, targets)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.options.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.options.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        return torch.stack([losses[k].detach() for k in LOSS_TERMS])

    def _log(self, it: int, sums: Tensor, window: tuple[int, float], bar: Any) -> tuple[int, float]:
        first, since = window
        values = mean_over_ranks(self.ctx, sums / max(1, it - first)).tolist()
        now = time.perf_counter()
        if not math.isfinite(values[0]):
            raise UserError(
                f"the loss became {values[0]} by iteration {it}: lower --lr, or add --warmup / --clip-grad"
            )
        row = {
            "iteration": it,
            "epoch": round(it / self.sampler.iterations_per_epoch, 3),
            "lr": float(f"{self.scheduler.get_last_lr()[0]:.6g}"),
        }
        row.update({k: round(v, 5) for k, v in zip(LOSS_TERMS, values, strict=True)})
        row["images_per_s"] = round((it - first) * self.global_batch / max(now - since, 1e-9), 2)
        row["time_s"] = round(now - self._t0, 3)
        if self.logger is not None:
            self.logger.log_train(row)
            if bar.disable:  # --no-progress: one console line per logged step instead of the bar
                print(loss_line(row, self.iterations), flush=True)
            bar.set_postfix(loss=f"{values[0]:.3f}", arm=f"{values[1]:.2f}/{values[2]:.2f}",
                            odm=f"{values[3]:.2f}/{values[4]:.2f}", lr=f"{row['lr']:.2g}",
                            img_s=f"{row['images_per_s']:.3g}")  # fmt: skip
        return it, now

    # --- evaluation and checkpoints ----------------------------------------------------------------

    def _maybe_evaluate(self, it: int) -> None:
        every = self.options.eval_every
        if not ((every and it % every == 0) or it == self.iterations):
            return
        if self.ctx.is_main:
            from model.evaluation import evaluate_voc

            batch = self.options.eval_batch_size
            result = evaluate_voc(unwrap(self.model), self.val_set, device=self.device, batch_size=batch)
            score = float(result["mAP"])
            if self.best is None or score > self.best["mAP"]:
                self.best = {"mAP": score, "iteration": it}
                save_checkpoint(self.output / "best.pth", unwrap(self.model), self._metadata(it))
            assert self.logger is not None
            self.logger.log_eval(
                {"iteration": it, "mAP": round(score, 5), "best_mAP": round(self.best["mAP"], 5)}
            )
        self.best = broadcast_object(self.ctx, self.best)
        barrier(self.ctx)

    def _save(self, it: int) -> None:
        if self.ctx.is_main:
            save_training_checkpoint(
                self.output / "last.pth",
                unwrap(self.model),
                self.optimizer,
                self.scheduler,
                it,
                self.options.to_dict(),
                self._metadata(it),
                self.best,
            )

    def _metadata(self, it: int) -> dict[str, Any]:
        o = self.options
        return {
            "trained_by": "refinedet train",
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "iteration": it,
            "iterations": self.iterations,
            "dataset": getattr(self.dataset, "name", ""),
            "num_images": len(self.dataset),
            "images_seen": it * self.global_batch,
            "augmentation": "ssd" if o.augment else "none",
            "normalization": build.config_summary(self.config)["normalization"],
            "pretrained": o.pretrained,
            "best_val": self.best,
            "world_size": self.ctx.world_size,
            "torch": str(torch.__version__),
        }

    # --- stopping ----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Finish the current step, write a checkpoint and return (what SIGINT/SIGTERM do)."""
        self.stop.request()

    def _stop_now(self, it: int) -> bool:
        if not self.ctx.distributed:
            return self.stop.requested
        if it % STOP_SYNC_EVERY:
            return False
        return any_rank(self.ctx, self.stop.requested, self.device)


def train(
    options: TrainOptions | None, resume: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainResult:
    return Trainer(options, resume, overrides).run()

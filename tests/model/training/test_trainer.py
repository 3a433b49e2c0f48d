import csv
import warnings
from pathlib import Path

import pytest
import torch

import model.evaluation
from model.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from model.errors import UserError
from model.training.trainer import Trainer, train


def crash_at(monkeypatch, step_number: int) -> None:
    """Make the ``step_number``-th optimizer step die like a killed process (no checkpoint)."""
    original, calls = Trainer.step, {"n": 0}

    def step(self, images, targets):
        calls["n"] += 1
        if calls["n"] == step_number:
            raise RuntimeError("killed")
        return original(self, images, targets)

    monkeypatch.setattr(Trainer, "step", step)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_short_run_writes_a_loadable_checkpoint(make_options):
    result = train(make_options(iterations=2, batch_size=2, checkpoint_every=1))
    assert result.iteration == 2 and not result.interrupted and result.checkpoint.name == "last.pth"
    net, ckpt = load_model(result.checkpoint)
    assert net.config.input_size == 64 and net.config.class_names == ("cat", "dog")
    assert net.config.normalization.channel_order == "BGR"  # the input contract travels with the weights
    assert ckpt["metadata"]["iteration"] == 2 and ckpt["metadata"]["augmentation"] == "ssd"
    training = ckpt["training"]
    assert training["iteration"] == 2 and training["options"]["input_size"] == 64
    assert training["scheduler"]["last_epoch"] == 2 and training["optimizer"]["state"]
    log = rows(result.output / "metrics.csv")
    assert [int(r["iteration"]) for r in log] == [1, 2]
    assert all(float(r["loss"]) > 0 and float(r["images_per_s"]) > 0 for r in log)
    # 2 iterations: x0.1 at 1 and at 2 (2/3 and 5/6 of the run, rounded); the row shows the next lr
    assert [float(r["lr"]) for r in log] == pytest.approx([1e-4, 1e-5])


def test_resume_after_a_crash_reaches_the_same_weights(make_options, monkeypatch):
    reference = train(make_options("straight", iterations=3, checkpoint_every=100, deterministic=True))
    options = make_options("crashed", iterations=3, checkpoint_every=1, deterministic=True)
    crash_at(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed"):
        train(options)
    assert read_checkpoint(options.output + "/last.pth")["training"]["iteration"] == 1
    monkeypatch.undo()
    resumed = train(None, resume=options.output + "/last.pth")
    assert not torch.are_deterministic_algorithms_enabled()  # the run restores the global switches
    assert resumed.iteration == 3 and resumed.output == reference.output.parent / "crashed"
    a, b = read_checkpoint(reference.checkpoint), read_checkpoint(resumed.checkpoint)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    momentum_a = [s["momentum_buffer"] for s in a["training"]["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["training"]["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b, strict=True))
    assert [int(r["iteration"]) for r in rows(resumed.output / "metrics.csv")] == [1, 2, 3]


def test_stop_request_checkpoints_the_current_iteration(make_options, monkeypatch):
    original = Trainer.step

    def step(self, images, targets):
        self.request_stop()  # what SIGINT / SIGTERM do
        return original(self, images, targets)

    monkeypatch.setattr(Trainer, "step", step)
    result = train(make_options(iterations=3, checkpoint_every=100))
    assert result.interrupted and result.iteration == 1
    assert read_checkpoint(result.checkpoint)["training"]["iteration"] == 1


def test_interrupted_checkpoint_write_keeps_the_previous_file(make_options, monkeypatch):
    options = make_options(iterations=2, checkpoint_every=1)
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"partial checkpoint bytes")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="disk full"):
        train(options)
    run = options.output
    assert read_checkpoint(run + "/last.pth")["training"]["iteration"] == 1
    load_model(run + "/last.pth")
    assert sorted(p.name for p in Path(run).iterdir() if p.name.endswith(".tmp")) == []


def test_periodic_evaluation_keeps_the_best_checkpoint(make_options, monkeypatch):
    scores = iter([0.4, 0.2])
    calls = []

    def fake_evaluate_voc(model, dataset, device="cpu", batch_size=8, **kwargs):
        calls.append((len(dataset), batch_size, tuple(dataset.class_names)))
        return {"mAP": next(scores)}

    monkeypatch.setattr(model.evaluation, "evaluate_voc", fake_evaluate_voc, raising=False)
    result = train(make_options(iterations=2, val_split="val", eval_every=1, eval_batch_size=3))
    assert calls == [(2, 3, ("cat", "dog"))] * 2
    assert result.best == {"mAP": 0.4, "iteration": 1}
    best = read_checkpoint(result.output / "best.pth")
    assert best["metadata"]["iteration"] == 1 and "training" not in best
    assert read_checkpoint(result.checkpoint)["training"]["best"] == {"mAP": 0.4, "iteration": 1}
    eval_rows = [(r["iteration"], r["mAP"], r["best_mAP"]) for r in rows(result.output / "eval.csv")]
    assert eval_rows == [("1", "0.4", "0.4"), ("2", "0.2", "0.4")]


def test_resume_refuses_a_changed_run_but_takes_runtime_options(make_options):
    result = train(make_options(iterations=1))
    with pytest.raises(UserError, match=r"--batch-size 4 \(checkpoint: 1\)"):
        Trainer(None, resume=result.checkpoint, overrides={"batch_size": 4})
    trainer = Trainer(None, resume=result.checkpoint, overrides={"workers": 0, "log_every": 5})
    assert trainer.options.log_every == 5
    with pytest.raises(UserError, match="already at iteration 1 of 1"):
        trainer.run()


def test_resume_needs_a_training_checkpoint(make_options, tmp_path):
    result = train(make_options(iterations=1))
    net, _ = load_model(result.checkpoint)
    save_checkpoint(tmp_path / "weights.pth", net)
    with pytest.raises(CheckpointError, match="no training state"):
        Trainer(None, resume=tmp_path / "weights.pth")
    with pytest.raises(UserError, match="already holds a run"):
        train(make_options(iterations=1))


def test_a_previous_run_can_seed_the_backbone(make_options):
    first = train(make_options("first", iterations=1))
    torch.load(first.checkpoint, weights_only=True)  # training checkpoints hold tensors and plain values only
    trainer = Trainer(make_options("second", iterations=1, pretrained=str(first.checkpoint)))
    result = trainer.run()
    assert trainer.pretrained_report["loaded"] > 0 and not trainer.pretrained_report["missing"]
    assert read_checkpoint(result.checkpoint)["metadata"]["pretrained"] == str(first.checkpoint)


def test_ablation_and_no_augment_reach_the_config(make_options):
    result = train(
        make_options(iterations=1, ablation=("tcb", "cascade"), augment=False, normalization="torchvision")
    )
    net, ckpt = load_model(result.checkpoint)
    assert (
        not net.config.ablation.tcb
        and not net.config.ablation.cascade
        and net.config.ablation.negative_filtering
    )
    assert net.config.normalization.channel_order == "RGB" and ckpt["metadata"]["augmentation"] == "none"


def test_user_errors_for_bad_options(make_options):
    with pytest.raises(UserError, match="either --data"):
        make_options(coco_ann="x.json", coco_images="imgs")
    with pytest.raises(UserError, match="--eval-every needs --val-split"):
        make_options(eval_every=5)
    with pytest.raises(UserError, match="must divide evenly"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from model.training import build
        from model.training.distributed import DistContext

        options = make_options(batch_size=3)
        dataset = build.open_train_set(options)
        config = build.build_config(options, dataset.class_names)
        build.build_loader(dataset, config, options, DistContext(0, 2, 0), 0, torch.device("cpu"))


@pytest.mark.gpu
def test_cuda_bf16_run_writes_a_checkpoint(make_options):
    result = train(make_options(device="cuda", iterations=3, batch_size=2, channels_last=True, workers=2))
    net, ckpt = load_model(result.checkpoint)
    assert net.config.input_size == 64 and ckpt["training"]["iteration"] == 3
    log = rows(result.output / "metrics.csv")
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in log)
    assert all(v.device.type == "cpu" for v in ckpt["state_dict"].values())

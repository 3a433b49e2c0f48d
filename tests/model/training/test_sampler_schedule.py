import itertools

import pytest
import torch

from model.training.sampler import AugmentedSamples, TrainBatchSampler, pack_batch
from model.training.schedule import MultiStepWarmup, build_scheduler, default_steps


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_resumed_sampler_repeats_the_uninterrupted_stream():
    full = take(TrainBatchSampler(10, 3, seed=5), 12)
    assert take(TrainBatchSampler(10, 3, seed=5, start_iteration=7), 5) == full[7:]
    assert take(TrainBatchSampler(10, 3, seed=6), 12) != full


def test_every_epoch_covers_the_data_and_reshuffles():
    sampler = TrainBatchSampler(10, 3, seed=0)
    assert sampler.iterations_per_epoch == 4  # 12 slots: 10 samples + 2 repeated to pad the last batch
    batches = take(sampler, 8)
    epoch0 = [i for b in batches[:4] for i, _ in b]
    epoch1 = [i for b in batches[4:] for i, _ in b]
    assert set(epoch0) == set(range(10)) == set(epoch1) and epoch0 != epoch1
    seeds = [s for b in batches for _, s in b]
    assert len(set(seeds)) == len(seeds)  # every sample draw has its own augmentation seed


def test_ranks_split_each_global_batch():
    ranks = [take(TrainBatchSampler(9, 2, seed=1, rank=r, world_size=3), 6) for r in range(3)]
    single = take(TrainBatchSampler(9, 6, seed=1), 6)
    for it in range(6):
        assert ranks[0][it] + ranks[1][it] + ranks[2][it] == single[it]


def test_augmented_samples_depend_only_on_the_key():
    class Fake:
        def __len__(self):
            return 3

        def sample(self, index, transform, generator):
            return transform(index, generator)

    samples = AugmentedSamples(Fake(), lambda i, g: (i, torch.rand(3, generator=g)))
    a, b = samples[(2, 99)], samples[(2, 99)]
    assert a[0] == 2 and torch.equal(a[1], b[1]) and not torch.equal(a[1], samples[(2, 98)][1])


def test_paper_schedule_scales_with_the_run():
    assert default_steps(120_000) == (80_000, 100_000)
    assert default_steps(12_000) == (8_000, 10_000)
    f = MultiStepWarmup([4, 6])
    assert [f(i) for i in (0, 3, 4, 5, 6, 9)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    warm = MultiStepWarmup([100], warmup=4)
    assert [warm(i) for i in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_scheduler_state_round_trips():
    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return opt, build_scheduler(opt, [3, 5], warmup=2)

    opt, sched = make()
    lrs = []
    for _ in range(6):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    opt2, sched2 = make()
    opt3, sched3 = make()
    for _ in range(3):
        opt3.step()
        sched3.step()
    opt2.load_state_dict(opt3.state_dict())
    sched2.load_state_dict(sched3.state_dict())
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[3])


def test_packed_batch_round_trips_the_targets():
    batch = [
        (
            torch.zeros(3, 4, 4, dtype=torch.uint8),
            {"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.5]]), "labels": torch.tensor([2])},
        ),
        (
            torch.ones(3, 4, 4, dtype=torch.uint8),
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        ),
        (
            torch.ones(3, 4, 4, dtype=torch.uint8),
            {"boxes": torch.rand(3, 4), "labels": torch.tensor([1, 1, 3])},
        ),
    ]
    packed = pack_batch(batch)
    assert packed.images.shape == (3, 3, 4, 4) and packed.counts == [1, 0, 3]
    targets = packed.targets(torch.device("cpu"))
    for (_, original), target in zip(batch, targets, strict=True):
        assert torch.equal(original["boxes"], target["boxes"]) and torch.equal(
            original["labels"], target["labels"]
        )

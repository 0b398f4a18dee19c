"""The zoo's batch samplers: batch shape, no duplicates, disjoint DDP shards, equal batch counts, reshuffling, and
resuming an epoch from a saved loader state."""

import warnings

import pytest
import torch

from datamodules.sampler import BalancedClassSampler, ShardedRandomBatchSampler

UNEVEN = torch.tensor([0] * 5 + [1] * 4 + [2] * 9 + [3] * 4 + [4] * 2 + [5] * 7 + [6] * 12 + [7] * 6)


def _epochs(sampler, epochs=4):
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_every_batch_is_p_classes_by_k_distinct_images():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = BalancedClassSampler(UNEVEN, classes_per_batch=3, images_per_class=4)
    for batches in _epochs(sampler):
        assert len(batches) == len(sampler) == (len(UNEVEN) - 2) // 12  # class 4 (2 images) is left out
        for batch in batches:
            assert len(batch) == 12 and len(set(batch)) == 12
            labels = UNEVEN[batch].view(3, 4)
            assert (labels == labels[:, :1]).all() and len(set(labels[:, 0].tolist())) == 3
            assert 4 not in labels.tolist()


def test_small_classes_are_left_out_with_a_warning_and_too_few_classes_is_an_error():
    with pytest.warns(UserWarning, match="1 of 8 classes have fewer than 4"):
        BalancedClassSampler(UNEVEN, 2, 4)
    with pytest.raises(ValueError, match="needs 8 classes"):
        BalancedClassSampler(torch.arange(6).repeat_interleave(4), 4, 4, rank=0, world_size=2)


def test_ranks_get_disjoint_classes_and_the_same_number_of_batches():
    labels = torch.arange(10).repeat_interleave(torch.tensor([4, 5, 6, 7, 8, 9, 10, 11, 12, 13]))
    ranks = [BalancedClassSampler(labels, 2, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(labels) // 12
    for epoch in range(3):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        batches = [list(s) for s in ranks]
        assert len(batches[0]) == len(batches[1])
        for b0, b1 in zip(*batches):
            assert not set(labels[b0].tolist()) & set(labels[b1].tolist())


def test_one_pass_uses_each_image_once_and_epochs_reshuffle():
    labels = torch.arange(6).repeat_interleave(8)  # 48 images, 2 classes × 4 per batch → 6 batches = one pass
    sampler = BalancedClassSampler(labels, 2, 4, seed=1)
    first, second = _epochs(sampler, 2)
    flat = [i for b in first for i in b]
    # classes are drawn at random, so a class can come up a third time (and start a new pass) before another's
    # second time; but within a pass a class never repeats an image
    per_class = {c: [i for i in flat if labels[i] == c] for c in range(6)}
    for images in per_class.values():
        for start in range(0, len(images), 8):
            chunk = images[start : start + 8]
            assert len(set(chunk)) == len(chunk)
    assert first != second
    sampler.set_epoch(0)
    assert list(sampler) == first  # same (seed, epoch) → same batches


def test_a_class_of_exactly_k_images_wraps_with_a_new_shuffle():
    labels = torch.tensor([0] * 4 + [1] * 4)
    sampler = BalancedClassSampler(labels, 1, 4, seed=3)
    sampler.set_epoch(0)
    batches = list(sampler)
    assert len(batches) == 2 and all(sorted(b) in ([0, 1, 2, 3], [4, 5, 6, 7]) for b in batches)


def test_lightning_reaches_every_batch_sampler_so_epochs_differ():
    # Lightning calls set_epoch on loader.sampler / loader.batch_sampler.sampler only; EpochBatchSampler routes it.
    import lightning as L
    from torch.utils.data import DataLoader

    from datamodules.fewshot import EpisodicBatchSampler
    from datamodules.sampler import BalancedClassSampler, ClassBalancedBatchSampler

    labels = torch.arange(40) % 4
    samplers = [BalancedClassSampler(labels, 2, 2, seed=0), ClassBalancedBatchSampler(labels, 8, seed=0),
                EpisodicBatchSampler(labels, 2, 1, 1, episodes=5, seed=0), ShardedRandomBatchSampler(40, 8, 5, seed=0)]
    for sampler in samplers:
        seen: list[list[int]] = []

        class Record(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.layer = torch.nn.Linear(1, 1)

            def training_step(self, batch, batch_idx):
                if batch_idx == 0:
                    seen.append(batch.tolist())
                return self.layer(batch.float()[:, None]).sum()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), 0.0)

        loader = DataLoader(list(range(40)), batch_sampler=sampler)
        L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu").fit(Record(), loader)
        assert sampler.epoch == 2, type(sampler).__name__
        assert seen[0] != seen[1] and seen[1] != seen[2], type(sampler).__name__


def test_sharded_sampler_ranks_are_disjoint_per_step_and_cover_a_pass_once():
    ranks = [ShardedRandomBatchSampler(24, 3, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    batches = [list(s) for s in ranks]
    assert [len(s) for s in ranks] == [4, 4] and all(len(b) == 3 for bs in batches for b in bs)
    for step in range(4):
        assert not set(batches[0][step]) & set(batches[1][step])
    assert sorted(i for bs in batches for b in bs for i in b) == list(range(24))  # 2 × 4 × 3 = one pass
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != batches[0]
    ranks[0].set_epoch(0)
    assert list(ranks[0]) == batches[0] == list(ShardedRandomBatchSampler(24, 3, 4, seed=5, rank=0, world_size=2))
    assert list(ShardedRandomBatchSampler(24, 3, 4, seed=6, rank=0, world_size=2)) != batches[0]


def test_sharded_sampler_cycles_a_small_set_in_fresh_passes_without_repeats_in_a_batch():
    # The digits' labeled stream: 50 images, batches of 16, 11 steps = 176 indices ≈ 3.5 passes.
    sampler = ShardedRandomBatchSampler(50, 16, 11, seed=0)
    batches = list(sampler)
    assert len(batches) == 11 and all(len(set(b)) == 16 for b in batches)  # straddling steps hold no repeats
    stream = [i for b in batches for i in b]
    passes = [stream[50 * p : 50 * p + 50] for p in range(3)]
    assert all(sorted(p) == list(range(50)) for p in passes) and passes[0] != passes[1]
    # two ranks: every step of 2 × 16 holds 32 distinct images, still one use per image per pass
    ranks = [list(ShardedRandomBatchSampler(50, 16, 11, seed=0, rank=r, world_size=2)) for r in range(2)]
    steps = [ranks[0][s] + ranks[1][s] for s in range(11)]
    assert all(len(set(s)) == 32 for s in steps)
    stream = [i for s in steps for i in s]
    assert all(sorted(stream[50 * p : 50 * p + 50]) == list(range(50)) for p in range(7))
    # fewer items than a step: repeats are unavoidable, the shape is still exact
    tiny = list(ShardedRandomBatchSampler(3, 4, 5, seed=0))
    assert len(tiny) == 5 and all(len(b) == 4 and set(b) <= {0, 1, 2} for b in tiny)


# ---------------------------------------------------------------- resuming an epoch through the stateful loader


def _samplers():
    from datamodules.detection import AspectRatioBatchSampler
    from datamodules.fewshot import EpisodicBatchSampler
    from datamodules.sampler import ClassBalancedBatchSampler, RandomBatchSampler

    labels = torch.arange(40) % 5
    return {
        "random": lambda: RandomBatchSampler(40, 6),
        "random-seeded": lambda: RandomBatchSampler(40, 6, seed=3, rank=1, world_size=2),
        "sharded": lambda: ShardedRandomBatchSampler(40, 6, num_batches=7, seed=1),
        "balanced": lambda: BalancedClassSampler(labels, classes_per_batch=2, images_per_class=3),
        "class-balanced": lambda: ClassBalancedBatchSampler(labels, batch_size=5),
        "aspect-ratio": lambda: AspectRatioBatchSampler(torch.linspace(0.5, 1.5, 40), batch_size=4),
        "episodes": lambda: EpisodicBatchSampler(labels, n_way=3, k_shot=1, n_query=2, episodes=8),
    }


@pytest.mark.parametrize("name", list(_samplers()))
def test_a_loader_restored_from_its_state_serves_the_rest_of_the_epoch(name):
    from datamodules.base import ResumableDataLoader

    make = _samplers()[name]
    dataset = torch.utils.data.TensorDataset(torch.arange(40))

    def loader(sampler):
        return ResumableDataLoader(dataset, batch_sampler=sampler)

    torch.manual_seed(0)
    straight = loader(make())
    straight.batch_sampler.set_epoch(2)
    epoch = [batch[0].tolist() for batch in straight]
    interrupted = loader(make())
    torch.manual_seed(0)
    interrupted.batch_sampler.set_epoch(2)
    served = iter(interrupted)
    first = [next(served)[0].tolist() for _ in range(3)]
    state = interrupted.state_dict()
    assert first == epoch[:3] and state["epoch"] == 2 and state["batches_served"] == 3

    torch.manual_seed(123)  # the resumed run's global generator is elsewhere: the state must not depend on it
    resumed = loader(make())
    resumed.load_state_dict(state)
    resumed.batch_sampler.set_epoch(2)  # Lightning sets the epoch it resumes in
    assert [batch[0].tolist() for batch in resumed] == epoch[3:]
    assert resumed.resumes_mid_epoch and resumed.state_dict()["batches_served"] == len(epoch)
    finished = loader(make())
    finished.load_state_dict(resumed.state_dict())  # a complete epoch resumes at the next one
    assert not finished.resumes_mid_epoch and finished.batch_sampler.epoch == 3

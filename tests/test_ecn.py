"""ECN: exemplar memory, neighbourhood targets, the loss schedule, frozen stages, DDP memory agreement."""

import pytest
import torch
import torch.nn.functional as F

from zoo.backbones import ConvNet, TimmBackbone
from zoo.reid.ecn import ECN, ExemplarMemory, invariance_loss, neighbourhood_targets


def small_ecn(**kwargs) -> ECN:
    kwargs.setdefault("num_target_images", 10)
    return ECN(backbone=ConvNet(3, widths=[8, 16]), num_classes=4, embedding_dim=12, **kwargs)


def test_memory_update_formula_untouched_rows_and_unit_norm():
    memory = ExemplarMemory(6, 4)
    memory.slots.copy_(F.normalize(torch.randn(6, 4)))
    before = memory.slots.clone()
    x = torch.randn(2, 4)
    memory.update(x, torch.tensor([1, 4]), alpha=0.3)
    expected = F.normalize(0.3 * before[[1, 4]] + 0.7 * x)
    torch.testing.assert_close(memory.slots[[1, 4]], expected)
    torch.testing.assert_close(memory.slots[[0, 2, 3, 5]], before[[0, 2, 3, 5]])
    torch.testing.assert_close(memory.slots[[1, 4]].norm(dim=1), torch.ones(2))
    # α = 0 (epoch 0) copies the normalised feature, whatever the slot held.
    memory.update(x, torch.tensor([1, 4]), alpha=0.0)
    torch.testing.assert_close(memory.slots[[1, 4]], F.normalize(x))


def test_memory_update_averages_a_repeated_index():
    memory = ExemplarMemory(3, 2)
    memory.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([2, 2]), alpha=0.0)
    torch.testing.assert_close(memory.slots[2], F.normalize(torch.tensor([0.5, 0.5]), dim=0))


def test_neighbourhood_targets_match_the_official_smooth_hot():
    similarity = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3, 2], [9.0, 8, 7, 6, 5, 4, 3, 2]])
    targets = neighbourhood_targets(similarity, torch.tensor([2, 7]), k=6)
    # Own slot (2) inside the top 6: 6 non-zeros, own weight 1, sum 1 + 5/6.
    assert (targets[0] > 0).sum() == 6 and targets[0, 2] == 1 and targets[0].sum().item() == pytest.approx(1 + 5 / 6)
    assert torch.allclose(targets[0, [0, 1, 3, 4, 5]], torch.full((5,), 1 / 6))
    # Own slot (7) outside: 7 non-zeros, sum 2.
    assert (targets[1] > 0).sum() == 7 and targets[1, 7] == 1 and targets[1].sum().item() == pytest.approx(2.0)


def test_invariance_loss_is_cross_entropy_without_neighbours_and_weighted_with():
    logits = torch.randn(3, 8)
    index = torch.tensor([0, 5, 7])
    assert invariance_loss(logits, index, k=0).item() == pytest.approx(F.cross_entropy(logits, index).item())
    w = neighbourhood_targets(logits, index, 3)
    expected = -(w * logits.log_softmax(1)).sum(1).mean()
    assert invariance_loss(logits, index, k=3).item() == pytest.approx(expected.item())


def test_temperature_scales_own_slot_logit_to_twenty():
    model = small_ecn(dropout=0.0)
    f = F.normalize(torch.randn(1, 12))
    model.memory.slots[3] = f[0]
    assert (model.memory(f)[0, 3] / model.hparams.temperature).item() == pytest.approx(20.0, rel=1e-5)


def _batch(model, n_src=6, n_tgt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"source": (torch.randn(n_src, 3, 16, 8, generator=g), torch.randint(0, 4, (n_src,), generator=g)),
            "target": (torch.randn(n_tgt, 3, 16, 8, generator=g), torch.randperm(10, generator=g)[:n_tgt])}


class _FakeTrainer:
    """What ECN's training hooks read from a Trainer."""

    def __init__(self, epoch: int = 0, world_size: int = 1) -> None:
        self.current_epoch, self.world_size = epoch, world_size


def test_gradient_uses_memory_before_update_and_update_follows():
    torch.manual_seed(0)
    model = small_ecn(dropout=0.0, target_weight=1.0)
    model.memory.slots.copy_(F.normalize(torch.randn(10, 12)))
    old = model.memory.slots.clone()
    batch = _batch(model)
    model.train()
    model._trainer = _FakeTrainer()  # only world_size is read by the update hook
    model.log = lambda *args, **kwargs: None
    loss = model.training_step(batch, 0)
    embedding, index = model._pending
    loss.backward()
    # The step's loss and gradient saw the old slots: nothing changed during forward and backward; the update
    # comes after, in on_after_backward.
    torch.testing.assert_close(model.memory.slots, old)
    assert model.head.feat.weight.grad.abs().sum() > 0
    model._trainer.current_epoch = 30
    model.on_after_backward()
    expected = F.normalize(0.3 * old[index] + 0.7 * embedding)
    torch.testing.assert_close(model.memory.slots[index], expected)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[index] = False
    torch.testing.assert_close(model.memory.slots[untouched], old[untouched])


def test_neighbourhood_loss_starts_at_epoch_five_and_alpha_follows_epoch():
    model = small_ecn(dropout=0.0, target_weight=1.0)
    model.memory.slots.copy_(F.normalize(torch.randn(10, 12)))
    model.log = lambda *args, **kwargs: None
    batch = _batch(model)
    losses = {}
    model.eval()  # deterministic features
    for epoch in (4, 5):
        model._trainer = _FakeTrainer(epoch)
        losses[epoch] = model.training_step(batch, 0).item()
        emb, idx = model._pending
        logits = model.memory(emb) / 0.05
        assert model.alpha == pytest.approx(0.01 * epoch)
    ce = F.cross_entropy(logits, idx).item()
    smooth = invariance_loss(logits, idx, 6).item()
    # target_weight 1.0: the loss is the target term alone.
    assert losses[4] == pytest.approx(ce, rel=1e-4)
    assert losses[5] == pytest.approx(smooth, rel=1e-4)
    assert smooth > ce  # the extra neighbour terms only add −log p terms


def test_frozen_stages_have_no_grad_and_keep_bn_statistics_and_lr_groups():
    backbone = TimmBackbone("resnet18")
    model = ECN(backbone=backbone, num_classes=3, num_target_images=8, embedding_dim=16,
                frozen_modules=["model.conv1", "model.bn1", "model.layer1", "model.layer2"])
    frozen = [p for n, p in model.backbone.named_parameters() if n.startswith(("model.conv1", "model.bn1", "model.layer1", "model.layer2"))]
    assert frozen and not any(p.requires_grad for p in frozen)
    model.train()
    stats = {n: b.clone() for n, b in model.backbone.named_buffers() if "running_mean" in n}
    model.backbone(torch.randn(4, 3, 64, 32))
    for name, before in stats.items():
        changed = not torch.equal(before, dict(model.backbone.named_buffers())[name])
        official_frozen = name.startswith(("model.bn1", "model.layer1", "model.layer2")) and "downsample" not in name
        # Frozen stages' "bn" modules keep their statistics; the downsample BN (official quirk) and later stages update.
        assert changed != official_frozen, name
    assert "model.layer2.0.downsample.1.running_mean" in stats
    model._trainer = type("T", (), {"estimated_stepping_batches": 10})()
    config = model.configure_optimizers()
    groups = {g["name"]: g for g in config["optimizer"].param_groups}
    assert groups["new_layers"]["lr"] == pytest.approx(0.1) and groups["backbone"]["lr"] == pytest.approx(0.01)
    assert config["optimizer"].defaults["nesterov"] is True
    assert not any(p is q for p in groups["backbone"]["params"] for q in frozen)
    scheduler = config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(41):
        lrs.append(config["optimizer"].param_groups[0]["lr"])
        config["optimizer"].step()
        scheduler.step()
    assert lrs[39] == pytest.approx(0.1) and lrs[40] == pytest.approx(0.01)


def test_bad_frozen_module_name_is_a_clear_error():
    with pytest.raises(ValueError, match="not submodules"):
        ECN(backbone=ConvNet(3, widths=[8]), num_classes=2, frozen_modules=["layer9"])


def _ddp_update(rank, world, init_file, embedding, indices, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = small_ecn()
    torch.manual_seed(123)
    model.memory.slots.copy_(F.normalize(torch.randn(10, 12)))
    share = len(indices) // world
    model._pending = (embedding[rank * share:(rank + 1) * share], indices[rank * share:(rank + 1) * share])
    model._trainer = _FakeTrainer(epoch=20, world_size=world)

    def all_gather(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    model.all_gather = all_gather
    model.on_after_backward()
    torch.save(model.memory.slots, f"{out}_{rank}.pt")
    dist.destroy_process_group()


def test_two_process_memory_update_equals_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    embedding, indices = F.normalize(torch.randn(8, 12)), torch.tensor([0, 3, 5, 9, 1, 2, 7, 8])
    mp.spawn(_ddp_update, args=(2, tmp_path / "init", embedding, indices, tmp_path / "slots"), nprocs=2)
    rank0, rank1 = torch.load(tmp_path / "slots_0.pt"), torch.load(tmp_path / "slots_1.pt")
    model = small_ecn()
    torch.manual_seed(123)
    model.memory.slots.copy_(F.normalize(torch.randn(10, 12)))
    model.memory.update(embedding, indices, alpha=0.2)
    torch.testing.assert_close(rank0, rank1)
    torch.testing.assert_close(rank0, model.memory.slots)


def _synthetic_args(tmp_path, *extra):
    from conftest import ROOT

    return ["-c", str(ROOT / "configs" / "reid" / "ecn_synthetic.yaml"),
            f"--data.init_args.root={tmp_path / 'people'}", "--data.init_args.batch_size=16",
            "--model.init_args.embedding_dim=32", f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.check_val_every_n_epoch=100", *extra]


def test_two_process_ddp_ranks_hold_the_same_memory_and_disjoint_target_batches(tmp_path):
    import json

    from conftest import run_zoo

    from datamodules.generated.reid_toypeople import write_synthetic_reid

    write_synthetic_reid(tmp_path / "people")  # once, before the two processes start
    out = tmp_path / "record"
    result = run_zoo("fit", *_synthetic_args(
        tmp_path, "--trainer.max_epochs=2", "--test_after_fit=false", "--trainer.strategy=ddp",
        "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.callbacks=[{class_path: helpers.RecordReIDRank, init_args: {out: " + str(out) + "}}]"), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"reid_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == 2 and len(ranks[0]["indices"]) == len(ranks[1]["indices"]) > 0
    for a, b in zip(ranks[0]["indices"], ranks[1]["indices"]):
        assert len(a) == len(b) == 16 and not set(a) & set(b)
    # The memory update all-gathers: both ranks hold bit-identical memories, covering both ranks' images.
    assert ranks[0]["memory_sum"] == ranks[1]["memory_sum"] and ranks[0]["memory_rows"] == ranks[1]["memory_rows"]
    seen = {i for rank in ranks for step in rank["indices"] for i in step}
    assert ranks[0]["touched"] == len(seen)


def test_resume_from_last_checkpoint_restores_the_memory_and_epoch(tmp_path):
    import json

    from conftest import run_zoo

    out = tmp_path / "record"
    callbacks = "--trainer.callbacks=[{class_path: helpers.RecordReIDRank, init_args: {out: " + str(out) + "}}]"
    first = run_zoo("fit", *_synthetic_args(tmp_path, "--trainer.max_epochs=2", "--test_after_fit=false", callbacks))
    assert first.returncode == 0, first.stderr[-3000:]
    saved = torch.load(tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    memory = saved["state_dict"]["memory.slots"]
    assert saved["epoch"] == 1 and (memory.norm(dim=1) > 0).any()
    resumed = run_zoo("fit", *_synthetic_args(tmp_path, "--trainer.max_epochs=3", "--test_after_fit=false", callbacks,
                                              f"--ckpt_path={tmp_path / 'run' / 'version_0' / 'checkpoints' / 'last.ckpt'}"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((out / "reid_rank0.json").read_text())
    assert record["start_epoch"] == 2
    assert record["start_sum"] == pytest.approx(float(memory.double().sum()), rel=1e-9)
    # Loading the checkpoint outside a Trainer sizes the memory from it.
    model = ECN.load_from_checkpoint(tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu",
                                     backbone=ConvNet(3, widths=[32, 64, 128, 256], num_pools=3))
    assert model.memory.slots.shape == memory.shape


def test_bf16_autocast_keeps_memory_logits_fp32_and_trains(tmp_path):
    from conftest import run_zoo

    result = run_zoo("fit", *_synthetic_args(tmp_path, "--trainer.max_epochs=1", "--trainer.precision=bf16-mixed",
                                             "--trainer.limit_train_batches=3", "--test_after_fit=false"))
    assert result.returncode == 0, result.stderr[-3000:]
    memory = ExemplarMemory(4, 3)
    memory.slots.copy_(F.normalize(torch.randn(4, 3)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = memory(torch.randn(2, 3).bfloat16())
    assert logits.dtype == torch.float32


@pytest.mark.slow  # 15-20 s; fine-tuning itself is covered by tests/test_finetune.py in the default suite
def test_finetune_from_an_ecn_checkpoint_skips_the_memory_and_a_new_classifier(tmp_path):
    from conftest import run_zoo

    first = run_zoo("fit", *_synthetic_args(tmp_path, "--trainer.max_epochs=1", "--test_after_fit=false",
                                            "--trainer.limit_train_batches=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    tuned = run_zoo("fit", *_synthetic_args(tmp_path / "ft", "--trainer.max_epochs=1", "--test_after_fit=false",
                                            "--trainer.limit_train_batches=2", f"--finetune.init_from={ckpt}",
                                            f"--data.init_args.root={tmp_path / 'people'}",
                                            "--data.init_args.direction=target2source"))
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    log = tuned.stdout + tuned.stderr
    assert "[finetune]" in log and "memory.slots" in log

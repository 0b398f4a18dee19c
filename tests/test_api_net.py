"""API-Net: pair mining, gates, the loss on hand-computed cases, the backbone freeze, evaluation at batch 1."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from zoo.backbones import ConvNet
from zoo.finegrained.api_net import APINet, PairInteraction, api_net_loss, mine_pairs


def test_mine_pairs_finds_nearest_same_and_other_class_and_never_itself():
    features = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [1.2, 0.1], [6.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    first, second = mine_pairs(features, labels)
    # image 5 is alone in its class: it has no intra pair; every image has an inter pair
    assert first.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]
    intra, inter = second[:5].tolist(), second[5:].tolist()
    assert intra == [1, 0, 1, 4, 3]
    assert inter == [3, 3, 4, 1, 2, 0]
    assert not (first == second).any()


def test_mine_pairs_with_a_single_class_forms_only_intra_pairs():
    first, second = mine_pairs(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    assert len(first) == 4 and not (first == second).any()


def test_zero_mutual_vector_gives_half_gates_and_self_equals_other():
    interaction = PairInteraction(dim=6, hidden=8, dropout=0.0)
    torch.nn.init.zeros_(interaction.map2.weight)
    torch.nn.init.zeros_(interaction.map2.bias)
    x1, x2 = torch.randn(3, 6), torch.randn(3, 6)
    out = interaction(x1, x2)
    assert torch.allclose(out.gate1, torch.full_like(x1, 0.5)) and torch.allclose(out.gate2, torch.full_like(x2, 0.5))
    for got, want in [(out.self1, x1), (out.other1, x1), (out.self2, x2), (out.other2, x2)]:
        assert torch.allclose(got, 1.5 * want)


def test_other_features_use_the_partners_gate():
    interaction = PairInteraction(dim=4, hidden=5, dropout=0.0)
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    out = interaction(x1, x2)
    mutual = interaction.map2(interaction.map1(torch.cat([x1, x2], 1)))
    g1, g2 = torch.sigmoid(mutual * x1), torch.sigmoid(mutual * x2)
    assert torch.allclose(out.self1, x1 + x1 * g1) and torch.allclose(out.other1, x1 + x1 * g2)
    assert torch.allclose(out.self2, x2 + x2 * g2) and torch.allclose(out.other2, x2 + x2 * g1)


def test_loss_matches_a_hand_computation():
    # two members, two classes; logits chosen so the probabilities are easy to write down
    logits_self = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # p = (0.75, 0.25), (0.5, 0.5)
    logits_other = torch.tensor([[0.0, 0.0], [0.0, math.log(4.0)]])  # p = (0.5, 0.5), (0.2, 0.8)
    targets = torch.tensor([0, 1])
    loss, ce, rank, margin = api_net_loss(logits_self, logits_other, targets, margin=0.05)
    want_ce = -(math.log(0.75) + math.log(0.5) + math.log(0.5) + math.log(0.8)) / 4
    # member 0: p_self 0.75, p_other 0.5 → max(0, 0.5 − 0.75 + 0.05) = 0; member 1: 0.5 vs 0.8 → 0.35
    want_rank = (0.0 + 0.35) / 2
    assert ce.item() == pytest.approx(want_ce, abs=1e-6)
    assert rank.item() == pytest.approx(want_rank, abs=1e-6)
    assert loss.item() == pytest.approx(want_ce + want_rank, abs=1e-6)
    assert margin.tolist() == pytest.approx([0.25, -0.3], abs=1e-6)


def test_cross_entropy_pairs_each_row_with_its_own_target_order():
    # Permuting the targets of the "other" half must change the loss: rows are [self1; self2; other1; other2]
    # against [y1; y2; y1; y2].
    torch.manual_seed(0)
    logits_self, logits_other = torch.randn(4, 5), torch.randn(4, 5)
    targets = torch.tensor([0, 1, 2, 3])
    _, ce, _, _ = api_net_loss(logits_self, logits_other, targets)
    want = F.cross_entropy(torch.cat([logits_self, logits_other]), torch.cat([targets, targets]))
    assert torch.allclose(ce, want)
    wrong = F.cross_entropy(torch.cat([logits_self, logits_other]), torch.cat([targets, targets.flip(0)]))
    assert not torch.allclose(ce, wrong)


def _model(freeze_epochs=0, num_classes=4):
    return APINet(backbone=ConvNet(in_chans=3, widths=(8, 16), num_pools=2), num_classes=num_classes, hidden=16,
                  dropout=0.0, lr=0.05, freeze_epochs=freeze_epochs)


def _balanced_batches(n_batches=6, classes=4, per_class=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    # each class is a different colour tint, so the task is learnable in a few steps
    images = torch.randn(n_batches, len(labels), 3, size, size, generator=g) * 0.5
    images[:, :, 0] += labels.float().view(1, -1, 1, 1) - 1.5
    return [(images[i], labels) for i in range(n_batches)]


def _loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None)  # already batched


def test_eval_runs_at_batch_size_one_and_other_image_sizes():
    model = _model().eval()
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 4)
    assert model(torch.randn(1, 3, 23, 31)).shape == (1, 4)


def test_frozen_backbone_is_not_updated_but_its_bn_statistics_are():
    L.seed_everything(0)
    model = _model(freeze_epochs=1)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    fc_before = model.fc.weight.clone()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, train_dataloaders=_loader(_balanced_batches()))
    after = model.backbone.state_dict()
    weights = [k for k in after if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    stats = [k for k in after if k.endswith("running_mean")]
    assert all(torch.equal(after[k], backbone_before[k]) for k in weights)
    assert any(not torch.equal(after[k], backbone_before[k]) for k in stats)
    assert not torch.equal(model.fc.weight, fc_before)
    frozen = {id(p) for p in model.backbone.parameters()}
    optimizer = trainer.optimizers[0]
    assert all(id(p) not in frozen for p in optimizer.state)  # never stepped: no momentum buffer either


def test_api_net_training_lowers_the_loss_and_separates_self_from_other():
    L.seed_everything(0)
    model = _model(freeze_epochs=0)
    batches = _balanced_batches(n_batches=8)
    with torch.no_grad():
        model.eval()
        start = model.pair_forward(*batches[0])["loss"].item()
    model.train()
    trainer = L.Trainer(max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, train_dataloaders=_loader(batches))
    with torch.no_grad():
        model.eval()
        end = model.pair_forward(*batches[0])
    assert end["loss"].item() < 0.5 * start
    assert end["p_self_minus_other"].mean().item() > 0
    assert trainer.global_step == 8 * 6  # one optimiser step per batch, the schedule's T_max
    assert trainer.lr_scheduler_configs[0].scheduler.T_max == 48


def test_configs_run_and_ddp_ranks_train_on_disjoint_classes(tmp_path):
    import json

    from conftest import ROOT, run_zoo

    data = ["--data.init_args.root=" + str(tmp_path / "birds"), "--data.init_args.train_per_class=4",
            "--data.init_args.test_per_class=1", "--data.init_args.classes_per_batch=3",
            "--data.init_args.images_per_class=2", "--trainer.max_epochs=2"]
    out = tmp_path / "labels"
    result = run_zoo(
        "fit", "-c", str(ROOT / "configs" / "finegrained" / "api_net_toybirds.yaml"), *data,
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.callbacks=[{class_path: helpers.RecordBatchLabels, init_args: {out: " + str(out) + "}}]",
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"labels_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == 2
    # 48 images / (3 classes × 2 images × 2 ranks) = 4 steps per epoch, on both ranks
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == 8
    for a, b in zip(ranks[0]["train"], ranks[1]["train"]):
        assert len(a) == len(b) == 6 and not set(a) & set(b)
    assert ranks[0]["train"] != ranks[1]["train"]


@pytest.mark.parametrize("config", ["api_net_toybirds", "baseline_toybirds", "api_net_cub", "baseline_cub"])
def test_every_config_runs_fast_dev_run_on_a_cub_format_tree(tmp_path, config):
    from conftest import ROOT, run_zoo

    from datamodules.generated.finegrained_toybirds import write_toy_birds

    root = tmp_path / "birds"
    write_toy_birds(root, train_per_class=4, test_per_class=2)
    args = ["fit", "-c", str(ROOT / "configs" / "finegrained" / f"{config}.yaml"), f"--data.init_args.root={root}",
            "--data.init_args.classes_per_batch=3", "--data.init_args.images_per_class=2",
            f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.fast_dev_run=2", "--test_after_fit=false",
            "--model.init_args.num_classes=12"]
    if config.endswith("_toybirds"):
        args += ["--data.init_args.train_per_class=4", "--data.init_args.test_per_class=2"]
    else:  # the paper's ResNet-101 at 448 px is too slow here: same code path, small sizes
        args += ["--model.init_args.backbone.init_args.name=resnet18", "--model.init_args.backbone.init_args.pretrained=false",
                 "--data.init_args.image_size=56", "--data.init_args.resize=64", "--data.init_args.num_workers=0",
                 "--data.init_args.pin_memory=false"]
    result = run_zoo(*args, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

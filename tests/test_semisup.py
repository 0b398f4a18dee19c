"""UDA, Entropy Minimization, Meta Pseudo Labels: losses on hand-computed cases, the MPL teacher's direction, steps."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from zoo.backbones import ConvNet, WideResNet
from zoo.semisup.base import SemiSupervisedClassifier, warmup_cosine
from zoo.semisup.entmin import EntropyMinimization
from zoo.semisup.losses import entropy, sharpened_consistency, tsa_cross_entropy, tsa_threshold
from zoo.semisup.meta_pseudo_labels import MetaPseudoLabels, mpl_coefficient
from zoo.semisup.uda import UDA


# ---------------------------------------------------------------- UDA losses


@pytest.mark.parametrize("schedule, expected", [
    ("linear", {0: 0.1, 250: 0.325, 500: 0.55, 1000: 1.0}),
    ("log", {0: 0.1, 250: 0.742146, 500: 0.926124, 1000: 0.993936}),
    ("exp", {0: 0.106064, 250: 0.121166, 500: 0.173876, 1000: 1.0}),
])
def test_tsa_threshold_matches_the_formula(schedule, expected):
    for step, value in expected.items():
        assert tsa_threshold(step / 1000, 10, schedule) == pytest.approx(value, abs=1e-6)
    assert tsa_threshold(0.0, 2, "linear") == pytest.approx(0.5)
    assert tsa_threshold(0.3, 10, "none") == 1.0
    with pytest.raises(ValueError, match="tsa schedule"):
        tsa_threshold(0.5, 10, "cosine")


def test_tsa_drops_examples_by_true_class_probability_and_averages_over_the_kept():
    # example 0: true class at 0.95 (dropped at η = 0.55); example 1: true class at 0.3 (kept);
    # example 2: 0.9 on a wrong class, 0.05 on the true one: kept, although its *max* probability is high.
    probs = torch.tensor([[0.95, 0.05, 0.0], [0.3, 0.7, 0.0], [0.9, 0.05, 0.05]]).clamp_min(1e-6)
    logits, labels = probs.log(), torch.tensor([0, 0, 1])
    loss, kept = tsa_cross_entropy(logits, labels, threshold=0.55)
    assert kept.tolist() == [False, True, True]
    per_example = F.cross_entropy(logits, labels, reduction="none")
    assert loss.item() == pytest.approx((per_example[1] + per_example[2]).item() / 2, rel=1e-6)
    loss, kept = tsa_cross_entropy(logits[:1], labels[:1], threshold=0.55)
    assert not kept.any() and loss.item() == 0.0 and torch.isfinite(loss)


def test_sharpening_matches_a_hand_computation():
    target = (torch.tensor([2.0, 1.0, 0.0]) / 0.4).softmax(-1)
    assert target.tolist() == pytest.approx([0.9184, 0.0754, 0.0062], abs=1e-4)
    # the loss is KL(target || q): zero when the strong view predicts the sharpened target exactly
    loss, mask = sharpened_consistency(torch.tensor([[2.0, 1.0, 0.0]]) * 5, target.log()[None], temperature=0.4,
                                       threshold=0.5)
    assert mask.item() and loss.item() == pytest.approx(
        float((F.softmax(torch.tensor([25.0, 12.5, 0.0]), -1) * (F.log_softmax(torch.tensor([25.0, 12.5, 0.0]), -1)
               - target.log())).sum()), abs=1e-5)


def test_consistency_masks_low_confidence_divides_by_the_full_batch_and_stops_weak_gradients():
    weak = torch.tensor([[math.log(0.95 / 0.05), 0.0], [0.0, 0.0]], requires_grad=True)  # max p: 0.95, 0.5
    strong = torch.tensor([[0.0, 1.0], [2.0, 0.0]], requires_grad=True)
    loss, mask = sharpened_consistency(weak, strong, temperature=1.0, threshold=0.8)
    assert mask.tolist() == [True, False]
    p = torch.tensor([0.95, 0.05])
    kl_0 = (p * (p.log() - F.log_softmax(strong[0].detach(), -1))).sum()
    assert loss.item() == pytest.approx(kl_0.item() / 2, rel=1e-5)
    loss.backward()
    assert weak.grad is None or torch.count_nonzero(weak.grad) == 0  # the target side is stop-gradient
    assert torch.count_nonzero(strong.grad[1]) == 0 and torch.count_nonzero(strong.grad[0]) == 2


def test_identical_views_give_zero_consistency_without_sharpening():
    logits = torch.randn(6, 5) * 4
    loss, _ = sharpened_consistency(logits, logits.clone(), temperature=1.0, threshold=0.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_the_confidence_mask_is_on_the_unsharpened_probability_for_uda():
    logits = torch.tensor([[math.log(0.7 / 0.3), 0.0]])  # p_max 0.7; sharpened with τ = 0.4 it is ≈ 0.89
    _, mask = sharpened_consistency(logits, logits, temperature=0.4, threshold=0.8)
    assert not mask.item()
    _, mask = sharpened_consistency(logits, logits, temperature=0.4, threshold=0.8, mask_on_sharpened=True)
    assert mask.item()  # Meta Pseudo Labels' variant


def test_kl_and_soft_cross_entropy_have_equal_gradients_and_differ_by_the_target_entropy():
    weak, strong = torch.randn(4, 6), torch.randn(4, 6, requires_grad=True)
    kl, _ = sharpened_consistency(weak, strong, temperature=0.5, threshold=0.0)
    (grad_kl,) = torch.autograd.grad(kl, strong)
    target = (weak / 0.5).softmax(-1)
    ce = -(target * strong.log_softmax(-1)).sum(-1).mean()
    (grad_ce,) = torch.autograd.grad(ce, strong)
    assert torch.allclose(grad_kl, grad_ce, atol=1e-6)
    target_entropy = -(target * target.log()).sum(-1).mean()
    assert (ce - kl).item() == pytest.approx(target_entropy.item(), abs=1e-5)


# ---------------------------------------------------------------- entropy minimisation


def test_entropy_and_its_gradient_match_a_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], requires_grad=True)
    value = entropy(logits).mean()
    assert value.item() == pytest.approx((math.log(2) + 0.562335) / 2, abs=1e-6)
    value.backward()
    p = logits.detach().softmax(-1)
    h = -(p * p.log()).sum(-1, keepdim=True)
    assert torch.allclose(logits.grad, -p * (p.log() + h) / 2, atol=1e-6)
    assert torch.count_nonzero(logits.grad[1]) == 2  # a detached-target "entropy" would give zero here


def test_mpl_soft_label_trap_has_zero_gradient():
    z = torch.randn(3, 5, requires_grad=True)
    trap = -(z.softmax(-1).detach() * z.log_softmax(-1)).sum(-1).mean()
    (grad,) = torch.autograd.grad(trap, z)
    assert grad.abs().max() < 1e-7  # hence hard pseudo labels in the MPL term


# ---------------------------------------------------------------- modules in a trainer


class _TwoViews(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        return (x, x.flip(-1)), self.labels[i]


class _SemiSupData(L.LightningDataModule):
    """A fixed tiny semi-supervised batch stream in the datamodule's format."""

    num_classes = 3

    def __init__(self, labeled, unlabeled, batch_size=4, mu=2, image_shape=(1, 8, 8)) -> None:
        super().__init__()
        self.labeled, self.unlabeled, self.batch_size, self.mu = labeled, unlabeled, batch_size, mu

    def train_dataloader(self):
        from lightning.pytorch.utilities.combined_loader import CombinedLoader

        labeled = DataLoader(list(zip(*self.labeled)), batch_size=self.batch_size, drop_last=True)
        unlabeled = DataLoader(_TwoViews(*self.unlabeled), batch_size=self.batch_size * self.mu, drop_last=True)
        return CombinedLoader({"labeled": labeled, "unlabeled": unlabeled}, mode="max_size_cycle")

    def val_dataloader(self):
        return DataLoader(list(zip(*self.labeled)), batch_size=self.batch_size)


def _random_data(n_labeled=8, n_unlabeled=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(n_labeled, 1, 8, 8, generator=g), torch.randint(0, 3, (n_labeled,), generator=g)),
            (torch.rand(n_unlabeled, 1, 8, 8, generator=g), torch.randint(0, 3, (n_unlabeled,), generator=g)))


def _trainer(**kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _small_backbone() -> nn.Module:
    return ConvNet(in_chans=1, widths=[8, 16], num_pools=2)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, cycles=7 / 16) == pytest.approx(math.cos(7 * math.pi / 16))
    assert warmup_cosine(100, 100, cycles=0.5) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("cls", [SemiSupervisedClassifier, EntropyMinimization, UDA])
def test_single_network_methods_train_and_log_their_diagnostics(cls):
    L.seed_everything(0)
    labeled, unlabeled = _random_data()
    model = cls(backbone=_small_backbone(), num_classes=3, lr=0.1)
    logged = {}

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = _trainer(max_steps=8, callbacks=[Capture()])
    trainer.fit(model, datamodule=_SemiSupData(labeled, unlabeled))
    assert trainer.global_step == 8
    assert math.isfinite(logged["train/loss"])
    if cls is SemiSupervisedClassifier:
        assert "train/unsup_loss" not in logged
    else:
        assert 0.0 <= logged["train/pseudo_label_acc"] <= 1.0
    if cls is UDA:
        assert {"train/mask_rate", "train/tsa_threshold", "train/sup_kept_ratio"} <= logged.keys()
    if cls is EntropyMinimization:  # λ ramps linearly over the first 20 % of the 8 steps
        assert logged["train/unsup_weight"] == pytest.approx(1.0)


def test_uda_rejects_an_unknown_tsa_schedule():
    with pytest.raises(ValueError, match="tsa schedule"):
        UDA(backbone=_small_backbone(), num_classes=3, tsa="cosine")


class _Constant(nn.Module):
    """Features that ignore the image: the teacher's logits become free parameters (weight + bias)."""

    out_channels = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x[:, :1, :1, :1])


class _Pixel(nn.Module):
    """The image's single pixel as the feature: the student is a 1-D logistic regression."""

    out_channels = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, :1, :1]


def _teacher_probability_after_one_step(pseudo_label: int, student_lr: float, sign: str = "theory") -> float:
    """Labeled x = +1 with y = 1; unlabeled x = +1. The teacher's initial logits make ``pseudo_label`` its argmax."""
    model = MetaPseudoLabels(backbone=_Constant(), num_classes=2, student_backbone=_Pixel(), teacher_lr=1.0,
                             student_lr=student_lr, momentum=0.0, nesterov=False, weight_decay=0.0,
                             label_smoothing=0.0, uda_weight=0.0, mpl_sign=sign)
    with torch.no_grad():
        for net in (model.teacher, model.student):
            net.head.fc.weight.zero_()
            net.head.fc.bias.zero_()
        model.teacher.head.fc.bias[pseudo_label] = 0.5
    ones = torch.ones(1, 1, 1, 1)
    data = _SemiSupData((ones, torch.tensor([1])), (ones, torch.tensor([1])), batch_size=1, mu=1)
    data.num_classes = 2
    _trainer(max_steps=2).fit(model, datamodule=data)
    assert int(model.mpl_step) == 1
    with torch.no_grad():
        return model.teacher(ones).softmax(-1)[0, pseudo_label].item()


def test_mpl_teacher_moves_toward_a_pseudo_label_that_helps_the_student_and_away_from_one_that_hurts():
    # Against the same step with a frozen student (h = 0), the MPL term alone decides the difference.
    helpful_with, helpful_without = (_teacher_probability_after_one_step(1, lr) for lr in (1.0, 0.0))
    harmful_with, harmful_without = (_teacher_probability_after_one_step(0, lr) for lr in (1.0, 0.0))
    assert helpful_with > helpful_without + 1e-3
    assert harmful_with < harmful_without - 1e-3
    # The released code's sign does the opposite on the same problem (kekmodel/MPL-pytorch#6).
    assert _teacher_probability_after_one_step(1, 1.0, "official") < helpful_without - 1e-3


def test_mpl_coefficient_sign():
    before, after = torch.tensor(1.0), torch.tensor(0.7)
    assert mpl_coefficient(before, after, "theory").item() == pytest.approx(0.3)
    assert mpl_coefficient(before, after, "official").item() == pytest.approx(-0.3)
    with pytest.raises(ValueError, match="mpl_sign"):
        mpl_coefficient(before, after, "cosine")


class _RecordH(L.Callback):
    def __init__(self) -> None:
        self.h: list[float] = []

    def on_train_batch_end(self, trainer, *args):
        self.h.append(float(trainer.callback_metrics["train/mpl_h"]))


def test_mpl_h_is_zero_when_the_student_does_not_move_even_with_batch_norm():
    # The labeled loss before and after the step is measured in the same batch-norm mode; taking "before" from the
    # joint forward pass (labeled + unlabeled statistics), as the PyTorch port does, would give h ≠ 0 here.
    L.seed_everything(0)
    labeled, unlabeled = _random_data()
    model = MetaPseudoLabels(backbone=_small_backbone(), num_classes=3, student_lr=0.0, weight_decay=0.0)
    record = _RecordH()
    _trainer(max_steps=6, callbacks=[record]).fit(model, datamodule=_SemiSupData(labeled, unlabeled))
    assert len(record.h) == 3 and max(abs(h) for h in record.h) < 1e-6


def test_mpl_counts_two_optimizer_steps_per_batch_and_ramps_with_its_own_counter():
    L.seed_everything(0)
    labeled, unlabeled = _random_data()
    model = MetaPseudoLabels(backbone=_small_backbone(), num_classes=3, uda_steps=10)
    logged = []

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            logged.append(float(trainer.callback_metrics["train/uda_weight"]))

    trainer = _trainer(max_steps=8, callbacks=[Capture()])
    trainer.fit(model, datamodule=_SemiSupData(labeled, unlabeled))
    assert trainer.global_step == 8 and int(model.mpl_step) == 4
    assert logged == pytest.approx([8 * k / 10 for k in (1, 2, 3, 4)])
    # both schedules advanced once per batch: half cosine over the 4 batches
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * warmup_cosine(4, 4, 0, 0.5), abs=1e-9)


def test_mpl_student_waits_with_zero_learning_rate():
    L.seed_everything(0)
    labeled, unlabeled = _random_data()
    model = MetaPseudoLabels(backbone=_small_backbone(), num_classes=3, student_wait_steps=3)
    student = [p.detach().clone() for p in model.student.parameters()]
    teacher = [p.detach().clone() for p in model.teacher.parameters()]
    _trainer(max_steps=6).fit(model, datamodule=_SemiSupData(labeled, unlabeled))
    assert all(torch.equal(a, b) for a, b in zip(student, model.student.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(teacher, model.teacher.parameters()))


def test_mpl_resume_restores_teacher_student_optimizers_ema_and_counter(tmp_path):
    L.seed_everything(0)
    labeled, unlabeled = _random_data()
    data = _SemiSupData(labeled, unlabeled)
    model = MetaPseudoLabels(backbone=_small_backbone(), num_classes=3, baseline_decay=0.99)
    trainer = _trainer(max_steps=8)
    trainer.fit(model, datamodule=data)
    ckpt = tmp_path / "mpl.ckpt"
    trainer.save_checkpoint(ckpt)

    L.seed_everything(1)
    fresh = MetaPseudoLabels(backbone=_small_backbone(), num_classes=3, baseline_decay=0.99)
    resumed = _trainer(max_steps=8)
    resumed.fit(fresh, datamodule=data, ckpt_path=ckpt)  # max_steps already reached: restores, trains nothing
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name
    assert int(fresh.mpl_step) == 4 and fresh.moving_h.item() != 0.0
    for a, b in zip(trainer.optimizers, resumed.optimizers):
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)


def test_mpl_evaluates_the_student_ema():
    model = MetaPseudoLabels(backbone=_small_backbone(), num_classes=3)
    x = torch.rand(2, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), model.student_ema(x))
    assert not any(p.requires_grad for p in model.student_ema.parameters())  # DDP must not wait for its gradients


def test_wide_resnet_28_2_has_the_benchmark_size_and_shape():
    net = WideResNet(depth=28, widen_factor=2)
    params = sum(p.numel() for p in net.parameters()) + 128 * 10 + 10
    assert 1.4e6 < params < 1.55e6  # "1.5 M parameters" in FixMatch / USB tables
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 128, 8, 8)
    with pytest.raises(ValueError, match="6n"):
        WideResNet(depth=27)


@pytest.mark.parametrize("config, strategy", [("mpl_digits", "ddp_find_unused_parameters_true"), ("uda_digits", "ddp")])
def test_two_process_ddp_keeps_ranks_identical_on_disjoint_data(tmp_path, config, strategy):
    import json

    from conftest import ROOT, run_zoo

    out = tmp_path / "record"
    result = run_zoo(
        "fit", "-c", str(ROOT / "configs" / "semisup" / f"{config}.yaml"), "--trainer.max_steps=6",
        f"--trainer.strategy={strategy}", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.use_distributed_sampler=false", f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--test_after_fit=false",
        "--data.init_args.batch_size=4", "--trainer.val_check_interval=3",
        "--trainer.callbacks+={class_path: helpers.RecordSemiSupRank, init_args: {out: " + str(out) + "}}",
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"semisup_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == 2 and len(ranks[0]["images"]) == len(ranks[1]["images"]) > 0
    for a, b in zip(ranks[0]["images"], ranks[1]["images"]):
        assert len(set(a) & set(b)) < len(a) // 4  # different unlabeled images on each rank (sums rarely collide)
    # Gradients, the EMA, the step counter and (MPL) h are synchronised. Batch-norm running statistics are each
    # rank's own unless `trainer.sync_batchnorm: true`, which torch supports on GPUs only.
    checked = [name for name in ranks[0]["state"] if "running_" not in name]
    assert len(checked) >= 14
    for name in checked:
        value = ranks[0]["state"][name]
        assert value == pytest.approx(ranks[1]["state"][name], rel=1e-6, abs=1e-6), name
    assert ranks[0]["h"] == pytest.approx(ranks[1]["h"])


@pytest.mark.parametrize("method", ["supervised", "entmin", "uda", "mpl"])
def test_cifar10_configs_run_on_a_cifar_format_tree(tmp_path, method):
    from conftest import ROOT, run_zoo, write_cifar10

    write_cifar10(tmp_path / "cifar", per_batch=20)
    result = run_zoo(
        "fit", "-c", str(ROOT / "configs" / "semisup" / f"{method}_cifar10_4000.yaml"),
        f"--data.init_args.root={tmp_path / 'cifar'}", "--data.init_args.num_labels_per_class=2",
        "--data.init_args.batch_size=2", "--data.init_args.mu=2", "--data.init_args.num_workers=0",
        "--data.init_args.pin_memory=false", f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.fast_dev_run=2", "--test_after_fit=false", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow  # 15-20 s; fine-tuning itself is covered by tests/test_finetune.py in the default suite
def test_mpl_digits_then_finetune_the_ema_student_from_its_checkpoint(tmp_path):
    from conftest import ROOT, run_zoo

    common = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--test_after_fit=false",
              "--trainer.callbacks=[]"]
    result = run_zoo("fit", "-c", str(ROOT / "configs" / "semisup" / "mpl_digits.yaml"), "--trainer.max_steps=4",
                     f"--trainer.default_root_dir={tmp_path / 'mpl'}", *common, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "mpl" / "version_0" / "checkpoints" / "last.ckpt"
    result = run_zoo("fit", "-c", str(ROOT / "configs" / "semisup" / "mpl_finetune_digits.yaml"),
                     f"--finetune.init_from={ckpt}", "--trainer.max_steps=2",
                     f"--trainer.default_root_dir={tmp_path / 'ft'}", *common, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded 20 tensors" in result.stdout + result.stderr  # every CNN and head tensor of the EMA student


def test_mpl_and_uda_train_under_mixed_precision_with_clipping():
    # Two optimizers share Lightning's precision plugin; the losses are fp32. (fp16 + GradScaler needs a GPU: torch
    # runs "16-mixed" as bf16 on CPU, so only bf16 is checked here.)
    precision = "bf16-mixed"
    L.seed_everything(0)
    labeled, unlabeled = _random_data()
    for model in (MetaPseudoLabels(backbone=_small_backbone(), num_classes=3, gradient_clip_val=1.0), UDA(backbone=_small_backbone(), num_classes=3)):
        record = _RecordH() if isinstance(model, MetaPseudoLabels) else None
        trainer = _trainer(max_steps=6, precision=precision, callbacks=[record] if record else [])
        trainer.fit(model, datamodule=_SemiSupData(labeled, unlabeled))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        if record:
            assert len(record.h) == 3 and all(math.isfinite(h) for h in record.h)

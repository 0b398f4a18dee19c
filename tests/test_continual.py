"""Continual learning (zoo.continual): the metrics, LwF's distillation, EWC's penalty and Fisher, herding, ANCL's
auxiliary network, the task schedule inside one fit, resume and DDP."""

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.backbones import MLP
from zoo.continual.ancl import AEWC, ALwF
from zoo.continual.ewc import EWC, backbone_vector, ewc_penalty, fisher_sums
from zoo.continual.incremental import (MultiHeadNet, TaskAccuracy, average_accuracy,
                                       backward_transfer, forgetting, herding_selection, phase_schedule,
                                       random_selection)
from zoo.continual.lwf import LwF, distillation_cross_entropy


# ---- metrics ----------------------------------------------------------------------------------------------------------

MATRIX = torch.tensor([[0.90, float("nan"), float("nan")],
                       [0.70, 0.80, float("nan")],
                       [0.75, 0.50, 0.95]])


def test_forgetting_is_best_earlier_accuracy_minus_current_on_a_hand_matrix():
    f = forgetting(MATRIX)
    # after task 2: task 0 best before was 0.90 (task 0), now 0.75; task 1 best before 0.80, now 0.50
    assert f[2, 0].item() == pytest.approx(0.15) and f[2, 1].item() == pytest.approx(0.30)
    assert f[1, 0].item() == pytest.approx(0.20)
    assert f[2, 2].item() == 0 and f[0, 0].item() == 0


def test_average_accuracy_and_backward_transfer_on_a_hand_matrix():
    assert average_accuracy(MATRIX).tolist() == pytest.approx([0.90, 0.75, (0.75 + 0.50 + 0.95) / 3])
    # BWT = mean over u < 2 of acc[2, u] - acc[u, u] = ((0.75 - 0.90) + (0.50 - 0.80)) / 2
    assert backward_transfer(MATRIX).item() == pytest.approx(-0.225)


def test_task_aware_and_task_agnostic_accuracy_differ_on_a_toy():
    metric = TaskAccuracy([2, 2])
    # item of class 1 (task 0): task 0's slice prefers class 1, but task 1's class 3 scores higher overall
    logits = torch.tensor([[0.0, 1.0, 0.0, 5.0], [3.0, 0.0, 0.0, 0.0]])
    metric.update(logits, torch.tensor([1, 0]), task=0)
    acc_taw, acc_tag, _ = metric.compute()
    assert acc_taw[0].item() == 1.0 and acc_tag[0].item() == 0.5
    assert math.isnan(acc_tag[1].item())


def test_phase_schedule_puts_an_auxiliary_phase_before_every_later_task():
    assert phase_schedule(2, auxiliary=False) == [(0, "main"), (1, "main")]
    assert phase_schedule(3, auxiliary=True) == [(0, "main"), (1, "aux"), (1, "main"), (2, "aux"), (2, "main")]


# ---- LwF and EWC --------------------------------------------------------------------------------------------------------

def test_lwf_distillation_at_temperature_2_matches_a_hand_computation():
    student, teacher = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.5, 0.5, 0.0]])

    def tempered(logits):
        p = [math.exp(v) for v in logits]
        p = [v / sum(p) for v in p]
        p = [v ** 0.5 for v in p]
        return [v / sum(p) for v in p]

    p, q = tempered(student[0].tolist()), tempered(teacher[0].tolist())
    p = [v + 1e-5 / 3 for v in p]
    p = [v / sum(p) for v in p]
    expected = -sum(qi * math.log(pi) for qi, pi in zip(q, p))
    assert distillation_cross_entropy(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)
    # not the plain (T = 1) soft cross-entropy
    plain = -(torch.softmax(teacher, 1) * torch.log_softmax(student, 1)).sum().item()
    assert abs(plain - expected) > 1e-3


def test_distillation_to_itself_is_the_tempered_entropy_and_minimal():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    q = torch.softmax(logits, 1).sqrt()
    q = q / q.sum()
    entropy = -(q * q.log()).sum().item()
    assert distillation_cross_entropy(logits, logits).item() == pytest.approx(entropy, abs=1e-4)
    assert distillation_cross_entropy(logits + torch.tensor([[0.0, 0.5, 0.0]]), logits).item() > entropy


def test_ewc_penalty_with_a_hand_made_fisher():
    theta, reference = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 1.0])
    fisher = torch.tensor([0.5, 10.0, 2.0])
    assert ewc_penalty(theta, reference, fisher).item() == pytest.approx((0.5 * 1 + 10 * 0 + 2 * 4) / 2)


def _tiny_net(task_classes=(2, 2), batch_norm=False):
    torch.manual_seed(0)
    return MultiHeadNet(MLP(in_features=4, widths=[5], batch_norm=batch_norm), list(task_classes))


def test_per_sample_fisher_equals_a_loop_over_samples_and_ignores_the_batch_size():
    net = _tiny_net()
    x, y = torch.randn(6, 1, 2, 2), torch.tensor([0, 1, 2, 3, 1, 0])
    params = list(net.backbone.parameters())
    expected = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(6):  # the definition, one sample at a time
        loss = F.cross_entropy(torch.cat(net(x[i:i + 1]), 1), y[i:i + 1])
        grads = torch.autograd.grad(loss, params)
        expected += torch.cat([g.reshape(-1) for g in grads]).double().pow(2)
    total, count = fisher_sums(net, [(x, y)], num_heads=2, per_sample=True)
    assert count == 6 and torch.allclose(total, expected, atol=1e-6)
    split, _ = fisher_sums(net, [(x[:2], y[:2]), (x[2:], y[2:])], num_heads=2, per_sample=True)
    assert torch.allclose(split, expected, atol=1e-6)
    heads_excluded = sum(p.numel() for p in net.backbone.parameters())
    assert total.numel() == heads_excluded


def test_batch_fisher_is_facils_batch_size_times_squared_mean_gradient_and_keeps_bn_statistics():
    net = _tiny_net(batch_norm=True)
    x, y = torch.randn(6, 1, 2, 2), torch.tensor([0, 1, 2, 3, 1, 0])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    total, count = fisher_sums(net, [(x, y)], num_heads=2, per_sample=False)
    net.train()
    loss = F.cross_entropy(torch.cat(net(x), 1), y)
    grads = torch.autograd.grad(loss, list(net.backbone.parameters()))
    expected = torch.cat([g.reshape(-1) for g in grads]).double().pow(2) * 6
    assert count == 6 and torch.allclose(total, expected, atol=1e-6)
    # FACIL's pass updates the running statistics; here they are put back
    net.load_state_dict(before)
    fisher_sums(net, [(x, y)], num_heads=2, per_sample=False)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ---- exemplars --------------------------------------------------------------------------------------------------------

def test_herding_picks_the_hand_computed_order():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # μ = (0.533, 0.6): first the item nearest μ (index 2), then the one whose running mean is nearest (index 0)
    assert herding_selection(features, torch.zeros(3, dtype=torch.long), 3).tolist() == [2, 0, 1]


def test_herding_matches_facils_loop_for_several_classes_at_once():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 6, generator=generator)
    labels = torch.randint(0, 4, (40,), generator=generator)
    chosen = herding_selection(features, labels, per_class=5).tolist()
    expected = []
    normalized = F.normalize(features, dim=1)
    for c in range(4):  # FACIL's HerdingExemplarsSelector, literally
        items = [i for i in range(40) if labels[i] == c]
        mu = normalized[items].mean(0)
        selected, running = [], torch.zeros(6)
        for k in range(1, min(5, len(items)) + 1):
            best, best_distance = None, float("inf")
            for i in items:
                if i not in selected:
                    distance = torch.norm(mu - (running + normalized[i]) / k).item()
                    if distance < best_distance:
                        best, best_distance = i, distance
            selected.append(best)
            running = running + normalized[best]
        expected += selected
    assert chosen == expected


def test_random_exemplars_respect_the_per_class_count():
    labels = torch.tensor([0] * 7 + [1] * 2 + [2] * 5)
    chosen = random_selection(labels, 3, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels[chosen], minlength=3).tolist()
    assert counts == [3, 2, 3] and len(set(chosen.tolist())) == len(chosen)


# ---- the learner's parts ------------------------------------------------------------------------------------------------

def _learner(cls, **kwargs):
    torch.manual_seed(0)
    return cls(backbone=MLP(in_features=4, widths=[6]), task_classes=[2, 2, 2], epochs_per_task=1, **kwargs)


@pytest.mark.parametrize("cls", [LwF, EWC, ALwF, AEWC])
def test_old_and_auxiliary_networks_get_no_gradient_and_are_in_no_optimizer(cls):
    model = _learner(cls)
    frozen = [n for n in ("old_net", "aux_net") if hasattr(model, n)]
    assert frozen and all(not list(getattr(model, n).parameters()) for n in frozen)
    optimized = {id(p) for group in model.configure_optimizers().param_groups for p in group["params"]}
    frozen_tensors = [t for n in frozen for t in getattr(model, n).buffers()]
    assert optimized and not any(id(t) in optimized for t in frozen_tensors)
    assert optimized == {id(p) for p in model.net.parameters()}


def test_ancl_with_zero_lambda_a_gives_exactly_the_base_methods_loss():
    images = torch.randn(4, 1, 2, 2)
    for base, ancl, kw in ((LwF, ALwF, {"lamb": 3.0}), (EWC, AEWC, {"lamb": 100.0})):
        plain, auxiliary = _learner(base, **kw), _learner(ancl, lamb_a=0.0, **kw)
        auxiliary.net.load_state_dict(plain.net.state_dict())
        with torch.no_grad():
            for p in plain.old_net.buffers():
                p.add_(0.1)
            auxiliary.old_net.load_state_dict(plain.old_net.state_dict())
            auxiliary.aux_net.load_state_dict(plain.net.state_dict())
            if hasattr(plain, "fisher"):
                plain.fisher.uniform_()
                auxiliary.fisher.copy_(plain.fisher)
                auxiliary.fisher_aux.fill_(1.0)
            auxiliary.aux_net.heads[1].bias[0].add_(1.0)  # an auxiliary network that would change the loss
        outputs = plain.net(images, num_heads=2)
        assert plain.penalty(images, outputs, 1).item() == pytest.approx(
            auxiliary.penalty(images, auxiliary.net(images, num_heads=2), 1).item(), rel=1e-6)


def test_a_ewc_pulls_toward_the_auxiliary_weights_not_the_old_ones():
    model = _learner(AEWC, lamb=0.0, lamb_a=1.0)
    with torch.no_grad():
        theta = backbone_vector(model.net, model.backbone_names)
        old = dict(model.old_net.backbone.named_buffers())
        aux = dict(model.aux_net.backbone.named_buffers())
        for name in model.backbone_names:
            old[name].add_(-1.0)  # θ_old below θ
            aux[name].add_(+1.0)  # θ_aux above θ
        model.fisher_aux.fill_(1.0)
        model.fisher.fill_(1.0)
    images = torch.randn(2, 1, 2, 2)
    penalty = model.penalty(images, model.net(images, num_heads=2), 1)
    penalty.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.net.backbone.parameters()])
    # gradient descent moves θ up, toward θ_aux: every gradient is negative (d/dθ of (θ - θ_aux)²/2 = θ - θ_aux = -1)
    assert torch.allclose(grads, torch.full_like(grads, -1.0))
    assert theta.numel() == grads.numel()


def test_a_lwf_distils_only_head_t_from_the_auxiliary_network():
    model = _learner(ALwF, lamb=0.0, lamb_a=1.0)
    images = torch.randn(3, 1, 2, 2)
    with torch.no_grad():
        model.aux_net.heads[0].weight[0].add_(5.0)  # an old head of the auxiliary network: must not matter
        outputs = model.net(images, num_heads=2)
        before = model.penalty(images, outputs, 1).item()
        model.aux_net.heads[1].weight[0].add_(5.0)  # head t: must matter
        after = model.penalty(images, outputs, 1).item()
    expected = distillation_cross_entropy(outputs[1], model.aux_net(images, num_heads=2)[1]).item()
    assert after == pytest.approx(expected, rel=1e-6) and abs(after - before) > 1e-4


# ---- the task sequence through the CLI ------------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

from lightning.pytorch.callbacks import Callback  # noqa: E402

from conftest import ROOT, run_zoo  # noqa: E402
from zoo.cli import ZooCLI  # noqa: E402

A_LWF = ROOT / "configs" / "continual" / "a_lwf_digits.yaml"
A_EWC = ROOT / "configs" / "continual" / "a_ewc_digits.yaml"


class Killed(Exception):
    """Stands in for SIGKILL, raised at the start of a chosen step (the step before it is in last.ckpt)."""


class PhaseRecorder(Callback):
    """Records (epoch, batch, task, stage, lr, momentum buffers present) at every training batch; raises ``Killed`` at
    ``kill_at`` = (epoch, batch)."""

    def __init__(self, kill_at=None):
        self.kill_at, self.seen = kill_at, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.kill_at:
            raise Killed
        optimizer = trainer.optimizers[0]
        has_momentum = any(optimizer.state.get(p, {}).get("momentum_buffer") is not None
                           for group in optimizer.param_groups for p in group["params"])
        phase = pl_module.phase
        self.seen.append((trainer.current_epoch, batch_idx, phase.task, phase.stage,
                          optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["weight_decay"], has_momentum))


def _cli(config: Path, root: Path, *extra: str) -> ZooCLI:
    return ZooCLI(args=["-c", str(config), f"--trainer.default_root_dir={root}", "--trainer.logger=false",
                        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                        "--test_after_fit=false", "--model.init_args.epochs_per_task=1",
                        "--last_checkpoint.every_n_train_steps=1", *extra], run=False)


def test_every_phase_starts_with_a_fresh_optimizer_at_the_configured_lr(tmp_path):
    cli = _cli(A_LWF, tmp_path)
    recorder = PhaseRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    firsts = [row for row in recorder.seen if row[1] == 0]
    assert [(task, stage) for _, _, task, stage, *_ in firsts] == phase_schedule(5, auxiliary=True)
    for epoch, _, task, stage, lr, weight_decay, has_momentum in firsts:
        assert lr == pytest.approx(0.05) and not has_momentum, (epoch, stage)  # no momentum carried over
        # the auxiliary phase's weight decay is ANCL's hard-coded 5e-4 (the configured SGD has none)
        assert weight_decay == (5e-4 if stage == "aux" else 0.0), (epoch, stage)
    assert any(row[-1] for row in recorder.seen)  # momentum buffers do exist inside a phase
    model = cli.model
    assert model.tasks_learned() == 5 and (model.acc_tag >= 0).sum() == 15  # the lower triangle, measured


def test_training_data_follows_the_phase(tmp_path):
    cli = _cli(A_LWF, tmp_path, "--model.init_args.exemplar_budget=20")
    labels_by_epoch: dict[int, set] = {}

    class Labels(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            labels_by_epoch.setdefault(trainer.current_epoch, set()).update(batch[1].tolist())

    cli.trainer.callbacks.append(Labels())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert labels_by_epoch[0] == {0, 1}
    assert labels_by_epoch[1] == {2, 3}  # task 1's auxiliary phase: the new task only, no exemplars
    assert labels_by_epoch[2] == {0, 1, 2, 3}  # task 1's main phase: the new task and the memory of task 0
    assert len(cli.model.exemplar_indices) == 20  # the fixed budget, 2 per class after the last task
    memory_labels = cli.datamodule.train_pool_labels[cli.model.exemplar_indices]
    assert torch.bincount(memory_labels, minlength=10).tolist() == [2] * 10


def test_frozen_networks_keep_their_batch_norm_statistics_through_training(tmp_path):
    cli = _cli(A_LWF, tmp_path, "--model.init_args.backbone.init_args.batch_norm=true")
    seen = {}

    class Snapshot(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:  # task 1's main phase: old and aux networks in use
                seen["before"] = {k: v.clone() for k, v in pl_module.old_net.state_dict().items()}
                seen["aux"] = {k: v.clone() for k, v in pl_module.aux_net.state_dict().items()}

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                seen["training"] = (pl_module.old_net.training, pl_module.aux_net.training)
                seen["after"] = {k: v.clone() for k, v in pl_module.old_net.state_dict().items()}
                seen["aux_after"] = {k: v.clone() for k, v in pl_module.aux_net.state_dict().items()}

    cli.trainer.callbacks.append(Snapshot())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert seen["training"] == (False, False)
    changed = [k for k in seen["before"] if not torch.equal(seen["before"][k], seen["after"][k])]
    assert not changed
    assert all(torch.equal(seen["aux"][k], seen["aux_after"][k]) for k in seen["aux"])


def test_auxiliary_training_starts_from_the_main_network_and_leaves_it_untouched(tmp_path):
    cli = _cli(A_LWF, tmp_path)
    seen = {}

    class Snapshot(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:  # task 1's auxiliary phase starts from θ_0
                seen["aux_start"] = {k: v.clone() for k, v in pl_module.net.state_dict().items()}
            if trainer.current_epoch == 2:  # the main phase restarts from θ_0, and the aux net is what was trained
                seen["main_start"] = {k: v.clone() for k, v in pl_module.net.state_dict().items()}
                seen["aux_net"] = {k: v.clone() for k, v in pl_module.aux_net.state_dict().items()}

    cli.trainer.callbacks.append(Snapshot())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert all(torch.equal(seen["aux_start"][k], seen["main_start"][k]) for k in seen["aux_start"])
    assert any(not torch.equal(seen["aux_start"][k], seen["aux_net"][k]) for k in seen["aux_start"])


def test_resume_after_a_kill_inside_task_3_continues_at_task_3_with_the_same_matrices(tmp_path):
    extra = ("--model.init_args.exemplar_budget=20",)
    straight = _cli(A_LWF, tmp_path / "straight", *extra)
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)
    # A-LwF with one epoch per phase: epoch 6 is task 3's main phase (0 main, 1-2 task 1, 3-4 task 2, 5-6 task 3)
    killed = _cli(A_LWF, tmp_path / "killed", *extra)
    killed.trainer.callbacks.append(PhaseRecorder(kill_at=(6, 3)))
    with pytest.raises(Killed):
        killed.trainer.fit(killed.model, datamodule=killed.datamodule)
    last = tmp_path / "killed" / "version_0" / "checkpoints" / "last.ckpt"
    resumed = _cli(A_LWF, tmp_path / "resumed", *extra)
    recorder = PhaseRecorder()
    resumed.trainer.callbacks.append(recorder)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(last))
    epoch, batch, task, stage, *_ = recorder.seen[0]
    assert (epoch, batch, task, stage) == (6, 3, 3, "main")
    for kind in ("acc_tag", "acc_taw"):
        assert torch.equal(getattr(resumed.model, kind), getattr(straight.model, kind)), kind
    assert torch.equal(resumed.model.exemplar_indices, straight.model.exemplar_indices)


@pytest.mark.slow  # two runs, one of them 2-process DDP on the CPU: about a minute
def test_two_process_ddp_gives_the_matrices_of_one_process(tmp_path):
    """A-EWC with a herding memory: the per-sample Fisher, the broadcast exemplars and the test rows under DDP. One
    process with batch 32 sees the batches the two ranks see together with 16 each (seeded sampler, every task's
    training split even-sized so no rank pads)."""
    common = ("--model.init_args.epochs_per_task=2", "--model.init_args.exemplar_budget=20",
              "--data.init_args.test_fraction=0.35", "--data.init_args.shuffle_seed=0", "--seed_everything=0",
              "--trainer.accelerator=cpu", "--trainer.logger=false", "--test_after_fit=false",
              "--trainer.enable_progress_bar=false")
    matrices = {}
    for name, extra in (("one", ("--trainer.devices=1", "--data.init_args.batch_size=32")),
                        ("two", ("--trainer.devices=2", "--trainer.strategy=ddp", "--data.init_args.batch_size=16"))):
        result = run_zoo("fit", "-c", str(A_EWC), f"--trainer.default_root_dir={tmp_path / name}", *common, *extra,
                         timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        state = torch.load(tmp_path / name / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
        matrices[name] = state["state_dict"]
    for kind in ("acc_tag", "acc_taw"):
        one, two = matrices["one"][kind], matrices["two"][kind]
        assert (one >= 0).sum() == 15
        # the same up to float summation order in the gradient all-reduce: at most one test image apart
        assert torch.allclose(one, two, atol=1.01 / 71), (kind, one, two)
        assert (one == two).float().mean() > 0.8, (kind, one, two)


CONFIGS = sorted((ROOT / "configs" / "continual").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_continual_config_runs_a_step_through_the_cli(config, tmp_path):
    from test_continual_data import write_cifar100

    extra = []
    if "cifar100" in config.stem:
        root = tmp_path / "cifar"
        write_cifar100(root)
        extra = [f"--data.init_args.root={root}", "--data.init_args.num_workers=0", "--trainer.precision=32",
                 "--trainer.accelerator=cpu", "--data.init_args.batch_size=4"]
    cli = ZooCLI(args=["-c", str(config), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                       "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                       "--test_after_fit=false", "--trainer.fast_dev_run=true", *extra], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    assert list(cli.datamodule.task_classes) == cli.model.task_classes


def test_fix_bn_freezes_the_batch_norm_statistics_from_the_second_task_on(tmp_path):
    cli = _cli(A_LWF.parent / "finetune_digits.yaml", tmp_path, "--model.init_args.backbone.init_args.batch_norm=true",
               "--model.init_args.fix_bn=true")
    stats = {}

    class Snapshot(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            stats[trainer.current_epoch] = pl_module.net.backbone.layers[2].running_mean.clone()

    cli.trainer.callbacks.append(Snapshot())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert not torch.equal(stats[0], stats[1])  # task 0 trains them
    assert all(torch.equal(stats[1], stats[e]) for e in (2, 3, 4))  # frozen from task 1 on


def test_a_model_built_for_another_task_split_fails_naming_the_split(tmp_path):
    cli = _cli(A_LWF, tmp_path, "--model.init_args.task_classes=[5,5]")
    with pytest.raises(ValueError, match=r"task_classes is \[5, 5\] but the data splits its classes as \[2, 2, 2, 2, 2\]"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


@pytest.mark.slow  # four 5-task runs of the documented digits configs, about a minute
def test_the_documented_orderings_hold_on_seed_0(tmp_path):
    """docs/models/continual.md, seed 0: joint > LwF ≥ finetune on the final task-agnostic accuracy (within the 8.5-point
    seed sd measured for finetune), and A-LwF's just-learned-task accuracy ≥ LwF's − 2 points."""
    summary = {}
    for method in ("finetune", "joint", "lwf", "a_lwf"):
        cli = ZooCLI(args=["-c", str(ROOT / "configs" / "continual" / f"{method}_digits.yaml"),
                           f"--trainer.default_root_dir={tmp_path / method}", "--trainer.logger=false",
                           "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                           "--test_after_fit=false", "--seed_everything=0"], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        matrix = cli.model.accuracy_matrix("tag")
        summary[method] = {"avg": float(average_accuracy(matrix)[-1]), "new": float(matrix.diagonal().mean())}
    assert summary["joint"]["avg"] > 0.9 > summary["lwf"]["avg"] + 0.3, summary
    assert summary["lwf"]["avg"] >= summary["finetune"]["avg"] - 0.085, summary
    assert summary["a_lwf"]["new"] >= summary["lwf"]["new"] - 0.02, summary


def test_the_last_matrix_row_is_what_zoo_test_measures_in_mixed_precision(tmp_path):
    # the case where an fp32 row differed from the bf16 test before the row ran under the run's precision
    cli = _cli(A_EWC, tmp_path, "--trainer.precision=bf16-mixed", "--model.init_args.exemplar_budget=20")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    tested = {k: v for row in results for k, v in row.items()}
    row = cli.model.accuracy_matrix("tag")[-1]
    assert [tested[f"test/task_{u}/acc_tag"] for u in range(5)] == pytest.approx(row.tolist(), abs=1e-6)

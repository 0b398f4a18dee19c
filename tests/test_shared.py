"""The shared layer every family builds on: schedules, contracts, the classification base, the image-logger cadence
and the EMA teacher."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from zoo.backbones import ConvNet
from zoo.callbacks import ImageLogger
from zoo.classifier import ClassificationModule, Classifier
from zoo.contracts import check_num_classes, feature_channels, pyramid_channels
from zoo.ema import EMATeacher, ema_momentum
from zoo.schedules import half_then_linear_decay, linear_rampup, warmup_cosine, warmup_multistep

# ---------------------------------------------------------------- schedules


def test_the_docstring_examples_of_the_shared_layer_hold():
    import doctest

    import zoo.ema
    import zoo.schedules

    for module in (zoo.schedules, zoo.ema):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_schedules_on_hand_computed_steps():
    assert warmup_cosine(4, 100, warmup_steps=10) == pytest.approx(0.5)
    assert warmup_cosine(55, 100, warmup_steps=10, cycles=0.5) == pytest.approx(math.cos(math.pi * 0.25))
    assert [warmup_multistep(t, milestones=[6, 9], gamma=0.1, warmup_steps=2, warmup_factor=0.5)
            for t in (0, 1, 2, 6, 9)] == pytest.approx([0.5, 0.75, 1.0, 0.1, 0.01])
    factor = half_then_linear_decay(10)
    assert [factor(t) for t in (0, 5, 6, 8, 10)] == pytest.approx([1.0, 1.0, 0.8, 0.4, 0.0])
    assert [linear_rampup(t, 4) for t in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]


# ---------------------------------------------------------------- contracts


def test_contracts_name_what_to_set():
    assert feature_channels(ConvNet(1, widths=[4, 6])) == 6
    with pytest.raises(ValueError, match="out_channels"):
        feature_channels(nn.Flatten())
    body = SimpleNamespace(out_channels=[8, 16], reductions=[8, 16])
    assert pyramid_channels(body) == ([8, 16], [8, 16])
    with pytest.raises(ValueError, match="reductions"):
        pyramid_channels(SimpleNamespace(out_channels=[8, 16]))

    class Module(L.LightningModule):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.save_hyperparameters()

    module = Module(num_classes=3)
    check_num_classes(module)  # no trainer: nothing to compare
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(num_classes=5))
    with pytest.raises(ValueError, match="num_classes: 5"):
        check_num_classes(module)
    check_num_classes(module, num_classes=5)


# ---------------------------------------------------------------- the classification base


class _FixedLogits(ClassificationModule):
    """Logits given by the batch itself, so the logged loss and accuracy can be computed by hand."""

    def __init__(self) -> None:
        super().__init__(num_classes=3)
        self.unused = nn.Linear(1, 1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def test_classification_base_logs_loss_and_accuracy_over_the_whole_split():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 0, 2])
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(logits, labels), batch_size=3)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(_FixedLogits(), data, verbose=False)[0]
    assert metrics["val/acc"] == pytest.approx(0.5)  # rows 0 and 1 right, over both batches
    # The loss is averaged per batch (weighted by batch size), as Lightning averages epoch-level logs.
    per_item = nn.functional.cross_entropy(logits, labels, reduction="none")
    assert metrics["val/loss"] == pytest.approx(float(per_item.mean()), rel=1e-5)
    predictions = trainer.predict(_FixedLogits(), data)
    assert torch.cat([p["preds"] for p in predictions]).tolist() == [0, 1, 2, 0]


def test_the_classifiers_of_three_families_share_the_evaluation_steps():
    from zoo.classification.classifier import ImageClassifier
    from zoo.finegrained.api_net import APINet
    from zoo.semisup.base import SemiSupervisedClassifier
    from zoo.semisup.meta_pseudo_labels import MetaPseudoLabels

    for cls in (ImageClassifier, SemiSupervisedClassifier, APINet):
        assert cls.test_step is ClassificationModule.test_step and cls.predict_step is ClassificationModule.predict_step
    assert issubclass(MetaPseudoLabels, ClassificationModule)
    assert isinstance(Classifier(ConvNet(1, widths=[4]), 3)(torch.zeros(2, 1, 8, 8)), torch.Tensor)


# ---------------------------------------------------------------- the image-logger cadence


@pytest.mark.parametrize("max_epochs, every, drawn", [(7, 3, [2, 5, 6]), (4, 1, [0, 1, 2, 3]), (5, 10, [4])])
def test_image_loggers_draw_every_n_epochs_and_after_the_last(max_epochs, every, drawn):
    logger = ImageLogger(every_n_epochs=every)
    epochs = [e for e in range(max_epochs) if logger.should_draw(SimpleNamespace(
        sanity_checking=False, current_epoch=e, max_epochs=max_epochs, max_steps=-1, global_step=10 * e))]
    assert epochs == drawn
    sanity = SimpleNamespace(sanity_checking=True, current_epoch=0, max_epochs=1, max_steps=-1, global_step=0)
    assert not logger.should_draw(sanity)
    # step-based runs: the validation that ends the run is the last one
    steps = SimpleNamespace(sanity_checking=False, current_epoch=3, max_epochs=-1, max_steps=100, global_step=100)
    assert ImageLogger(every_n_epochs=10).should_draw(steps)


# ---------------------------------------------------------------- the EMA teacher


def _student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _train_steps(student: nn.Module, steps: int, after_step) -> None:
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        torch.manual_seed(100 + step)
        loss = student(torch.randn(5, 1, 8, 8)).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after_step()


def test_ema_teacher_is_bit_identical_to_averaged_models_ema():
    student = _student()
    teacher = EMATeacher(student, momentum=0.9, ramp=False)
    reference = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)

    def update():
        teacher.update(student)
        reference.update_parameters(student)

    _train_steps(student, 6, update)
    ours = dict(teacher.module.named_buffers())
    for name, value in list(reference.module.named_parameters()) + list(reference.module.named_buffers()):
        if value.is_floating_point():
            assert torch.equal(ours[name], value), name


def test_ema_momentum_ramp_and_an_update_by_hand():
    assert [ema_momentum(t, 0.99, ramp=True) for t in range(4)] == pytest.approx([0.0, 0.5, 2 / 3, 0.75])
    assert [ema_momentum(t, 0.99, ramp=False) for t in range(3)] == [0.0, 0.99, 0.99]
    student = nn.Linear(1, 1, bias=False)
    teacher = EMATeacher(student, momentum=0.99, ramp=True)
    for value in (2.0, 4.0, 8.0):  # t = 0 copies; t = 1: 0.5·2 + 0.5·4 = 3; t = 2: 2/3·3 + 1/3·8 = 14/3
        student.weight.data.fill_(value)
        teacher.update(student)
    assert float(teacher.module.weight) == pytest.approx(14 / 3) and int(teacher.num_updates) == 3


def test_ema_teacher_has_no_parameters_no_gradient_and_only_optionally_buffers():
    student = _student()
    teacher = EMATeacher(student, momentum=0.5, include_buffers=False)

    class Module(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student, self.teacher = student, teacher

    module = Module()
    # Any optimiser built from the module's parameters (the CLI's `optimizer:` does exactly that) misses the teacher.
    assert {id(p) for p in module.parameters()} == {id(p) for p in student.parameters()}
    assert list(teacher.parameters()) == [] and not any(b.requires_grad for b in teacher.buffers())
    frozen_stats = teacher.module[1].running_mean.clone()
    _train_steps(student, 3, lambda: teacher.update(student))
    assert torch.equal(teacher.module[1].running_mean, frozen_stats)  # buffers stayed as copied
    assert not torch.equal(student[1].running_mean, frozen_stats)
    out = teacher(torch.randn(2, 1, 8, 8))
    assert not out.requires_grad


def test_ema_teacher_survives_a_state_dict_round_trip():
    student = _student()
    teacher = EMATeacher(student, momentum=0.9)
    _train_steps(student, 2, lambda: teacher.update(student))
    copy = EMATeacher(_student(), momentum=0.9)
    copy.load_state_dict(teacher.state_dict())
    assert int(copy.num_updates) == 2 and copy.current_momentum() == teacher.current_momentum()
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), teacher.state_dict().values()))
    assert any(key.startswith("module.0.weight") for key in teacher.state_dict())

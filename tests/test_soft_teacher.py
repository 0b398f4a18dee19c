"""Soft Teacher and its Faster R-CNN: the EMA teacher, box mapping between views, background weights, box jittering,
the empty-pseudo-box case, the partially labelled splits, DDP and resume."""

import json
import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import box_iou

from zoo.backbones import StridedConvFeatures
from zoo.detection.boxes import transform_boxes, transform_points, view_to_view
from zoo.detection.faster_rcnn import FasterRCNN, roi_losses
from zoo.detection.fpn import FeaturePyramid
from zoo.detection.soft_teacher import (SoftTeacher, background_weights, box_uncertainty, jitter_boxes,
                                        pseudo_box_quality, soft_classification_loss)
from zoo.ema import ema_momentum


def tiny_soft_teacher(**kwargs) -> SoftTeacher:
    neck = FeaturePyramid(StridedConvFeatures(widths=(8, 16, 32, 32, 32)), 32)
    settings = dict(neck=neck, num_classes=10, anchor_sizes=(16, 32, 64), rpn_pre_nms=(200, 100),
                    rpn_post_nms=(100, 100), roi_batch_size=64, representation_size=64, optimizer="adamw", lr=2e-3)
    settings.update(kwargs)
    return SoftTeacher(**settings)


def planted_images(count: int = 2, size: int = 96):
    boxes = torch.tensor([[12.0, 16, 44, 48], [50, 40, 86, 76]])
    images = []
    for _ in range(count):
        image = torch.zeros(3, size, size)
        for b in boxes.long():
            image[:, b[1]:b[3], b[0]:b[2]] = 1.0
        images.append(image)
    return images, boxes


def identity_infos(images, boxes=None):
    eye = torch.eye(3, dtype=torch.float64)
    boxes = torch.zeros(0, 4) if boxes is None else boxes
    return [{"weak_matrix": eye, "strong_matrix": eye, "image_id": torch.tensor(i), "orig_size": torch.tensor([96, 96]),
             "boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long), "has_labels": torch.tensor(True)}
            for i in range(len(images))]


# --- the EMA teacher ------------------------------------------------------------------------------------------------
def test_ema_teacher_copies_at_zero_keeps_at_one_mixes_parameters_only_and_is_in_no_optimizer():
    torch.manual_seed(0)
    model = tiny_soft_teacher()
    teacher, student = model.teacher, model.detector
    assert list(teacher.parameters()) == [] and not any(b.requires_grad for b in teacher.buffers())
    optimizer_tensors = {p.data_ptr() for p in model.parameters()}
    assert not optimizer_tensors & {b.data_ptr() for b in teacher.buffers()}
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        for name, b in student.named_buffers():
            if b.is_floating_point():
                b.add_(1.0)
    teacher.update(student, momentum=1.0)
    assert all(torch.equal(v, before[k]) for k, v in teacher.module.state_dict().items())
    teacher.update(student, momentum=0.25)
    weights = dict(student.named_parameters())
    for name, value in teacher.module.state_dict().items():
        if name in weights:
            assert torch.allclose(value, 0.25 * before[name] + 0.75 * weights[name].detach(), atol=1e-6), name
        else:  # buffers (BN statistics) are not averaged: the paper's trunk has frozen BN
            assert torch.equal(value, before[name]), name
    teacher.update(student, momentum=0.0)
    assert all(torch.equal(teacher.module.state_dict()[k], v.detach()) for k, v in weights.items())
    # The ramp min(m, 1 - 1/(t + 1)) of the official MeanTeacher hook.
    assert [ema_momentum(t, 0.999, ramp=True) for t in (0, 1, 3, 5000)] == pytest.approx([0, 0.5, 0.75, 0.999])


# --- boxes between views --------------------------------------------------------------------------------------------
def _view_of_op(op: str):
    from datamodules.detection.semi import AugmentedView

    if op == "flip":
        return AugmentedView(flip_prob=1.0)
    if op == "scale":
        return AugmentedView(min_size=150, max_size=1000, flip_prob=0.0)
    return AugmentedView(flip_prob=0.0, geometric=[op], translate=0.15, rotate=25.0, shear=20.0)


@pytest.mark.parametrize("op", ["flip", "scale", "translate", "rotate", "shear"])
def test_the_view_matrix_is_what_the_image_went_through_and_maps_back(op):
    """A planted square's pixels land where the matrix sends its box (so the matrix is the image's transform), and
    weak -> strong -> weak returns every corner (and, for axis-aligned ops, every box) within 1e-4."""
    generator = torch.Generator().manual_seed(3)
    image = torch.zeros(3, 100, 120)
    box = torch.tensor([[40.0, 30, 70, 60]])
    image[:, 30:60, 40:70] = 1.0
    weak, weak_matrix = _view_of_op("scale")(image, generator)
    strong, strong_matrix = _view_of_op(op)(image, generator)
    assert not torch.allclose(strong_matrix, torch.eye(3, dtype=torch.float64))
    lit = (strong[0] > 0.5).nonzero()
    seen = torch.tensor([[lit[:, 1].min(), lit[:, 0].min(), lit[:, 1].max() + 1, lit[:, 0].max() + 1]]).float()
    mapped = transform_boxes(box, strong_matrix[None], torch.tensor([strong.shape[-2:]]))
    assert (mapped - seen).abs().max() <= 2.0, (mapped, seen)

    weak_box = transform_boxes(box, weak_matrix[None])
    corners = torch.tensor([[[5.0, 7.0], [90.0, 7.0], [5.0, 64.0], [90.0, 64.0]]], dtype=torch.float64)
    to_strong = view_to_view(weak_matrix[None], strong_matrix[None])
    back = transform_points(transform_points(corners, to_strong), view_to_view(strong_matrix[None], weak_matrix[None]))
    assert (back - corners).abs().max() < 1e-4
    round_trip = transform_boxes(transform_boxes(weak_box, to_strong), torch.linalg.inv(to_strong))
    if op in ("flip", "scale", "translate"):
        assert (round_trip - weak_box).abs().max() < 1e-4
    else:  # the hull of rotated / sheared corners only grows
        assert (round_trip[:, :2] <= weak_box[:, :2] + 1e-4).all()
        assert (round_trip[:, 2:] >= weak_box[:, 2:] - 1e-4).all()


def test_transform_boxes_clips_and_handles_many_images_at_once():
    boxes = torch.tensor([[10.0, 10, 30, 30], [10.0, 10, 30, 30]])
    shift = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)
    shift[0, 0, 2], shift[1, 1, 2] = 100.0, -15.0
    out = transform_boxes(boxes, shift, torch.tensor([[50, 120], [50, 120]]))
    assert out.tolist() == [[110.0, 10.0, 120.0, 30.0], [10.0, 0.0, 30.0, 15.0]]


# --- losses ---------------------------------------------------------------------------------------------------------
def test_background_weights_are_the_teachers_background_probability_normalised_by_at_least_one():
    labels = torch.tensor([0, 3, 0, 1])
    teacher_logits = torch.tensor([[2.0, 0, 0], [0, 1, 0], [-1, 1, 1], [0, 0, 3]])
    background = teacher_logits.softmax(dim=1)[:, 0]
    weights = background_weights(labels, background)
    assert weights.tolist() == pytest.approx([background[0].item(), 1.0, background[2].item(), 1.0])
    ce = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(soft_classification_loss(ce, weights)) == pytest.approx(float((weights * ce).sum() / weights.sum()))
    small = torch.tensor([0.1, 0.2])  # Σw < 1: divided by 1, not by 0.3
    assert float(soft_classification_loss(torch.tensor([1.0, 1.0]), small)) == pytest.approx(0.3)


def test_roi_losses_reduce_to_torchvisions_fast_rcnn_loss():
    torch.manual_seed(0)
    logits, deltas = torch.randn(6, 4), torch.randn(6, 16)
    labels = torch.tensor([0, 1, 3, 0, 2, 2])
    targets = torch.randn(6, 4)
    ce, box = roi_losses(logits, deltas, labels, targets)
    reference_cls, reference_box = fastrcnn_loss(logits, deltas, [labels], [targets])
    assert float(ce.mean()) == pytest.approx(float(reference_cls), rel=1e-5)
    assert float(box.sum() / len(box)) == pytest.approx(float(reference_box), rel=1e-5)
    assert (box[labels == 0] == 0).all()


def test_jitter_uncertainty_is_zero_for_a_teacher_that_recovers_the_box_and_the_jitter_scale_for_one_that_does_not():
    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[10.0, 10, 50, 30], [0, 0, 100, 200]])
    jittered = jitter_boxes(boxes, copies=4000, scale=0.06, generator=generator)
    sides = torch.tensor([[40.0, 20, 40, 20], [100, 200, 100, 200]])
    assert (jittered.std(dim=0) / sides).flatten().tolist() == pytest.approx([0.06] * 8, rel=0.06)
    perfect = boxes[None].expand(10, -1, -1)  # every copy refined back to its box
    assert box_uncertainty(perfect).tolist() == [0.0, 0.0]
    idle = jitter_boxes(boxes, copies=10, generator=generator)  # refinements that leave the copies where they are
    assert ((box_uncertainty(idle) > 0.03) & (box_uncertainty(idle) < 0.1)).all()


def test_pseudo_box_precision_and_recall_count_class_and_image():
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    counts = pseudo_box_quality(boxes, torch.tensor([1, 2, 1]), torch.tensor([0, 0, 1]),
                                torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([1, 1]),
                                torch.tensor([0, 0]))
    assert counts.tolist() == [1, 3, 1, 2]  # wrong class at image 0, wrong image for the third


# --- the model ------------------------------------------------------------------------------------------------------
def test_a_batch_without_pseudo_boxes_gives_finite_losses_and_no_unsupervised_gradient():
    torch.manual_seed(0)
    model = tiny_soft_teacher(pseudo_threshold=1.0)  # no score passes
    images, _ = planted_images()
    pseudo = model.pseudo_label(images)
    assert len(pseudo.boxes) == 0
    losses = model.unsupervised_losses(images, identity_infos(images), pseudo)
    assert set(losses) == {"unsup_loss_rpn_cls", "unsup_loss_rpn_box", "unsup_loss_cls", "unsup_loss_box"}
    total = sum(losses.values())
    assert math.isfinite(float(total)) and float(total) == 0.0
    if total.requires_grad:
        grads = torch.autograd.grad(total, list(model.detector.parameters()), allow_unused=True)
        assert all(g is None or not g.any() for g in grads)


def test_pseudo_boxes_train_the_student_and_the_mapped_boxes_follow_the_strong_view():
    torch.manual_seed(0)
    model = tiny_soft_teacher(pseudo_threshold=0.0, rpn_threshold=0.0, cls_threshold=0.0, uncertainty_threshold=1.0)
    images, boxes = planted_images()
    pseudo = model.pseudo_label(images)
    assert len(pseudo.boxes) > 0 and pseudo.uncertainty.shape == pseudo.scores.shape
    infos = identity_infos(images)
    strong = [torch.roll(im, shifts=10, dims=-1) for im in images]  # a 10 px translation to the right
    for info in infos:
        info["strong_matrix"] = torch.tensor([[1.0, 0, 10], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    losses = model.unsupervised_losses(strong, infos, pseudo)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.detector.roi_heads.parameters())
    # The teacher scores the student's RoIs back in the weak view: a RoI on a shifted pseudo box gets the teacher's
    # own score for the unshifted box.
    shifted = [pseudo.boxes[pseudo.image == i] + torch.tensor([10.0, 0, 10, 0]) for i in range(2)]
    background = model.teacher_background(shifted, infos, pseudo)
    direct, _ = model.teacher_network.box_outputs(pseudo.features, [pseudo.boxes[pseudo.image == i] for i in range(2)],
                                                  pseudo.sizes)
    clipped = [torch.minimum(b, torch.tensor(96.0)) for b in shifted]
    inside = torch.cat([(b == s).all(dim=1) for b, s in zip(clipped, shifted)])
    assert torch.allclose(background[inside], direct.softmax(dim=1)[inside, 0], atol=1e-5)


def test_faster_rcnn_overfits_two_images_with_an_empty_one():
    torch.manual_seed(0)
    neck = FeaturePyramid(StridedConvFeatures(widths=(8, 16, 32, 32, 32)), 32)
    model = FasterRCNN(neck=neck, num_classes=10, anchor_sizes=(16, 32, 64), rpn_post_nms=(100, 100),
                       roi_batch_size=64, representation_size=64)
    images, boxes = planted_images()
    targets = [{"boxes": boxes, "labels": torch.tensor([2, 5]), "iscrowd": torch.zeros(2, dtype=torch.bool)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "iscrowd": torch.zeros(0, dtype=torch.bool)}]
    images[1].zero_()
    pixels, sizes = model.preprocess(images)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        optimiser.zero_grad()
        loss = sum(model.compute_losses(pixels, sizes, model.training_targets(targets)).values())
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(x) for x in losses) and np.mean(losses[-5:]) < 0.4 * np.mean(losses[:5])
    model.eval()
    detections = model.predict_images(images)
    top = detections[0]["boxes"][:2]
    assert box_iou(top, boxes).max(dim=1).values.min() > 0.5
    assert set(detections[0]["labels"][:2].tolist()) == {2, 5}


# --- data -----------------------------------------------------------------------------------------------------------
def test_partial_label_splits_are_reproducible_without_replacement_and_differ_by_fold():
    from datamodules.detection.semi import partial_label_ids

    ids = np.arange(1000, 3000, 2)
    first = partial_label_ids(ids, 10, fold=1)
    assert len(first) == 100 == len(np.unique(first)) and np.isin(first, ids).all()
    assert np.array_equal(first, partial_label_ids(ids[::-1], 10, fold=1))
    assert len(np.intersect1d(first, partial_label_ids(ids, 10, fold=2))) < 40
    assert len(partial_label_ids(ids, 1, fold=1)) == 10


def test_a_split_file_naming_a_missing_image_fails_with_the_file_and_id(tmp_path):
    from datamodules.detection import DigitCanvasSemiSupervisedDataModule

    common = dict(root=str(tmp_path / "canvas"), num_train=20, num_val=2, num_test=2)
    DigitCanvasSemiSupervisedDataModule(**common).prepare_data()
    train = json.loads((tmp_path / "canvas" / "annotations" / "instances_train.json").read_text())
    ids = [image["id"] for image in train["images"]]
    stac = tmp_path / "instances_train2017.1@10.json"
    stac.write_text(json.dumps({"images": [train["images"][0], train["images"][3]], "annotations": [],
                                "categories": train["categories"]}))
    module = DigitCanvasSemiSupervisedDataModule(split_file=str(stac), **common)
    module.setup("fit")
    assert sorted(int(i) for i in module.train_set.records.image_ids) == sorted([ids[0], ids[3]])
    assert len(module.unlabeled_set) == 18
    listed = tmp_path / "split.txt"
    listed.write_text(f"{ids[1]}\n987654\n")
    with pytest.raises(ValueError, match=r"split\.txt.*987654"):
        DigitCanvasSemiSupervisedDataModule(split_file=str(listed), **common).setup("fit")


def test_every_step_has_labelled_and_four_times_as_many_unlabelled_images_with_hidden_boxes(tmp_path):
    from datamodules.detection import DigitCanvasSemiSupervisedDataModule

    module = DigitCanvasSemiSupervisedDataModule(root=str(tmp_path / "canvas"), num_train=60, num_val=2, num_test=2,
                                                 labeled_percent=10, steps_per_epoch=3)
    module.setup("fit")
    assert len(module.train_set) == 6 and len(module.unlabeled_set) == 54
    batches = [b for b, _, _ in module.train_dataloader()]
    assert len(batches) == 3
    labelled_ids = {int(i) for i in module.train_set.records.image_ids}
    for batch in batches:
        images, targets = batch["labeled"]
        weak, strong, infos = batch["unlabeled"]
        assert len(images) == 2 and len(weak) == len(strong) == 8
        assert not {int(i["image_id"]) for i in infos} & labelled_ids
        assert all(len(i["boxes"]) >= 1 and i["weak_matrix"].shape == (3, 3) for i in infos)
        assert any(not torch.equal(w, s) for w, s in zip(weak, strong))  # the strong view differs


# --- runs -----------------------------------------------------------------------------------------------------------
def _digits_args(tmp_path, *extra):
    from conftest import ROOT

    return ["-c", str(ROOT / "configs" / "detection" / "soft_teacher_digits.yaml"),
            f"--data.init_args.root={tmp_path / 'canvas'}", "--data.init_args.num_train=60",
            "--data.init_args.num_val=4", "--data.init_args.num_test=4", "--data.init_args.labeled_percent=10",
            "--data.init_args.batch_size=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--test_after_fit=false", "--trainer.limit_val_batches=0",
            # a random teacher scores ~0.1: let its boxes through so that every unsupervised term runs
            "--model.init_args.pseudo_threshold=0.0", "--model.init_args.rpn_threshold=0.05",
            "--model.init_args.cls_threshold=0.05", "--model.init_args.uncertainty_threshold=1.0", *extra]


def test_two_process_ddp_keeps_the_teacher_identical_and_feeds_each_rank_other_unlabelled_images(tmp_path):
    from conftest import run_zoo

    out = tmp_path / "record"
    result = run_zoo(
        "fit", *_digits_args(tmp_path, "--trainer.max_steps=3", "--trainer.strategy=ddp_find_unused_parameters_true",
                             "--trainer.devices=2", "--trainer.accelerator=cpu",
                             "--trainer.use_distributed_sampler=false",
                             f"--trainer.default_root_dir={tmp_path / 'run'}",
                             "--trainer.callbacks+={class_path: helpers.RecordSoftTeacherRank, init_args: {out: "
                             + str(out) + "}}"), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"soft_teacher_rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == 2 and len(ranks[0]["image_ids"]) == len(ranks[1]["image_ids"]) == 3
    for a, b in zip(ranks[0]["image_ids"], ranks[1]["image_ids"]):
        assert len(a) == len(b) == 4 and not set(a) & set(b)
    assert ranks[0]["end"]["num_updates"] == ranks[1]["end"]["num_updates"] == 3
    teacher = ranks[0]["end"]["teacher"]
    assert teacher != ranks[0]["start"]["teacher"]
    for name, value in teacher.items():
        assert value == pytest.approx(ranks[1]["end"]["teacher"][name], rel=1e-6, abs=1e-6), name


def test_resume_from_last_ckpt_restores_the_teacher_and_its_momentum_ramp(tmp_path):
    from zoo.cli import ZooCLI

    def record(name):
        return ["--trainer.callbacks+={class_path: helpers.RecordSoftTeacherRank, init_args: {out: "
                + str(tmp_path / name) + "}}"]

    run = [f"--trainer.default_root_dir={tmp_path / 'run'}"]
    ZooCLI(args=["fit", *_digits_args(tmp_path, "--trainer.max_steps=2", *run, *record("first"))])
    first = json.loads((tmp_path / "first" / "soft_teacher_rank0.json").read_text())
    assert first["start"]["num_updates"] == 0 and first["start"]["teacher"] == first["start"]["student"]
    assert first["end"]["num_updates"] == 2
    checkpoint = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]
    assert int(state["teacher.num_updates"]) == 2
    cli = ZooCLI(args=["fit", *_digits_args(tmp_path, "--trainer.max_steps=4", *run, *record("second")),
                       f"--ckpt_path={checkpoint}"])
    second = json.loads((tmp_path / "second" / "soft_teacher_rank0.json").read_text())
    assert second["start"]["num_updates"] == 2  # not reset, and the teacher not re-copied from the student
    assert second["start"]["teacher"] == pytest.approx(first["end"]["teacher"], rel=1e-6)
    assert second["start"]["teacher"] != second["start"]["student"]
    assert second["end"]["num_updates"] == 4
    assert cli.model.teacher.current_momentum() == pytest.approx(ema_momentum(4, 0.99, ramp=True))


@pytest.mark.parametrize("config", ["faster_rcnn_digits", "soft_teacher_digits"])
def test_digit_configs_fast_dev_run_and_report_teacher_and_student(config, tmp_path):
    from conftest import ROOT

    from zoo.cli import ZooCLI

    cli = ZooCLI(args=["fit", "-c", str(ROOT / "configs" / "detection" / f"{config}.yaml"),
                       f"--data.init_args.root={tmp_path / 'canvas'}", "--data.init_args.num_train=40",
                       "--data.init_args.num_val=4", "--data.init_args.num_test=4", "--trainer.fast_dev_run=true",
                       "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                       f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert cli.trainer.global_step == 1
    metrics = cli.trainer.callback_metrics
    assert "test/map" in metrics
    assert ("test/student/map" in metrics) == (config == "soft_teacher_digits")
    # Without a logger the weak / strong pseudo-box panel goes to a PNG in the run folder.
    assert bool(list((tmp_path / "run").rglob("pseudo_boxes/epoch000.png"))) == (config == "soft_teacher_digits")


@pytest.mark.parametrize("config", ["faster_rcnn_coco_10pct", "soft_teacher_coco_10pct"])
def test_coco_configs_train_on_a_coco_fixture_with_a_stac_split_file(config, tmp_path):
    from conftest import ROOT
    from test_detection_data import write_coco

    from zoo.cli import ZooCLI

    root = write_coco(tmp_path / "coco")
    annotations = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    stac = root / "annotations" / "semi_supervised" / "instances_train2017.1@10.json"
    stac.parent.mkdir(parents=True)
    stac.write_text(json.dumps({**annotations, "images": annotations["images"][:1]}))
    cli = ZooCLI(args=[
        "fit", "-c", str(ROOT / "configs" / "detection" / f"{config}.yaml"), f"--data.init_args.root={root}",
        f"--data.init_args.split_file={stac}", "--model.init_args.neck.init_args.body.init_args.pretrained=false",
        "--model.init_args.neck.init_args.body.init_args.name=resnet18", "--model.init_args.num_classes=3",
        "--data.init_args.train_min_size=64", "--data.init_args.min_size=64", "--data.init_args.max_size=96",
        "--data.init_args.num_workers=0", "--trainer.precision=32-true", "--trainer.max_steps=2",
        "--trainer.limit_val_batches=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.callbacks=[]"])
    assert cli.trainer.global_step == 2
    assert len(cli.datamodule.train_set) == 1
    assert {"test/map", "test/map_50"} <= set(cli.trainer.callback_metrics)

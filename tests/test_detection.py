"""Detection core: losses, assigners, PS-RoI layout, OHEM, metrics, and the three detectors end to end on tensors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, ps_roi_align, sigmoid_focal_loss

from zoo.backbones import StridedConvFeatures, TimmFeatures
from zoo.detection.anchors import square_anchors
from zoo.detection.assigners import IGNORE, NEGATIVE, ATSSAssigner, MaxIoUAssigner
from zoo.detection.atss import ATSS
from zoo.detection.evaluation import DetectionMetrics, voc07_average_precision
from zoo.detection.fcos import TorchvisionFCOS
from zoo.detection.fpn import FeaturePyramid
from zoo.detection.gfl import GFL
from zoo.detection.losses import centerness_target, distribution_focal_loss, distribution_integral, quality_focal_loss
from zoo.detection.rfcn import RFCN, PositionSensitiveHead, ohem_select


def random_layout(generator: torch.Generator, size: int = 128, count: int = 4) -> torch.Tensor:
    sides = torch.randint(16, 41, (count,), generator=generator).float()
    corners = torch.rand(count, 2, generator=generator) * (size - sides[:, None])
    return torch.cat([corners, corners + sides[:, None]], dim=1)


def digits_anchors(size: int = 128):
    strides = [8, 16, 32]
    return square_anchors([(size // s, size // s) for s in strides], strides, scale=4)


# --- losses ---------------------------------------------------------------------------------------------------------
def test_qfl_is_focal_loss_without_alpha_for_binary_targets():
    logits = torch.randn(50, 7)
    targets = (torch.rand(50, 7) > 0.7).float()
    expected = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2, reduction="none")
    assert torch.allclose(quality_focal_loss(logits, targets, beta=2), expected, atol=1e-6)


def test_qfl_is_minimised_where_sigma_equals_the_soft_target():
    logits = torch.linspace(-6, 6, 2001)
    loss = quality_focal_loss(logits, torch.full_like(logits, 0.37))
    assert abs(float(logits[loss.argmin()].sigmoid()) - 0.37) < 0.005


def test_dfl_integral_of_one_hot_is_its_bin_and_integer_target_is_cross_entropy():
    one_hot = torch.full((9, 9), -1e4).fill_diagonal_(0.0)
    assert torch.allclose(distribution_integral(one_hot), torch.arange(9.0))
    logits, target = torch.randn(6, 9), torch.tensor([0.0, 1, 2, 3, 5, 7])
    assert torch.allclose(distribution_focal_loss(logits, target), F.cross_entropy(logits, target.long(), reduction="none"),
                          atol=1e-6)


def test_dfl_optimum_decodes_to_the_target_and_rejects_the_last_bin():
    # The optimum puts (y_r - y, y - y_l) = (0.7, 0.3) on bins 3 and 4: its integral is y and its gradient vanishes.
    logits = torch.full((1, 9), -30.0)
    logits[0, 3], logits[0, 4] = math.log(0.7), math.log(0.3)
    logits.requires_grad_(True)
    distribution_focal_loss(logits, torch.tensor([3.3])).sum().backward()
    assert abs(float(distribution_integral(logits.detach())) - 3.3) < 1e-5
    assert logits.grad.abs().max() < 1e-5
    shifted = logits.detach().clone()
    shifted[0, 3] += 0.2  # moving mass off the optimum raises the loss
    assert distribution_focal_loss(shifted, torch.tensor([3.3])) > distribution_focal_loss(logits.detach(), torch.tensor([3.3]))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        distribution_focal_loss(torch.zeros(1, 9), torch.tensor([8.0]))


def test_centerness_target_hand_values():
    values = centerness_target(torch.tensor([[1.0, 1, 1, 1], [1, 1, 3, 1], [2, 1, 2, 4]]))
    assert torch.allclose(values, torch.tensor([1.0, math.sqrt(1 / 3), math.sqrt(1 * 1 / 4)]))


# --- assigners ------------------------------------------------------------------------------------------------------
def test_atss_positives_are_candidates_above_mean_plus_std_with_centres_inside():
    anchors = digits_anchors()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        gt = random_layout(generator)
        out = ATSSAssigner(topk=9).assign(anchors.boxes, anchors.num_per_level, gt)
        assert out.candidates.shape == (sum(min(9, n) for n in anchors.num_per_level), len(gt))
        ious = box_iou(anchors.boxes, gt)
        for g in range(len(gt)):
            positives = (out.matched == g).nonzero().flatten()
            assert set(positives.tolist()) <= set(out.candidates[:, g].tolist())
            candidate_ious = ious[out.candidates[:, g], g]
            assert torch.isclose(out.thresholds[g], candidate_ious.mean() + candidate_ious.std())  # unbiased std
            assert (ious[positives, g] >= out.thresholds[g]).all()
            c = anchors.centers[positives]
            assert ((c > gt[g, :2]) & (c < gt[g, 2:])).all()


def test_atss_candidates_rank_near_ties_exactly_at_coco_image_sizes():
    """Box centres within 0.003 px of anchor-cell corners on a 1333 x 800 image: several anchors are almost equally
    far, and the 9 nearest per level must be those of an exact (float64) distance, as the official code's direct
    ``sqrt(sum((a - b)^2))`` gives; ``torch.cdist``'s matrix-multiply path (used above 25 rows) is ~0.1 px^2 off."""
    strides = [8, 16, 32, 64, 128]
    anchors = square_anchors([(math.ceil(800 / s), math.ceil(1333 / s)) for s in strides], strides, scale=8)
    generator = torch.Generator().manual_seed(0)
    corners = torch.stack([torch.randint(20, 166, (40,), generator=generator) * 8,
                           torch.randint(10, 100, (40,), generator=generator) * 8], dim=1).float()
    offsets = (torch.rand(40, 2, generator=generator) - 0.5) * 0.006  # within ±0.003 px of the corner
    centres = corners + offsets
    sizes = torch.rand(40, 2, generator=generator) * 150 + 20
    gt = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)
    out = ATSSAssigner(topk=9).assign(anchors.boxes, anchors.num_per_level, gt)

    exact = (anchors.centers.double()[:, None] - ((gt[:, :2] + gt[:, 2:]) / 2).double()[None]).pow(2).sum(-1).sqrt()
    start = 0
    for level, count in enumerate(anchors.num_per_level):
        expected = exact[start:start + count].topk(9, dim=0, largest=False).indices + start  # (9, G)
        got = out.candidates[level * 9:(level + 1) * 9]
        for g in range(len(gt)):
            assert set(got[:, g].tolist()) == set(expected[:, g].tolist()), (level, g)
        start += count


def test_atss_gives_a_shared_anchor_to_the_higher_iou_box_and_survives_tiny_levels():
    anchors = square_anchors([(4, 4), (1, 1)], [8, 32], scale=4)  # 1x1 top level: topk > anchors there
    gt = torch.tensor([[0.0, 0, 20, 20], [2.0, 2, 30, 30]])
    out = ATSSAssigner(topk=9).assign(anchors.boxes, anchors.num_per_level, gt)
    assert len(out.candidates) == 9 + 1
    # A clean case: one anchor is a positive candidate of both boxes; it must take the one it overlaps more.
    anchors = torch.tensor([[0.0, 0, 10, 10], [4, 4, 14, 14], [40, 40, 50, 50]])
    gt = torch.tensor([[0.0, 0, 14, 14], [3, 3, 13, 13]])
    out = ATSSAssigner(topk=1).assign(anchors, [3], gt)
    assert out.matched[1] == 1 and float(box_iou(anchors[1:2], gt[1:2])) > float(box_iou(anchors[1:2], gt[0:1]))


def test_atss_covers_almost_every_box_and_more_than_max_iou():
    anchors = digits_anchors()
    generator = torch.Generator().manual_seed(1)
    covered = {"atss": 0, "max_iou": 0}
    total = 0
    for _ in range(100):
        gt = random_layout(generator)
        total += len(gt)
        for name, assigner in (("atss", ATSSAssigner()), ("max_iou", MaxIoUAssigner(low_quality_matches=False))):
            matched = assigner(anchors.boxes, anchors.num_per_level, gt)
            covered[name] += len(matched[matched >= 0].unique())
    assert covered["atss"] / total >= 0.98
    assert covered["max_iou"] / total < covered["atss"] / total - 0.1


def test_max_iou_assigner_marks_ignored_band_and_empty_images():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 12.5], [0, 0, 10, 30], [50, 50, 60, 60]])
    gt = torch.tensor([[0.0, 0, 10, 10]])
    matched = MaxIoUAssigner(low_quality_matches=False)(anchors, [4], gt)
    assert matched.tolist() == [0, 0, NEGATIVE, NEGATIVE]  # IoUs 1, 0.8, 0.33, 0
    matched = MaxIoUAssigner(0.9, 0.5, low_quality_matches=False)(anchors, [4], gt)
    assert matched.tolist() == [0, IGNORE, NEGATIVE, NEGATIVE]
    assert (ATSSAssigner()(anchors, [4], torch.zeros(0, 4)) == NEGATIVE).all()


# --- R-FCN parts ----------------------------------------------------------------------------------------------------
def test_ps_roi_channel_layout_is_class_major_and_vote_is_the_bin_mean():
    k, classes = 3, 4
    maps = torch.arange(k * k * classes, dtype=torch.float32).view(1, -1, 1, 1).expand(1, -1, 12, 12).contiguous()
    roi = torch.tensor([[0.0, 0, 0, 12, 12]])
    pooled = ps_roi_align(maps, roi, k, 1.0, -1)[0]  # (classes, k, k)
    c, i, j = torch.meshgrid(torch.arange(classes), torch.arange(k), torch.arange(k), indexing="ij")
    assert torch.equal(pooled, ((c * k + i) * k + j).float())
    head = PositionSensitiveHead(8, classes - 1, k=k, hidden_channels=8, spatial_scale=1.0)
    assert torch.allclose(head.vote(maps, roi), pooled.mean(dim=(1, 2))[None])


def test_ps_head_scores_a_planted_part_pattern_highest_on_the_aligned_roi():
    # Class 1's cell (i, j) map fires only on cell (i, j) of a 3x3 object at (12..24)^2: the aligned RoI collects
    # every part, a RoI shifted by one cell misses a row of them.
    k, stride = 3, 4
    maps = torch.zeros(1, k * k * 2, 12, 12)
    for i in range(k):
        for j in range(k):
            maps[0, (1 * k + i) * k + j, 3 + i, 3 + j] = 1.0
    head = PositionSensitiveHead(4, 1, k=k, hidden_channels=4, spatial_scale=1 / stride)
    rois = torch.tensor([[0.0, 12, 12, 24, 24], [0.0, 16, 12, 28, 24], [0.0, 12, 16, 24, 28]])
    scores = head.vote(maps, rois)[:, 1]
    assert scores[0] > scores[1] + 0.2 and scores[0] > scores[2] + 0.2


def test_ohem_keeps_the_hardest_per_image_and_only_they_get_gradients():
    losses = torch.tensor([0.1, 0.9, 0.5, 0.3, 2.0, 0.05, 0.7])
    image = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    selected = ohem_select(losses, image, 2)
    assert selected.tolist() == [False, True, True, False, True, False, True]
    assert ohem_select(losses, image, 10).all()
    logits = torch.randn(7, 3, requires_grad=True)
    ce = F.cross_entropy(logits, torch.zeros(7, dtype=torch.long), reduction="none")
    mask = ohem_select(ce.detach(), image, 2)
    ((ce * mask).sum() / mask.sum()).backward()
    assert (logits.grad[~mask] == 0).all() and (logits.grad[mask].abs().sum(dim=1) > 0).all()
    plain = ohem_select(ce.detach(), image, 10)
    assert torch.isclose((ce * plain).sum() / plain.sum(), ce.mean())


def test_output_stride_16_with_dilation():
    x = torch.zeros(1, 3, 128, 128)
    small = StridedConvFeatures(out_indices=(3, 4), output_stride=16)
    assert small.reductions == [16, 16] and [f.shape[-1] for f in small(x)] == [8, 8]
    resnet = TimmFeatures("resnet18", out_indices=(3, 4), output_stride=16)
    assert resnet.reductions == [16, 16] and [f.shape[-1] for f in resnet(x)] == [8, 8]


# --- metrics --------------------------------------------------------------------------------------------------------
def test_voc07_ap_perfect_and_hand_computed():
    assert voc07_average_precision(np.array([0.9, 0.8]), np.array([True, True]), 2) == 1.0
    # Ranked TP, FP, TP with 3 GTs: recall 1/3, 1/3, 2/3; precision 1, 1/2, 2/3.
    # 11-point: t = 0..0.3 -> 1 (4 points), t = 0.4..0.6 -> 2/3 (3 points), t = 0.7..1 -> 0.
    ap = voc07_average_precision(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]), 3)
    assert ap == pytest.approx((4 * 1 + 3 * 2 / 3) / 11)


def test_detection_metrics_perfect_duplicate_and_difficult():
    boxes = torch.tensor([[10.0, 10, 50, 50], [60, 60, 100, 100]])
    target = dict(boxes=boxes, labels=torch.tensor([0, 1]), iscrowd=torch.tensor([False, False]), image_id=torch.tensor(3))
    metrics = DetectionMetrics(voc07=True)
    metrics.update([dict(boxes=boxes, scores=torch.tensor([0.9, 0.8]), labels=torch.tensor([0, 1]))], [target])
    result = metrics.compute()
    assert float(result["map"]) == pytest.approx(1.0) and float(result["voc07_map50"]) == pytest.approx(1.0)
    # A duplicate detection is a false positive; a detection of a difficult box is ignored by VOC07.
    difficult = dict(target, iscrowd=torch.tensor([False, True]))
    preds = [dict(boxes=torch.cat([boxes, boxes[:1] + 1]), scores=torch.tensor([0.9, 0.8, 0.95]),
                  labels=torch.tensor([0, 1, 0]))]
    voc = DetectionMetrics.voc07_map(preds, [difficult])
    # Class 0 ranks the shifted duplicate (IoU 0.91, score 0.95) first: TP, then the exact box: FP -> AP 1. Class 1
    # has only a difficult GT, so it is not scored at all.
    assert voc == pytest.approx(1.0)
    preds[0]["scores"] = torch.tensor([0.95, 0.8, 0.9])  # now the exact box first, then the duplicate: still 1.0
    assert DetectionMetrics.voc07_map(preds, [difficult]) == pytest.approx(1.0)
    unmatched = [dict(boxes=torch.tensor([[200.0, 200, 240, 240], [10, 10, 50, 50]]), scores=torch.tensor([0.9, 0.5]),
                      labels=torch.tensor([0, 0]))]
    # FP then TP with 1 GT: recall 0, 1; precision 0, 1/2 -> every 11-point level has max precision 1/2.
    assert DetectionMetrics.voc07_map(unmatched, [difficult]) == pytest.approx(0.5)
    metrics = DetectionMetrics()
    metrics.update([dict(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long))],
                   [dict(target, image_id=torch.tensor(4))])
    assert float(metrics.compute()["map"]) == 0.0


# --- detectors end to end -------------------------------------------------------------------------------------------
def tiny_neck(levels: int = 3) -> FeaturePyramid:
    return FeaturePyramid(StridedConvFeatures(widths=(8, 16, 32, 32, 32)), 32)


def two_images():
    images = [torch.zeros(3, 128, 128), torch.zeros(3, 96, 128)]
    boxes = torch.tensor([[20.0, 20, 52, 52], [70, 60, 110, 100]])
    for b in boxes.long():
        images[0][:, b[1]:b[3], b[0]:b[2]] = 1.0
    targets = [dict(boxes=boxes, labels=torch.tensor([2, 5]), iscrowd=torch.tensor([False, False]),
                    image_id=torch.tensor(0), orig_size=torch.tensor([128, 128])),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                    iscrowd=torch.zeros(0, dtype=torch.bool), image_id=torch.tensor(1), orig_size=torch.tensor([96, 128]))]
    return images, targets


DETECTORS = {
    "atss": lambda: ATSS(neck=tiny_neck(), num_classes=10, num_convs=1, num_groups=8, anchor_scale=4, optimizer="adamw", lr=2e-3),
    "gfl": lambda: GFL(neck=tiny_neck(), num_classes=10, reg_max=8, num_convs=1, num_groups=8, anchor_scale=4, optimizer="adamw", lr=2e-3),
    "rfcn": lambda: RFCN(body=StridedConvFeatures(widths=(8, 16, 32, 32, 32), out_indices=(3, 4), output_stride=8), num_classes=10, k=3,
                         hidden_channels=32, anchor_sizes=(16, 32, 64), rpn_post_nms=100, rois_per_image=32,
                         optimizer="adamw", lr=2e-3),
    "fcos": lambda: TorchvisionFCOS(neck=tiny_neck(), num_classes=10, num_convs=1, optimizer="adamw", lr=2e-3),
}


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_overfits_two_images_and_handles_empty_and_outside_boxes(name):
    torch.manual_seed(0)
    model = DETECTORS[name]()
    images, targets = two_images()
    pixels, sizes = model.preprocess(images)
    assert pixels.shape == (2, 3, 128, 128) and sizes == [(128, 128), (96, 128)]
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100 if name == "rfcn" else 40):  # OHEM keeps the box loss up until the proposals settle
        optimiser.zero_grad()
        loss = sum(model.compute_losses(pixels, sizes, model.training_targets(targets)).values())
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(x) for x in losses) and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    # A box partly outside the image and a crowd box: the crowd box is dropped, nothing crashes.
    odd = [dict(targets[0], boxes=torch.tensor([[100.0, 100, 150, 140], [0, 0, 30, 30]]), labels=torch.tensor([1, 1]),
                iscrowd=torch.tensor([False, True])), targets[1]]
    assert [len(t["boxes"]) for t in model.training_targets(odd)] == [1, 0]
    assert math.isfinite(float(sum(model.compute_losses(pixels, sizes, model.training_targets(odd)).values()).detach()))
    model.eval()
    detections = model.predict_images(images, [t["orig_size"] * 2 for t in targets])
    assert all(set(d) >= {"boxes", "scores", "labels"} for d in detections)
    top = detections[0]["boxes"][:2] / 2  # reported in the (doubled) original size
    assert box_iou(top, targets[0]["boxes"]).max(dim=1).values.min() > 0.3


def test_losses_stay_finite_under_bf16_autocast():
    torch.manual_seed(0)
    model = DETECTORS["gfl"]()
    images, targets = two_images()
    images = [im * 700 for im in images]  # large activations
    pixels, sizes = model.preprocess(images)
    big = [dict(t, boxes=t["boxes"] * 1) for t in targets]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.compute_losses(pixels, sizes, model.training_targets(big))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_gfl_zero_logits_decode_to_half_the_range():
    model = DETECTORS["gfl"]()
    anchors = square_anchors([(2, 2)], [8], scale=4)
    reg = torch.zeros(1, 4, 4 * 9)
    _, boxes = model.decode(torch.zeros(1, 4, 10), reg, None, anchors)
    expected = torch.cat([anchors.centers - 4 * 8, anchors.centers + 4 * 8], dim=1)
    assert torch.allclose(boxes[0], expected)


# --- DDP and the CLI on the real formats ----------------------------------------------------------------------------
def _metric_shard(rank, world, init_file, preds, targets, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    metrics = DetectionMetrics(voc07=True)
    # Strided shards as the evaluation loaders make them: 3 images on rank 0, 2 on rank 1.
    metrics.update(preds[rank::world], targets[rank::world])
    torch.save({k: float(v) for k, v in metrics.compute().items()}, f"{out}_{rank}.pt")
    dist.destroy_process_group()


def test_two_process_metrics_equal_one_process_with_uneven_shards(tmp_path):
    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(0)
    preds, targets = [], []
    for image in range(5):
        gt = random_layout(generator, count=int(torch.randint(0, 4, (1,), generator=generator)))
        labels = torch.randint(0, 3, (len(gt),), generator=generator)
        noisy = gt + torch.randn(gt.shape, generator=generator) * 3
        extra = random_layout(generator, count=2)
        preds.append(dict(boxes=torch.cat([noisy, extra]), scores=torch.rand(len(gt) + 2, generator=generator),
                          labels=torch.cat([labels, torch.randint(0, 3, (2,), generator=generator)])))
        targets.append(dict(boxes=gt, labels=labels, iscrowd=torch.zeros(len(gt), dtype=torch.bool),
                            image_id=torch.tensor(100 + image)))
    mp.spawn(_metric_shard, args=(2, tmp_path / "init", preds, targets, tmp_path / "m"), nprocs=2)
    single = DetectionMetrics(voc07=True)
    single.update(preds, targets)
    expected = {k: float(v) for k, v in single.compute().items()}
    assert 0 < expected["map_50"] < 1
    for rank in range(2):
        assert torch.load(tmp_path / f"m_{rank}.pt") == pytest.approx(expected)


@pytest.mark.parametrize("config, fmt", [("atss_coco", "coco"), ("gfl_coco", "coco"), ("rfcn_coco", "coco"),
                                         ("atss_voc", "voc"), ("gfl_voc", "voc"), ("rfcn_voc", "voc")])
def test_real_data_configs_train_and_evaluate_on_format_fixtures(config, fmt, tmp_path):
    from conftest import ROOT
    from test_detection_data import write_coco, write_voc

    from zoo.cli import ZooCLI

    if fmt == "coco":
        root, classes = write_coco(tmp_path / "coco"), 3
    else:
        root, classes = write_voc(tmp_path / "VOCdevkit"), 20
        write_voc(root, split="test")
    extra = ["--data.init_args.train_sets=[2007/trainval]"] if fmt == "voc" else []
    body = "neck.init_args.body" if "rfcn" not in config else "body"
    cli = ZooCLI(args=[
        "fit", "-c", str(ROOT / "configs" / "detection" / f"{config}.yaml"), f"--data.init_args.root={root}", *extra,
        f"--model.init_args.{body}.init_args.pretrained=false", f"--model.init_args.{body}.init_args.name=resnet18",
        f"--model.init_args.num_classes={classes}", "--data.init_args.train_min_size=64", "--data.init_args.min_size=64",
        "--data.init_args.max_size=96", "--data.init_args.num_workers=0", "--trainer.precision=32-true",
        "--trainer.max_steps=2", "--trainer.limit_val_batches=2", "--trainer.val_check_interval=2",
        "--trainer.check_val_every_n_epoch=null", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.callbacks=[]"])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert {"test/map", "test/map_50", "test/mar_100"} <= set(metrics)  # (validation ran too: its keys are replaced)
    assert ("test/voc07_map50" in metrics) == (fmt == "voc")
    assert (tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("name", ["atss", "gfl"])
def test_dense_losses_with_the_max_iou_assigner_skip_ignored_anchors(name):
    torch.manual_seed(0)
    model = DETECTORS[name]()
    model.assigner = MaxIoUAssigner(0.6, 0.3)  # a wide ignore band
    images, targets = two_images()
    pixels, sizes = model.preprocess(images)
    losses = model.compute_losses(pixels, sizes, model.training_targets(targets))
    assert all(torch.isfinite(v) for v in losses.values())


def test_digits_config_logs_boxes_to_wandb_and_predicts_per_image_id(tmp_path):
    from conftest import ROOT

    from zoo.cli import ZooCLI

    import wandb

    wandb.finish()  # a run left open by an earlier test in this process would otherwise receive the logs
    config = str(ROOT / "configs" / "detection" / "atss_digits.yaml")
    common = [f"--data.init_args.root={tmp_path / 'canvas'}", "--data.init_args.num_train=32",
              "--data.init_args.num_val=4", "--data.init_args.num_test=6", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false"]
    ZooCLI(args=["fit", "-c", config, *common, "--trainer.max_epochs=1", "--test_after_fit=false",
                 "--trainer.check_val_every_n_epoch=1"])
    wandb.finish()
    runs = list((tmp_path / "version_0" / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run written"
    media = [p.name for p in runs[0].rglob("*.json") if "detection_boxes" in p.name]
    assert media, "no W&B box layers logged"
    checkpoint = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    cli = ZooCLI(args=["predict", "-c", config, *common, "--trainer.logger=false", f"--ckpt_path={checkpoint}",
                       "--return_predictions=true"])
    predictions = [p for batch in cli.trainer.predict_loop.predictions for p in batch]
    assert sorted(int(p["image_id"]) for p in predictions) == sorted(
        int(t["image_id"]) for _, t in cli.datamodule.test_set)
    assert all(p["boxes"].shape[1] == 4 and len(p["boxes"]) == len(p["scores"]) for p in predictions)


@pytest.mark.parametrize("config", ["atss_digits", "gfl_digits", "rfcn_digits", "fcos_digits"])
def test_digits_configs_fast_dev_run(config, tmp_path):
    from conftest import ROOT

    from zoo.cli import ZooCLI

    cli = ZooCLI(args=["fit", "-c", str(ROOT / "configs" / "detection" / f"{config}.yaml"),
                       f"--data.init_args.root={tmp_path / 'canvas'}", "--data.init_args.num_train=16",
                       "--data.init_args.num_val=4", "--data.init_args.num_test=4", "--trainer.fast_dev_run=true",
                       "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                       f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert cli.trainer.global_step == 1
    assert "test/map" in cli.trainer.callback_metrics


def _coco_fixture(seed: int = 0, images: int = 8, classes: int = 3):
    """Random detections against random ground truth of every COCO area range, with crowd boxes, in the metric's
    format and as a COCO ground-truth dict plus a results list (pycocotools' format)."""
    rng = np.random.default_rng(seed)
    preds, targets, annotations, results = [], [], [], []
    for image_id in range(1, images + 1):
        n = int(rng.integers(3, 9))
        side = rng.choice([12.0, 24.0, 48.0, 80.0, 140.0, 260.0], size=n) * rng.uniform(0.8, 1.2, size=n)
        xy = rng.uniform(0, 500, size=(n, 2))
        gt = np.concatenate([xy, xy + side[:, None] * rng.uniform(0.6, 1.4, size=(n, 2))], axis=1).astype(np.float32)
        labels = rng.integers(0, classes, size=n)
        crowd = rng.random(n) < 0.15
        m = int(rng.integers(2, 14))
        pick = rng.integers(0, n, size=m)
        det = gt[pick] + rng.normal(0, 6, size=(m, 4)).astype(np.float32)
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 1)
        det_labels = np.where(rng.random(m) < 0.8, labels[pick], rng.integers(0, classes, size=m))
        scores = rng.random(m).astype(np.float32)
        preds.append(dict(boxes=torch.from_numpy(det), scores=torch.from_numpy(scores),
                          labels=torch.from_numpy(det_labels)))
        targets.append(dict(boxes=torch.from_numpy(gt), labels=torch.from_numpy(labels),
                            iscrowd=torch.from_numpy(crowd), image_id=image_id))
        for box, label, is_crowd in zip(gt.astype(np.float64), labels, crowd):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=int(label),
                                    bbox=[box[0], box[1], w, h], area=w * h, iscrowd=int(is_crowd)))
        for box, label, score in zip(det.astype(np.float64), det_labels, scores.astype(np.float64)):
            results.append(dict(image_id=image_id, category_id=int(label), score=score,
                                bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]]))
    gt_dict = dict(images=[dict(id=i, width=800, height=800) for i in range(1, images + 1)],
                   annotations=annotations, categories=[dict(id=c, name=str(c)) for c in range(classes)])
    return preds, targets, gt_dict, results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_map_equals_cocoeval_on_crowds_and_every_area_range(seed):
    """The reference is faster-coco-eval's COCOeval, which matches pycocotools: float64 IoU and recall thresholds
    (``np.linspace``). torchmetrics' own defaults are float32, so a recall of exactly k/100 could land on the next
    point and move mAP by up to 0.002."""
    faster_coco_eval = pytest.importorskip("faster_coco_eval")
    preds, targets, gt_dict, results = _coco_fixture(seed)
    metrics = DetectionMetrics()
    metrics.update(preds, targets)
    ours = metrics.compute()

    coco_gt = faster_coco_eval.COCO(gt_dict)
    evaluator = faster_coco_eval.COCOeval_faster(coco_gt, coco_gt.loadRes(results), "bbox", print_function=lambda *a: None)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    stats = evaluator.stats
    reference = dict(map=stats[0], map_50=stats[1], map_75=stats[2], map_small=stats[3], map_medium=stats[4],
                     map_large=stats[5], mar_100=stats[8])
    for key, value in reference.items():
        assert float(ours[key]) == pytest.approx(value, abs=1e-6), key

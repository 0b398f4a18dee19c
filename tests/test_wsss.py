"""PPC (Du et al. 2022) on the SEAM network, its evaluation and the stage-2 segmentation network: the losses on hand
cases, the prototype rule, gradients, the mIoU sweep, DDP, and the CLI end to end on the digit canvases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from zoo.backbones import StridedConvFeatures
from zoo.schedules import poly
from zoo.wsss.evaluation import ThresholdSweepIoU, masks_from_maps
from zoo.wsss.ppc import (
    PPC, PixelCorrelationModule, SEAMNet, adaptive_min_pooling_loss, estimate_prototypes, gather_batches, info_nce,
    max_norm, max_onehot, multilabel_cam_loss, prototype_scores, pseudo_labels, semi_hard_intra_nce,
)


def small_backbone() -> StridedConvFeatures:
    return StridedConvFeatures(3, (8, 16, 16, 16), out_indices=(1, 2, 3), output_stride=4)


def small_ppc(**kwargs) -> PPC:
    torch.manual_seed(0)
    defaults = dict(num_classes=4, second_view_size=16, projection_dim=8, dropout=0.0, pcm_widths=(4, 4),
                    scales=(1.0, 0.5), sweep_max=0.3, sweep_step=0.1)
    return PPC(small_backbone(), **{**defaults, **kwargs})


# ---- InfoNCE and prototypes -----------------------------------------------------------------------------------------

def test_info_nce_on_the_hand_case_of_the_spec():
    # f equals its positive prototype and the 20 others are orthogonal: −log(e^10 / (e^10 + 20)) ≈ 9.08e-4 at τ = 0.1
    prototypes = torch.eye(21, 32)
    features = prototypes[[3, 7]]
    loss = info_nce(features, torch.tensor([3, 7]), prototypes, temperature=0.1)
    expected = -math.log(math.exp(10) / (math.exp(10) + 20))
    assert loss == pytest.approx(torch.tensor([expected, expected]), rel=1e-4)
    assert expected == pytest.approx(9.08e-4, rel=1e-2)
    # a wrong τ gives a very different value
    assert info_nce(features, torch.tensor([3, 7]), prototypes, temperature=1.0)[0] == pytest.approx(
        -math.log(math.e / (math.e + 20)), rel=1e-5)


def test_prototypes_are_the_score_weighted_mean_of_the_top_k_pixels_over_the_whole_batch():
    scores = torch.zeros(2, 2, 2, 2)  # (N, C, h, w)
    features = torch.randn(2, 3, 2, 2)
    v, u = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([0.0, 3.0, -4.0])
    # class 1: the two best pixels lie in image 2 (index 1), scores 0.9 and 0.6, features v and u
    scores[1, 1, 0, 0], features[1, :, 0, 0] = 0.9, v
    scores[1, 1, 1, 1], features[1, :, 1, 1] = 0.6, u
    scores[0, 1, 0, 1] = 0.1  # a weaker pixel in image 1, outside the top 2
    scores[:, 0] = 0.2  # the constant background channel: its prototype is the plain mean of 2 arbitrary pixels
    prototypes = estimate_prototypes(scores, features, k=2)
    expected = F.normalize(0.9 * v + 0.6 * u, dim=0)
    assert torch.allclose(prototypes[1], expected, atol=1e-6)
    assert torch.allclose(prototypes.norm(dim=1), torch.ones(2))
    # identical top features give the feature's direction whatever the weights
    features[1, :, 1, 1] = v
    assert torch.allclose(estimate_prototypes(scores, features, k=2)[1], v / v.norm(), atol=1e-6)


def test_no_gradient_flows_through_prototypes_or_pseudo_labels():
    model = small_ppc()
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.float32)
    out1, out2 = model.net(images), model.net(F.interpolate(images, (16, 16), mode="bilinear", align_corners=True))
    scores = prototype_scores(out2.cam_rv, 0.2)
    assert not scores.requires_grad and not pseudo_labels(scores, labels).requires_grad
    assert not estimate_prototypes(scores, out2.projection, 4).requires_grad
    # the contrast terms train the projection head but never the CAM classifier (fc8)
    loss = sum(model.contrast_losses(out1, out2, labels).values())
    loss.backward()
    assert model.net.projection.weight.grad.abs().sum() > 0
    assert model.net.classifier.weight.grad is None


def test_pcm_trains_its_own_layers_but_not_the_backbone_or_the_cam():
    net = SEAMNet(small_backbone(), num_classes=3, projection_dim=4, dropout=0.0, pcm_widths=(4, 4))
    out = net(torch.randn(2, 3, 32, 32))
    out.cam_rv.square().sum().backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert net.classifier.weight.grad is None
    assert net.pcm.embed.weight.grad.abs().sum() > 0 and all(c.weight.grad.abs().sum() > 0 for c in net.pcm.reduce)


def test_pcm_with_identity_affinity_returns_the_map():
    pcm = PixelCorrelationModule((2, 2), widths=(2, 2), image_channels=1)
    cam = torch.rand(1, 3, 2, 2)
    # embeddings that are one-hot per pixel: fᵀf is the identity, so the refined map is the map
    f = torch.eye(4).view(4, 2, 2).unsqueeze(0)
    with torch.no_grad():
        pcm.embed.weight.copy_(torch.eye(4, 5).view(4, 5, 1, 1))
    parts = [f[:, :1], f[:, 1:3], f[:, 3:]]
    for conv in pcm.reduce:
        with torch.no_grad():
            conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    refined = pcm(cam, parts[0], [parts[1], torch.cat([parts[2], torch.zeros(1, 1, 2, 2)], 1)])
    assert torch.allclose(refined, cam, atol=1e-4)


# ---- pseudo labels, SEAM's terms -----------------------------------------------------------------------------------

def test_pseudo_label_rule_on_a_hand_made_cam():
    refined = torch.zeros(1, 4, 1, 4)  # bg + 3 classes, 4 pixels
    refined[0, 1] = torch.tensor([[1.0, 0.1, 0.0, 0.5]])  # class 1: present
    refined[0, 2] = torch.tensor([[0.0, 0.15, 0.0, 0.0]])  # class 2: present, weak everywhere but max-normalised
    refined[0, 3] = torch.tensor([[0.0, 0.0, 5.0, 0.0]])  # class 3: strong but absent from the label
    labels = torch.tensor([[1.0, 1.0, 0.0]])
    scores = prototype_scores(refined, bg_threshold=0.2)
    assert torch.all(scores[:, 0] == 0.2)
    # pixel 0: class 1 (1.0); pixel 1: class 2 (0.15/0.15 = 1.0 after max_norm > 0.1); pixel 2: class 3 is absent and
    # every present class scores 0 → background; pixel 3: class 1 at 0.5 > 0.2
    assert pseudo_labels(scores, labels).tolist() == [[[1, 2, 0, 1]]]
    # a present class below the background constant everywhere but its own peak
    scores2 = prototype_scores(refined, bg_threshold=0.6)
    assert pseudo_labels(scores2, labels).tolist() == [[[1, 2, 0, 0]]]


def test_masks_from_maps_is_argmax_against_a_constant_background():
    maps = torch.tensor([[[[0.3, 0.9, 0.1]], [[0.5, 0.2, 0.1]]]])  # (1, 2, 1, 3)
    assert masks_from_maps(maps, 0.4).tolist() == [[[2, 1, 0]]]
    assert masks_from_maps(maps, 0.5).tolist() == [[[0, 1, 0]]]  # a tie goes to background, as np.argmax


def test_multilabel_soft_margin_ignores_background_and_vanishes_for_confident_maps():
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    cam = torch.zeros(1, 4, 2, 2)
    cam[:, 1], cam[:, 2], cam[:, 3] = 50.0, -50.0, 50.0
    cam[:, 0] = -50.0  # the background channel is not classified: its value must not matter
    assert multilabel_cam_loss(cam, labels) < 1e-6
    cam[:, 0] = 50.0
    assert multilabel_cam_loss(cam, labels) < 1e-6
    cam[:, 2] = 50.0
    assert multilabel_cam_loss(cam, labels) > 10


def test_max_norm_max_onehot_and_min_pooling_follow_the_official_definitions():
    maps = torch.tensor([[[[-1.0, 0.5, 2.0, 1.0]]]])
    assert torch.allclose(max_norm(maps), torch.tensor([[[[0.0, 0.25, 1.0, 0.5]]]]), atol=1e-4)
    x = torch.tensor([[[[0.7]], [[0.2]], [[0.9]], [[0.4]]]])  # bg, 3 classes at one pixel
    assert max_onehot(x).flatten().tolist() == pytest.approx([0.7, 0.0, 0.9, 0.0])
    fg = torch.tensor([[[[1.0, -1.0, 3.0, 0.5]]]])  # 4 pixels, k = 1: the smallest is −1 → ReLU → 0
    assert adaptive_min_pooling_loss(fg) == 0
    assert adaptive_min_pooling_loss(fg + 2) == pytest.approx(1.0)


# ---- semi-hard mining ------------------------------------------------------------------------------------------------

def _official_intra_nce(features, positive, prototypes, tau, random_keys):
    """``contrast_train.py``'s loops, with the random half given as the pixels of smallest key per class."""
    sim = features @ prototypes.t()
    pos = sim.gather(1, positive[:, None]).squeeze(1)
    lower = sim.topk(13, dim=1).indices[:, 3:]
    negs = torch.cat([pos[:, None], sim.gather(1, lower)], 1)
    a1, a2 = torch.exp(pos / tau), torch.exp(negs / tau).sum(1)
    similarity = (pos + 1) / 2
    total, classes = 0.0, 0
    for c in range(prototypes.shape[0]):
        members = (positive == c).nonzero().flatten()
        if len(members) == 0:
            continue
        classes += 1
        n = len(members)
        if n < 2:
            continue
        random_half = members[random_keys[members].argsort()[: n // 2]]
        lowest = members[similarity[members].topk(int(n * 0.6), largest=False).indices[int(n * 0.6) - n // 2:]]
        chosen = torch.cat([random_half, lowest])
        total = total + torch.mean(-torch.log(a1[chosen] / a2[chosen]))
    return total / classes


def test_semi_hard_intra_nce_equals_the_official_loops():
    generator = torch.Generator().manual_seed(3)
    features = F.normalize(torch.randn(200, 16, generator=generator), dim=1)
    prototypes = F.normalize(torch.randn(21, 16, generator=generator), dim=1)
    positive = torch.randint(0, 21, (200,), generator=generator)
    positive[:1] = 20  # make sure some class is a singleton or small
    ours = semi_hard_intra_nce(features, positive, prototypes, 0.1, generator=torch.Generator().manual_seed(7))
    keys = torch.rand(200, generator=torch.Generator().manual_seed(7))
    assert ours == pytest.approx(float(_official_intra_nce(features, positive, prototypes, 0.1, keys)), rel=1e-5)


def test_semi_hard_negatives_exclude_the_three_most_similar_and_count_ten():
    # one pixel of class 0; prototypes 1..3 the most similar, 4..13 next, 14..20 far: only 4..13 may be negatives
    prototypes = torch.zeros(21, 21)
    prototypes[0, 0] = 1.0
    feature = torch.zeros(1, 21)
    feature[0, 0] = 0.5
    for c in range(1, 21):
        prototypes[c, c] = 1.0
        feature[0, c] = (21 - c) * 0.01
    feature = F.normalize(feature, dim=1)
    prototypes = F.normalize(prototypes + 0.0, dim=1)
    # one more pixel of class 0 so that the class is sampled (n = 2: one random, one from the hard band)
    features = torch.cat([feature, feature])
    positive = torch.zeros(2, dtype=torch.long)
    loss = semi_hard_intra_nce(features, positive, prototypes, tau := 0.1)
    sim = feature @ prototypes.t()
    ranked = sim[0].argsort(descending=True)
    negatives = ranked[3:13]
    assert sorted(negatives.tolist()) == list(range(3, 13))
    expected = torch.logsumexp(torch.cat([sim[0, :1], sim[0, negatives]]) / tau, 0) - sim[0, 0] / tau
    assert len(negatives) == 10
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_contrast_terms_are_symmetric_in_the_views():
    model = small_ppc(use_intra=False)
    model.eval()
    images = torch.randn(3, 3, 16, 16)
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)
    a, b = model.net(images), model.net(images.flip(-1))
    forward, swapped = model.contrast_losses(a, b, labels), model.contrast_losses(b, a, labels)
    for key in ("cross_nce", "cross_cam_nce"):
        assert float(forward[key]) == pytest.approx(float(swapped[key]), rel=1e-5)
        assert forward[key] > 0


# ---- mIoU --------------------------------------------------------------------------------------------------------

def test_sweep_iou_equals_torchmetrics_at_every_threshold_with_an_ignore_region():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 4, 6, 7, generator=generator)
    target = torch.randint(0, 5, (3, 6, 7), generator=generator)
    target[:, 0, :] = 255  # an ignored border
    thresholds = (0.0, 0.2, 0.5, 0.8, 0.95)
    sweep = ThresholdSweepIoU(5, thresholds)
    sweep.update(maps[:2], target[:2])
    sweep.update(maps[2:], target[2:])
    for i, t in enumerate(thresholds):
        reference = MulticlassJaccardIndex(5, average="none", ignore_index=255)
        reference.update(masks_from_maps(maps, t), target)
        assert float(sweep.compute()[i]) == pytest.approx(float(reference.compute().mean()), abs=1e-6)


def test_miou_on_a_hand_made_mask_with_an_ignore_region():
    target = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 255]]])
    perfect = torch.zeros(1, 2, 2, 4)  # 2 foreground maps
    perfect[0, 0] = (target[0] == 1).float()
    perfect[0, 0, 1, 3] = 0.0  # under the ignore region anything goes
    sweep = ThresholdSweepIoU(3, (0.5,))
    sweep.update(perfect, target)
    # classes 0 and 1 perfect, class 2 absent from truth and prediction → 0 (VOC's eval.py): mIoU = 2/3
    assert float(sweep.curve()[0]) == pytest.approx(2 / 3)
    everything_bg = ThresholdSweepIoU(3, (0.5,))
    everything_bg.update(torch.zeros(1, 2, 2, 4), target)
    # IoU_bg = 4 / 7 (7 non-ignored pixels), the other classes 0 → mIoU = IoU_bg / C
    assert float(everything_bg.curve()[0]) == pytest.approx(4 / 7 / 3)
    with pytest.raises(ValueError, match="outside 0..2"):
        ThresholdSweepIoU(3, (0.5,)).update(perfect, target.clamp(max=3) + (target == 1).long() * 2)


def test_sweep_best_picks_the_threshold_with_the_highest_miou():
    target = torch.tensor([[[0, 1, 1, 0]]])
    maps = torch.tensor([[[[0.3, 0.9, 0.6, 0.5]]]])
    sweep = ThresholdSweepIoU(2, (0.0, 0.4, 0.55, 0.7))
    sweep.update(maps, target)
    best, threshold = sweep.best()
    assert threshold == 0.55 and best == pytest.approx(1.0)


def _sweep_shard(rank, world, init_file, maps, target, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sweep = ThresholdSweepIoU(5, (0.0, 0.3, 0.6))
    sweep.update(maps[rank::world], target[rank::world])  # uneven shards: 3 images on rank 0, 2 on rank 1
    curve = sweep.compute()
    # prototypes from the gathered batch equal the single-process ones
    scores = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    features = torch.randn(5, 6, 4, 4, generator=torch.Generator().manual_seed(2))
    protos = estimate_prototypes(*gather_batches(scores[rank::world], features[rank::world]), k=6)
    torch.save({"curve": curve, "protos": protos}, f"{out}_{rank}.pt")
    dist.destroy_process_group()


def test_two_process_miou_and_prototypes_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 4, 8, 8, generator=generator)
    target = torch.randint(0, 5, (5, 8, 8), generator=generator)
    target[:, :, 0] = 255
    mp.spawn(_sweep_shard, args=(2, tmp_path / "init", maps, target, tmp_path / "m"), nprocs=2)
    single = ThresholdSweepIoU(5, (0.0, 0.3, 0.6))
    single.update(maps, target)
    scores = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    features = torch.randn(5, 6, 4, 4, generator=torch.Generator().manual_seed(2))
    # the ranks gather rank 0's images (0, 2, 4) then rank 1's (1, 3): the same set as the whole batch
    expected = estimate_prototypes(scores, features, k=6)
    for rank in range(2):
        result = torch.load(tmp_path / f"m_{rank}.pt")
        assert torch.allclose(result["curve"], single.compute(), atol=1e-12)
        assert torch.allclose(result["protos"], expected, atol=1e-5)


# ---- optimisation ------------------------------------------------------------------------------------------------

def test_poly_schedule_keeps_the_1_2_10_20_group_ratios():
    model = small_ppc(lr=0.01)
    model.net.projection.bias = torch.nn.Parameter(torch.zeros(8))  # the official heads have none: add one
    groups = model.parameter_groups()
    assert [g["name"] for g in groups] == ["backbone_weights", "backbone_biases", "new_weights", "new_biases"]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.02, 0.1, 0.2])
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0, 5e-4, 0.0]
    new = {id(p) for m in model.net.new_layers() for p in m.parameters()}
    assert all(id(p) in new for g in groups[2:] for p in g["params"])
    assert all(id(p) not in new for g in groups[:2] for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.net.parameters()))
    optimizer = torch.optim.SGD(groups, lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: poly(s, 10))
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    factor = (1 - 4 / 10) ** 0.9
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01 * factor * r for r in (1, 2, 10, 20)])


# ---- the whole step --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, terms", [
    (dict(use_er=False, use_pcm=False, use_min_pool=False, use_cross_proto=False, use_cross_cam=False,
          use_intra=False), {"cls"}),
    (dict(use_cross_proto=False, use_cross_cam=False, use_intra=False), {"cls", "er", "ecr"}),
    (dict(), {"cls", "er", "ecr", "cross_nce", "cross_cam_nce", "intra_nce"}),
])
def test_ablation_flags_select_the_loss_terms(variant, terms):
    model = small_ppc(**variant)
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.float32)
    losses = model.training_losses(torch.randn(2, 3, 32, 32), labels)
    assert set(losses) - {"loss"} >= terms
    active = {k for k, v in losses.items() if k != "loss" and float(v) != 0}
    assert active == terms
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert model.net.classifier.weight.grad.abs().sum() > 0


def test_multiscale_maps_are_label_masked_and_normalised():
    model = small_ppc()
    model.eval()
    labels = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.float32)
    maps = model.multiscale_maps(torch.randn(2, 3, 32, 32), labels)
    assert maps.shape == (2, 4, 32, 32)
    assert torch.all(maps[0, 1:3] == 0) and torch.all(maps[1] == 0)
    assert float(maps[0, 0].max()) == pytest.approx(1.0, abs=1e-3) and float(maps.min()) >= 0
    # flipping the image flips the maps (the flip is averaged in)
    images = torch.randn(1, 3, 32, 32)
    one = model.multiscale_maps(images, labels[:1])
    assert torch.allclose(model.multiscale_maps(images.flip(-1), labels[:1]), one.flip(-1), atol=1e-4)


def test_mixed_precision_losses_are_float32_and_finite():
    model = small_ppc()
    labels = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.training_losses(torch.randn(2, 3, 32, 32) * 50, labels)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_palette_png_round_trip_keeps_class_ids(tmp_path):
    from zoo.wsss.evaluation import MaskWriter

    class Trainer:
        datamodule = None

    mask = np.array([[0, 1, 2], [255, 20, 0]], dtype=np.uint8)
    rows = MaskWriter().rows({"name": ["2007_000032"], "mask": torch.from_numpy(mask)[None]}, None, 0, tmp_path,
                             Trainer(), None)
    image = Image.open(tmp_path / "2007_000032.png")
    assert image.mode == "P" and np.array_equal(np.asarray(image), mask)
    assert rows == [("2007_000032", "1 2 20")]


# ---- the CLI: configs, pipeline, VOC format ----------------------------------------------------------------------

def _quiet(tmp_path, name):
    return ["--trainer.logger=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / name}"]


def _written_folder(stdout: str):
    from pathlib import Path

    line = next(line for line in stdout.splitlines() if "predictions written to" in line)
    return Path(line.split(" written to ")[1].split("/ (")[0])


def test_digits_pipeline_fit_predict_palette_masks_then_stage2(tmp_path, capsys):
    from conftest import ROOT

    from zoo.cli import ZooCLI

    data = ["--data.init_args.root=" + str(tmp_path / "data"), "--data.init_args.n_train=64",
            "--data.init_args.n_train_eval=32", "--data.init_args.n_val=32", "--data.init_args.eval_batch_size=32"]
    config = str(ROOT / "configs" / "wsss" / "ppc_digits.yaml")
    cli = ZooCLI(args=["fit", "-c", config, *data, *_quiet(tmp_path, "ppc"), "--trainer.max_epochs=1",
                       "--trainer.check_val_every_n_epoch=1", "--model.init_args.scales=[1.0]"])
    metrics = cli.trainer.callback_metrics  # (validation ran too: test replaces its keys)
    assert {"test/cam_miou", "test/cam_miou_oracle", "test/bg_threshold"} <= set(metrics)
    table = (tmp_path / "ppc" / "version_0" / "tables" / "val_miou_vs_bg_threshold.csv").read_text().splitlines()
    curve = [[float(x) for x in row.split(",")] for row in table[1:]]
    assert table[0] == "bg_threshold,pseudo_miou,val_miou"
    assert [row[0] for row in curve] == pytest.approx([0.01 * i for i in range(96)])  # the config's sweep_max 0.95
    best = max(curve, key=lambda row: row[1])
    assert 0 < best[1] <= 1
    # the threshold chosen on the training canvases is saved with the checkpoint and used by test and predict
    checkpoint = next((tmp_path / "ppc").glob("version_*/checkpoints/last.ckpt"))
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert float(state["bg_threshold"]) == pytest.approx(best[0])
    assert float(metrics["test/bg_threshold"]) == pytest.approx(best[0])
    assert float(metrics["test/cam_miou"]) == pytest.approx(best[2], abs=1e-5)  # val = test split on the canvases
    assert (tmp_path / "ppc" / "version_0" / "masks").is_dir()  # the panel (no logger: PNG grids)

    capsys.readouterr()
    ZooCLI(args=["predict", "-c", config, *data, *_quiet(tmp_path, "ppc"), f"--ckpt_path={checkpoint}",
                 "--model.init_args.scales=[1.0]"])
    folder = _written_folder(capsys.readouterr().out)
    masks = sorted(folder.glob("*.png"))
    assert len(masks) == 64  # every train_aug canvas
    image = Image.open(masks[0])
    assert image.mode == "P" and np.asarray(image).max() <= 10

    stage2 = ZooCLI(args=["fit", "-c", str(ROOT / "configs" / "wsss" / "deeplab_digits.yaml"), *data,
                          f"--data.init_args.pseudo_mask_dir={folder}", *_quiet(tmp_path, "seg"),
                          "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1"])
    metrics = stage2.trainer.callback_metrics
    assert "test/miou" in metrics
    assert 0 < float(metrics["test/miou"]) <= 1


@pytest.mark.parametrize("config", ["ppc_voc", "deeplab_voc"])
def test_voc_configs_train_evaluate_and_predict_on_a_voc_tree(config, tmp_path, capsys):
    from conftest import ROOT
    from test_wsss_data import voc_tree

    from zoo.cli import ZooCLI

    root = tmp_path / "VOC2012"
    voc_tree(root)
    path = str(ROOT / "configs" / "wsss" / f"{config}.yaml")
    args = ["-c", path, f"--data.init_args.root={root}", "--model.init_args.backbone.init_args.name=resnet18",
            "--model.init_args.backbone.init_args.pretrained=false", "--data.init_args.crop_size=32",
            "--data.init_args.resize_long=[32,48]", "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
            "--trainer.precision=32-true", *_quiet(tmp_path, "run"), "--trainer.callbacks=[]"]
    if config == "ppc_voc":
        args += ["--model.init_args.second_view_size=16", "--model.init_args.scales=[1.0,0.5]"]
    else:
        args += [f"--data.init_args.pseudo_mask_dir={root / 'SegmentationClassAug'}"]
    cli = ZooCLI(args=["fit", *args, "--trainer.max_steps=2"])
    assert cli.trainer.global_step == 2
    key = "test/cam_miou" if config == "ppc_voc" else "test/miou"
    assert key in cli.trainer.callback_metrics
    checkpoint = next((tmp_path / "run").glob("version_*/checkpoints/last.ckpt"))
    capsys.readouterr()
    ZooCLI(args=["predict", *args, f"--ckpt_path={checkpoint}"])
    folder = _written_folder(capsys.readouterr().out)
    written = {p.stem for p in folder.glob("*.png")}
    # PPC exports the pseudo masks of train_aug; the segmentation network predicts val
    assert written == ({"2007_000032", "2007_000039", "2008_000123"} if config == "ppc_voc" else {"2008_000123"})
    for name in written:
        size = Image.open(root / "JPEGImages" / f"{name}.jpg").size
        assert Image.open(folder / f"{name}.png").size == size


@pytest.mark.slow  # 2-process DDP fit and test on the CPU, about a minute
def test_two_process_ddp_trains_and_scores_the_same_miou_as_one_process(tmp_path):
    from conftest import ROOT, results_from_stdout, run_zoo

    config = str(ROOT / "configs" / "wsss" / "ppc_digits.yaml")
    data = [f"--data.init_args.root={tmp_path / 'data'}", "--data.init_args.n_train=64",
            "--data.init_args.n_train_eval=30", "--data.init_args.n_val=31", "--data.init_args.eval_batch_size=8",
            "--model.init_args.scales=[1.0,0.5]", "--model.init_args.contrast_start_epoch=0",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]
    # training under DDP: the prototypes come from both ranks' batches (gather_batches)
    fit = run_zoo("fit", "-c", config, *data, "--trainer.max_epochs=1", "--trainer.devices=2",
                  "--trainer.strategy=ddp", f"--trainer.default_root_dir={tmp_path / 'fit'}", "--test_after_fit=false",
                  timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert fit.returncode == 0, fit.stderr[-3000:]
    checkpoint = next((tmp_path / "fit").glob("version_*/checkpoints/last.ckpt"))

    def scores(devices: int) -> dict:
        result = run_zoo("test", "-c", config, *data, f"--trainer.devices={devices}",
                         *(["--trainer.strategy=ddp"] if devices > 1 else []), f"--ckpt_path={checkpoint}",
                         f"--trainer.default_root_dir={tmp_path / str(devices)}", timeout=600,
                         env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        return results_from_stdout(result.stdout, "test/")

    one, two = scores(1), scores(2)  # 31 val canvases: uneven shards of 16 and 15
    assert set(one) == {"test/cam_miou", "test/cam_miou_oracle", "test/bg_threshold"} and set(two) == set(one)
    for name in one:
        assert two[name] == pytest.approx(one[name], abs=1e-6), name


@pytest.mark.parametrize("config", ["cam_digits", "seam_digits"])
def test_ablation_configs_fast_dev_run(config, tmp_path):
    from conftest import ROOT

    from zoo.cli import ZooCLI

    cli = ZooCLI(args=["fit", "-c", str(ROOT / "configs" / "wsss" / f"{config}.yaml"),
                       f"--data.init_args.root={tmp_path / 'data'}", "--data.init_args.n_train=32",
                       "--data.init_args.n_train_eval=16", "--data.init_args.n_val=16", "--trainer.fast_dev_run=true",
                       *_quiet(tmp_path, "run")])
    assert cli.trainer.global_step == 1
    flags = {k: v for k, v in cli.model.hparams.items() if k.startswith("use_")}
    assert not flags["use_cross_proto"] and not flags["use_intra"] and flags["use_pcm"] == (config == "seam_digits")

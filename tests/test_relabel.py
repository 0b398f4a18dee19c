"""ReLabel (Yun et al. 2021): label maps, LabelPooling, the soft-target loss, CutMix, the data on disk and the CLI."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, quiet_args, results_from_stdout, run_zoo
from PIL import Image
from torchvision.transforms import v2

from datamodules.base import CorruptImageError, DatasetNotFoundError
from datamodules.classification import (LabelMapImageFolder, RandomResizedCropWithBox, ReLabelDigitCanvasDataModule,
                                        ReLabelImageFolderDataModule, load_label_map)
from zoo.backbones import ConvNet
from zoo.classification.relabel import (LabelPooling, ReLabelClassifier, cutmix, dense_class_scores,
                                        densify_label_maps, label_map_from_scores, soft_target_cross_entropy)
from zoo.cli import ZooCLI

RELABEL_DIGITS = ROOT / "configs" / "classification" / "relabel_digits.yaml"
CLASS_A, CLASS_B, CLASS_C = 3, 7, 5


def half_and_half_map(size: int = 15, num_classes: int = 10, top_k: int = 2) -> torch.Tensor:
    """A (1, 2, k, size, size) label map: class A scores high on the LEFT half, class B on the TOP half (so a box's
    x and y ranges are told apart), a weak class C everywhere."""
    dense = torch.zeros(1, num_classes, size, size)
    dense[0, CLASS_C] = 1.0
    dense[0, CLASS_A, :, : size // 2] = 6.0
    dense[0, CLASS_B, : size // 2, :] = 5.0
    return label_map_from_scores(dense, top_k)


# ---- the label map and LabelPooling --------------------------------------------------------------------------------


def test_densify_puts_the_top_k_scores_in_their_class_channels_and_zero_elsewhere():
    scores = torch.randn(2, 6, 3, 4)
    label_maps = label_map_from_scores(scores, top_k=2)
    assert label_maps.shape == (2, 2, 2, 3, 4) and label_maps.dtype == torch.float32
    dense = densify_label_maps(label_maps, 6)
    top2 = scores.topk(2, dim=1)
    assert torch.equal(dense.gather(1, top2.indices), top2.values)
    assert ((dense != 0).sum(dim=1) == 2).all()  # k non-zero classes per cell, the rest 0


def test_a_box_over_the_left_half_pools_the_left_class_and_over_the_right_half_another():
    pooling = LabelPooling(10, "localized")
    label_map = half_and_half_map().expand(2, -1, -1, -1, -1)
    left_half, right_half = [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]
    probs = pooling(torch.tensor([0, 0]), torch.tensor([left_half, right_half]), label_map)
    assert probs[0].argmax() == CLASS_A  # with (y1, x1, y2, x2) as the official code passes, this box is the top half: B
    assert probs[1].argmax() == CLASS_B
    bottom_half = pooling(torch.tensor([0]), torch.tensor([[0.0, 0.5, 1.0, 1.0]]), label_map[:1])
    assert bottom_half[0].argmax() == CLASS_A and bottom_half[0, CLASS_B] < probs[1, CLASS_B]


def test_mirroring_the_image_swaps_the_classes_of_the_left_and_right_boxes():
    pooling = LabelPooling(10, "localized")
    mirrored = half_and_half_map().flip(-1)  # the map of the horizontally flipped image
    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]])
    probs = pooling(torch.tensor([0, 0]), boxes, mirrored.expand(2, -1, -1, -1, -1))
    assert probs[0].argmax() == CLASS_B and probs[1].argmax() == CLASS_A


def test_the_whole_image_box_averages_every_cell_exactly():
    label_maps = label_map_from_scores(torch.randn(3, 8, 5, 7) * 3, top_k=3)
    expected = densify_label_maps(label_maps, 8).mean(dim=(2, 3)).softmax(-1)
    for mode, boxes in (("localized", torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)), ("global", torch.rand(3, 4))):
        probs = LabelPooling(8, mode)(torch.zeros(3), boxes, label_maps)
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_original_mode_is_the_one_hot_dataset_label():
    probs = LabelPooling(4, "original")(torch.tensor([2, 0]))
    assert torch.equal(probs, torch.tensor([[0.0, 0, 1, 0], [1, 0, 0, 0]]))


def test_label_pooling_under_bf16_autocast_stays_finite_and_float32():
    label_maps = label_map_from_scores(torch.randn(4, 1000, 15, 15) * 2000, top_k=5)  # scores far past bf16's range
    boxes = torch.tensor([[0.1, 0.2, 0.6, 0.9]] * 4)
    pooling = LabelPooling(1000, "localized")
    reference = pooling(torch.zeros(4), boxes, label_maps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = pooling(torch.zeros(4), boxes, label_maps)
    assert probs.dtype == torch.float32 and torch.isfinite(probs).all()
    torch.testing.assert_close(probs, reference)
    # bf16 would round the class index 999 to 1000: a map cast to 16 bits is refused, not pooled into wrong classes
    with pytest.raises(TypeError, match="float32"):
        pooling(torch.zeros(4), boxes, label_maps.bfloat16())


def test_label_pooling_needs_no_gradient():
    label_maps = label_map_from_scores(torch.randn(2, 5, 4, 4, requires_grad=True), top_k=2)
    assert not LabelPooling(5)(torch.zeros(2), torch.rand(2, 4).sort(-1).values, label_maps).requires_grad


# ---- the loss and CutMix -------------------------------------------------------------------------------------------


def test_soft_target_cross_entropy_is_cross_entropy_for_one_hot_targets_and_its_gradient_is_softmax_minus_target():
    logits = torch.randn(5, 7, requires_grad=True)
    labels = torch.tensor([0, 3, 6, 2, 2])
    loss = soft_target_cross_entropy(logits, F.one_hot(labels, 7).float())
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    targets = torch.rand(5, 7).softmax(-1)
    (grad,) = torch.autograd.grad(soft_target_cross_entropy(logits, targets), logits)
    torch.testing.assert_close(grad, (logits.softmax(-1) - targets) / 5)


def test_cutmix_mixes_the_targets_by_the_share_of_the_image_left_unpasted():
    torch.manual_seed(3)
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 10, 12).clone()
    targets = torch.eye(4)
    mixed, mixed_targets, lam = cutmix(images, targets, alpha=1.0)
    pasted = (mixed != images).any(dim=0)[0]  # one box for the whole batch
    assert 0 < pasted.float().mean() < 1
    torch.testing.assert_close(pasted.float().mean().item(), 1 - lam)  # λ = 1 − pasted share, after clipping
    partner = mixed[:, 0][:, pasted][:, 0].long()  # whose pixels each image received (itself for a fixed point)
    assert torch.equal(mixed[:, 0][:, ~pasted], images[:, 0][:, ~pasted])
    torch.testing.assert_close(mixed_targets, lam * targets + (1 - lam) * targets[partner])


# ---- crops and data on disk ------------------------------------------------------------------------------------------


def test_the_recorded_box_reproduces_the_crop_from_the_original_image():
    image = torch.rand(3, 37, 53)
    crop = RandomResizedCropWithBox(16, scale=(0.1, 0.9))
    torch.manual_seed(0)
    for _ in range(5):
        out, box = crop(image)
        x1, y1, x2, y2 = (box * torch.tensor([53, 37, 53, 37])).round().long().tolist()
        again = v2.functional.resized_crop(image, y1, x1, y2 - y1, x2 - x1, [16, 16], antialias=True)
        assert torch.equal(out, again)
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1


def write_imagenet_like(root: Path, classes=("n01440764", "n01443537"), per_class: int = 2, num_classes: int = 2,
                        top_k: int = 2) -> tuple[Path, Path]:
    """ImageNet's train/ and val/ class folders (JPEG files) and a label-map tree ``<class>/<stem>.pt`` of
    (2, k, 15, 15) float tensors, as the released archive unpacks."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, wnid in enumerate(classes):
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (30 + 10 * i, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{i}.JPEG")
                if split == "train":
                    (root / "maps" / wnid).mkdir(parents=True, exist_ok=True)
                    scores = torch.zeros(1, num_classes, 15, 15)
                    scores[0, c] = 4.0
                    torch.save(label_map_from_scores(scores, top_k)[0], root / "maps" / wnid / f"{wnid}_{i}.pt")
    return root, root / "maps"


def test_imagenet_layout_gives_crops_boxes_and_the_mirrored_label_map_and_validates_on_single_labels(tmp_path):
    root, maps = write_imagenet_like(tmp_path)
    data = ReLabelImageFolderDataModule(root=str(root), label_maps=str(maps), image_size=24, batch_size=2,
                                        num_workers=0)
    data.setup("fit")
    image, label, box, label_map = data.train_set[3]
    assert image.shape == (3, 24, 24) and label == 1 and box.shape == (4,) and label_map.shape == (2, 2, 15, 15)
    assert data.train_set.label_map_path(3) == maps / "n01443537" / "n01443537_1.pt"
    val_batch = next(iter(data.val_dataloader()))
    assert len(val_batch) == 2 and val_batch[1].tolist() == [0, 0]  # images and hard labels, no maps


def test_missing_or_malformed_label_maps_fail_with_the_file(tmp_path):
    root, maps = write_imagenet_like(tmp_path)
    missing = maps / "n01440764" / "n01440764_1.pt"
    missing.unlink()
    data = ReLabelImageFolderDataModule(root=str(root), label_maps=str(maps), image_size=24, num_workers=0)
    data.setup("fit")
    with pytest.raises(DatasetNotFoundError, match="n01440764_1.pt"):
        data.train_set[1]
    torch.save(torch.zeros(5, 15, 15), missing)
    with pytest.raises(CorruptImageError, match=r"n01440764_1.pt.*\(5, 15, 15\)"):
        load_label_map(missing)
    torch.save(torch.stack([torch.ones(2, 3, 3), torch.full((2, 3, 3), 12.0)]), missing)
    with pytest.raises(CorruptImageError, match=r"n01440764_1.pt.*\[0, 5\)"):
        load_label_map(missing, num_classes=5)
    with pytest.raises(DatasetNotFoundError, match="label maps"):
        ReLabelImageFolderDataModule(root=str(root), label_maps=str(tmp_path / "nowhere"), num_workers=0).setup("fit")


def test_the_dashboard_example_keeps_the_original_image_and_its_seeded_box(tmp_path):
    root, maps = write_imagenet_like(tmp_path)
    crop = RandomResizedCropWithBox(8)
    dataset = LabelMapImageFolder(root / "train", maps, crop, v2.Compose([v2.ToImage()]))
    original, box, label, label_map = dataset.crop_example(0, seed=5)
    again = dataset.crop_example(0, seed=5)
    assert original.shape == (3, 30, 40) and torch.equal(box, again[1]) and label == 0 and label_map.shape[0] == 2


# ---- the embedded default, the CLI and label maps from a checkpoint ------------------------------------------------


@pytest.fixture(scope="module")
def small_canvas_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("relabel") / "digits"
    ReLabelDigitCanvasDataModule(root=str(root), teacher_epochs=2).prepare_data()
    return root


def small_run(root: Path, data_root: Path, *extra: str) -> list[str]:
    return quiet_args(root, f"--data.init_args.root={data_root}", "--data.init_args.teacher_epochs=2",
                      "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
                      *extra, config=RELABEL_DIGITS)


def test_digit_canvases_are_labelled_by_the_left_digit_and_their_maps_see_both(small_canvas_set):
    data = ReLabelDigitCanvasDataModule(root=str(small_canvas_set), teacher_epochs=2)
    data.setup("fit")
    with open(small_canvas_set / "test_canvases.csv") as f:
        assert next(csv.reader(f)) == ["file", "left", "right"]
    maps = torch.stack([data.train_set[i][3] for i in range(0, len(data.train_set), 50)])
    labels = torch.tensor([data.train_set.samples[i][1] for i in range(0, len(data.train_set), 50)])
    n = len(maps)
    left = LabelPooling(10)(labels, torch.tensor([[0.0, 0.0, 0.5, 1.0]]).expand(n, 4), maps).argmax(-1)
    right = LabelPooling(10)(labels, torch.tensor([[0.5, 0.0, 1.0, 1.0]]).expand(n, 4), maps).argmax(-1)
    # even a 2-epoch teacher finds the labelled digit on the left (10 % by chance) and another one on the right
    assert (left == labels).float().mean() > 0.5 and (right != labels).float().mean() > 0.8
    image, label_a, label_b = data.either_label_test_set[0]
    assert image.shape == (1, 16, 32) and label_a != label_b


def test_relabel_digits_config_trains_and_tests_on_single_and_whole_canvases(tmp_path, small_canvas_set, capsys):
    args = small_run(tmp_path, small_canvas_set, "--test_after_fit=true", "--trainer.limit_test_batches=2",
                     "--trainer.callbacks=[{class_path: zoo.classification.relabel.EitherLabelAccuracy},"
                     " {class_path: zoo.classification.relabel.LabelPoolingLogger, init_args: {num_images: 2}}]")
    cli = ZooCLI(args=["fit", *args])
    assert isinstance(cli.model, ReLabelClassifier) and cli.model.label_pooling.label_mode == "localized"
    metrics = results_from_stdout(capsys.readouterr().out)
    assert {"test/acc", "test/either_acc"} <= set(metrics)
    assert (Path(cli.trainer.default_root_dir) / "relabel" / "epoch=000.png").is_file()


def test_label_maps_written_by_zoo_predict_are_the_checkpoints_dense_scores(tmp_path, small_canvas_set):
    ZooCLI(args=["fit", *small_run(tmp_path / "teacher", small_canvas_set)])
    ckpt = tmp_path / "teacher" / "version_0" / "checkpoints" / "last.ckpt"
    folder = tmp_path / "to_relabel"
    for name in ("3/00000.png", "3/00001.png", "8/00002.png"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes((small_canvas_set / "train" / "0" / "00000.png").read_bytes())
    out = tmp_path / "maps"
    ZooCLI(args=["predict", *small_run(tmp_path / "teacher", small_canvas_set, f"--ckpt_path={ckpt}",
                                       f"--data.init_args.predict_dir={folder}",
                                       "--trainer.callbacks=[{class_path: zoo.classification.relabel.LabelMapWriter,"
                                       f" init_args: {{top_k: 4, output_dir: {out}}}}}]")])
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.pt"))
    assert written == ["3/00000.pt", "3/00001.pt", "8/00002.pt"]  # <class>/<stem>.pt, as the loader reads them
    model = ReLabelClassifier.load_from_checkpoint(ckpt).eval()
    image = v2.functional.to_dtype(v2.functional.to_image(Image.open(folder / "8/00002.png")), torch.float32, scale=True)
    with torch.no_grad():
        expected = label_map_from_scores(dense_class_scores(model, image[None]), 4)[0]
    torch.testing.assert_close(load_label_map(out / "8/00002.pt", 10), expected)
    assert expected.shape == (2, 4, 4, 8)


def test_dense_scores_average_to_the_classifier_logits():
    model = ReLabelClassifier(backbone=ConvNet(in_chans=1, widths=[8, 16], num_pools=2), num_classes=4).eval()
    images = torch.rand(3, 1, 16, 24)
    torch.testing.assert_close(dense_class_scores(model, images).mean(dim=(2, 3)), model(images))


@pytest.mark.slow
def test_localized_relabel_beats_the_original_label_on_single_digits(tmp_path):
    """Seed 0 of the documented comparison (docs/models/relabel.md): the full config, original vs localized."""
    accuracy = {}
    for mode in ("original", "localized"):
        result = run_zoo("fit", "-c", str(RELABEL_DIGITS), f"--trainer.default_root_dir={tmp_path / mode}",
                         f"--data.init_args.root={tmp_path / 'data'}", f"--model.init_args.label_mode={mode}",
                         "--trainer.logger=false", "--trainer.enable_progress_bar=false", timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        accuracy[mode] = results_from_stdout(result.stdout)["test/acc"]
    assert accuracy["localized"] > accuracy["original"], accuracy


@pytest.mark.slow  # two 2-process DDP runs on the CPU, about a minute
def test_two_process_test_scores_what_one_process_scores(tmp_path, small_canvas_set):
    ZooCLI(args=["fit", *small_run(tmp_path / "fit", small_canvas_set)])
    ckpt = tmp_path / "fit" / "version_0" / "checkpoints" / "last.ckpt"

    def scores(*extra: str) -> dict[str, float]:
        args = quiet_args(tmp_path / str(len(extra)), f"--ckpt_path={ckpt}", f"--data.init_args.root={small_canvas_set}",
                          "--data.init_args.teacher_epochs=2", "--trainer.accelerator=cpu",
                          "--trainer.callbacks=[{class_path: zoo.classification.relabel.EitherLabelAccuracy}]", *extra,
                          config=RELABEL_DIGITS)
        result = run_zoo("test", *args, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        return results_from_stdout(result.stdout, "test/")

    one = scores("--trainer.devices=1")
    two = scores("--trainer.devices=2", "--trainer.strategy=ddp")
    assert {"test/acc", "test/either_acc"} <= set(one) and set(one) == set(two)
    for name in ("test/acc", "test/either_acc"):  # every image scored once, the ranks' counts summed
        assert two[name] == pytest.approx(one[name], abs=1e-6), name


def test_cutmix_is_off_in_the_last_cutmix_off_epochs():
    from types import SimpleNamespace

    model = ReLabelClassifier(backbone=ConvNet(in_chans=1, widths=[4], num_pools=1), num_classes=3, cutmix_prob=1.0,
                              cutmix_off_epochs=2)
    used = []
    for epoch in range(5):
        model._trainer = SimpleNamespace(max_epochs=5, current_epoch=epoch)
        used.append(model.use_cutmix())
    assert used == [True, True, True, False, False]


def test_imagenet_config_fast_dev_run_on_the_imagenet_layout(tmp_path):
    # The official recipe's config on a 2-class ImageNet-layout fixture with its label maps (ResNet-50 at 32 px).
    root, maps = write_imagenet_like(tmp_path / "imagenet")
    cli = ZooCLI(args=["fit", *quiet_args(tmp_path / "run", "--trainer.fast_dev_run=true",
                                          f"--data.init_args.root={root}", f"--data.init_args.label_maps={maps}",
                                          "--data.init_args.image_size=32", "--data.init_args.batch_size=2",
                                          "--data.init_args.num_workers=0", "--data.init_args.pin_memory=false",
                                          "--model.init_args.num_classes=2", "--trainer.precision=32-true",
                                          config=ROOT / "configs" / "classification" / "relabel_resnet50_imagenet.yaml")])
    assert cli.trainer.global_step == 1 and cli.model.label_pooling.label_mode == "localized"

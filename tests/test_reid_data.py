"""Re-ID data: Market/Duke name parsing, junk and distractor rules, CamStyle names and sampling, loaders, configs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.base import DatasetNotFoundError
from datamodules.reid import (CamStyleTargetDataset, CrossDomainReIDDataModule, RandomSizedRectCrop, camstyle_path,
                              parse_reid_folder)


def _jpeg(path: Path, seed: int, size=(8, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def write_market(root: Path, train_ids=(2, 7, 11), test_ids=(3, 5), cams=3, per_cam=2, camstyle=True) -> Path:
    """A tiny Market-1501 in its real layout and names (plus -1 junk and 0000 distractors in the gallery)."""
    seed = 0
    for folder, ids, start in (("bounding_box_train", train_ids, 0), ("bounding_box_test", test_ids, 10)):
        for pid in ids:
            for cam in range(1, cams + 1):
                for k in range(per_cam):
                    seed += 1
                    name = f"{pid:04d}_c{cam}s1_{start + k:06d}_0{k + 1}.jpg"
                    _jpeg(root / folder / name, seed)
                    if folder == "bounding_box_train" and camstyle:
                        for other in range(1, cams + 1):
                            if other != cam:
                                _jpeg(root / "bounding_box_train_camstyle" / f"{name[:-4]}_fake_{cam}to{other}.jpg", seed + 1000 * other)
    for pid in test_ids:
        for cam in (1, 2):
            seed += 1
            _jpeg(root / "query" / f"{pid:04d}_c{cam}s1_{900:06d}_00.jpg", seed)
    _jpeg(root / "bounding_box_test" / "-1_c1s1_000001_00.jpg", 1)
    _jpeg(root / "bounding_box_test" / "0000_c2s1_000002_00.jpg", 2)
    (root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")  # shipped with real Market-1501
    return root


def test_parser_drops_junk_keeps_distractors_and_relabels(tmp_path):
    root = write_market(tmp_path / "market")
    gallery = parse_reid_folder(root / "bounding_box_test")
    assert -1 not in gallery.pids.tolist() and 0 in gallery.pids.tolist()
    assert len(gallery.paths) == 2 * 3 * 2 + 1  # two ids × 3 cameras × 2, plus the distractor; junk dropped
    assert set(gallery.cams.tolist()) == {0, 1, 2}  # 1-based cameras become 0-based
    train = parse_reid_folder(root / "bounding_box_train", relabel=True)
    assert sorted(set(train.pids.tolist())) == [0, 1, 2]
    raw = parse_reid_folder(root / "bounding_box_train")
    # Relabelling keeps the sorted order: pid 2 → 0, 7 → 1, 11 → 2.
    assert dict(zip(raw.pids.tolist(), train.pids.tolist())) == {2: 0, 7: 1, 11: 2}


def test_parser_reads_duke_names_and_refuses_foreign_names(tmp_path):
    _jpeg(tmp_path / "duke" / "0005_c2_f0046985.jpg", 0)
    _jpeg(tmp_path / "duke" / "0005_c8_f0046999.jpg", 1)
    records = parse_reid_folder(tmp_path / "duke")
    assert records.pids.tolist() == [5, 5] and records.cams.tolist() == [1, 7]
    _jpeg(tmp_path / "duke" / "holiday.jpg", 2)
    with pytest.raises(ValueError, match="holiday.jpg"):
        parse_reid_folder(tmp_path / "duke")


def test_missing_folder_names_the_expected_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="bounding_box_train_camstyle"):
        parse_reid_folder(tmp_path / "nowhere" / "query")


def test_camstyle_names_for_cyclegan_and_stargan():
    image = Path("/d/0002_c1s1_000451_03.jpg")
    assert camstyle_path(Path("/c"), image, 0, 2).name == "0002_c1s1_000451_03_fake_1to3.jpg"
    assert camstyle_path(Path("/c"), image, 0, 14, naming="target").name == "0002_c1s1_000451_03_fake_15.jpg"


def test_camstyle_draw_is_uniform_over_cameras_and_label_is_the_index(tmp_path):
    root = write_market(tmp_path / "market", cams=3)
    records = parse_reid_folder(root / "bounding_box_train")
    dataset = CamStyleTargetDataset(records, root / "bounding_box_train_camstyle", num_cameras=3)
    g = torch.Generator().manual_seed(0)
    index, draws = 4, 3000
    own = int(records.cams[index])
    counts = np.zeros(3)
    for _ in range(draws):
        path = dataset.sample_path(index, g)
        assert path.exists()
        camera = own if path == records.paths[index] else int(path.stem.split("to")[-1]) - 1
        assert "_fake_" not in path.name or path.stem.split("_fake_")[1].startswith(f"{own + 1}to")
        counts[camera] += 1
    chi2 = ((counts - draws / 3) ** 2 / (draws / 3)).sum()
    assert chi2 < 13.8  # 2 degrees of freedom, p = 0.001
    image, label = dataset[index]
    assert label == index and isinstance(image, Image.Image)


def test_missing_camstyle_fakes_are_reported_before_training(tmp_path):
    root = write_market(tmp_path / "market")
    victim = sorted((root / "bounding_box_train_camstyle").iterdir())[3]
    victim.unlink()
    records = parse_reid_folder(root / "bounding_box_train")
    with pytest.raises(DatasetNotFoundError, match=victim.name):
        CamStyleTargetDataset(records, root / "bounding_box_train_camstyle", num_cameras=3)


def test_rect_crop_squashes_square_images_and_crops_tall_ones():
    crop = RandomSizedRectCrop((32, 16))
    square = Image.new("RGB", (40, 40))
    square.paste((255, 0, 0), (0, 0, 20, 40))  # left half red: a squash keeps it, a centre crop would not
    out = np.asarray(crop(square))
    assert out.shape == (32, 16, 3)
    assert out[:, :7, 0].mean() > 200 and out[:, 9:, 0].mean() < 50
    tall = Image.new("RGB", (40, 100))
    assert np.asarray(crop(tall)).shape == (32, 16, 3)


def test_cross_domain_loaders_serve_source_labels_target_indices_and_eval_sets(tmp_path):
    source = write_market(tmp_path / "duke", train_ids=(1, 2, 3, 4), camstyle=False)
    target = write_market(tmp_path / "market")
    dm = CrossDomainReIDDataModule(source_root=str(source), target_root=str(target), image_size=(32, 16), batch_size=4, num_workers=0,
                                   pin_memory=False)
    dm.setup("fit")
    assert dm.num_classes == 4 and dm.num_target_images == 3 * 3 * 2
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == (4 * 3 * 2) // 4
    batch = batches[0][0] if isinstance(batches[0], tuple) else batches[0]
    images, labels = batch["source"][0], batch["source"][1]
    assert images.shape == (4, 3, 32, 16) and labels.max() < 4
    target_images, indices = batch["target"]
    assert target_images.shape == (4, 3, 32, 16) and len(set(indices.tolist())) == 4
    query, gallery = dm.val_dataloader()
    q = next(iter(query))
    assert q[0].shape[1:] == (3, 32, 16) and set(q[1].tolist()) <= {3, 5}
    assert len(gallery.dataset) == 13


def test_missing_camstyle_folder_says_how_to_train_without(tmp_path):
    source = write_market(tmp_path / "duke", camstyle=False)
    target = write_market(tmp_path / "market", camstyle=False)
    dm = CrossDomainReIDDataModule(source_root=str(source), target_root=str(target), image_size=(32, 16), batch_size=2, num_workers=0)
    with pytest.raises(DatasetNotFoundError, match="camstyle: false"):
        dm.setup("fit")
    CrossDomainReIDDataModule(source_root=str(source), target_root=str(target), batch_size=2, camstyle=False, num_workers=0).setup("fit")


@pytest.mark.parametrize("config", ["ecn_duke2market", "source_only_market2duke"])
def test_real_data_configs_train_and_test_on_market_format_fixtures(tmp_path, config):
    from conftest import ROOT, run_zoo

    duke = write_market(tmp_path / "duke", train_ids=(1, 2, 3, 4))
    market = write_market(tmp_path / "market", train_ids=(5, 6, 8))
    result = run_zoo(
        "fit", "-c", str(ROOT / "configs" / "reid" / f"{config}.yaml"),
        f"--data.init_args.source_root={duke if 'duke2' in config else market}",
        f"--data.init_args.target_root={market if 'duke2' in config else duke}",
        "--data.init_args.batch_size=4", "--data.init_args.image_size=[64, 32]", "--data.init_args.num_workers=0",
        "--data.init_args.pin_memory=false",
        f"--model.init_args.num_classes={4 if 'duke2' in config else 3}",
        "--model.init_args.backbone.init_args.name=resnet18", "--model.init_args.backbone.init_args.pretrained=false",
        "--model.init_args.embedding_dim=32", "--trainer.precision=32", "--trainer.max_epochs=2",
        "--trainer.check_val_every_n_epoch=1", f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "test/rank1" in out and "test/mAP" in out
    assert (tmp_path / "run" / "version_0" / "rank_lists" / "test_epoch002.png").exists()

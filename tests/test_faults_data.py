"""Data faults: wide (16-bit, 32-bit, float) images, malformed dataset files named with their key and layout, and
CIFAR pickles that try to run code."""

import json
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cifar10, write_closerlook, write_omniglot
from PIL import Image

from datamodules.base import CorruptImageError, DatasetNotFoundError, read_image
from datamodules.cifar import open_cifar, read_cifar
from datamodules.classification import CIFAR10DataModule
from datamodules.detection import CocoDetection
from datamodules.fewshot import CloserLookDataModule, OmniglotDataModule
from datamodules.gan import UnpairedDataModule
from datamodules.reid import parse_reid_folder

# ---- 1. images of more than 8 bits per sample ----------------------------------------------------------------------


def _ramp16(path: Path, width: int = 64, height: int = 8, top: int = 63000) -> Path:
    """A 16-bit grey PNG (PIL mode I;16): every row the ramp 0..``top`` from left to right."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.rint(np.linspace(0, top, width)).astype(np.uint16)
    image = Image.fromarray(np.tile(ramp, (height, 1)))
    assert image.mode == "I;16"
    image.save(path)
    return path


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_16bit_png_is_scaled_to_8_bits_not_clipped(tmp_path, mode):
    path = _ramp16(tmp_path / "ramp.png")
    with Image.open(path) as raw:
        assert raw.mode == "I;16"  # what PIL opens a 16-bit PNG as
    pixels = np.asarray(read_image(path, mode)).astype(int)
    rows = pixels if mode == "L" else pixels[..., 0]
    assert (pixels.reshape(-1, 1 if mode == "L" else 3) == rows.reshape(-1, 1)).all()  # grey in every channel
    row = rows[0]
    # PIL's convert clips: 0 and 255 only. Scaled by 257, the ramp 0..63000 is 0..245, one step per column.
    assert row[0] == 0 and row[-1] == round(63000 / 257) == 245
    assert (np.diff(row) >= 0).all() and len(np.unique(row)) > 50
    expected = np.rint(np.rint(np.linspace(0, 63000, 64)) / 257)
    assert np.abs(row - expected).max() <= 1


def test_big_endian_16bit_and_32bit_integer_images_are_scaled(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    big = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert np.asarray(big).tolist() == values.tolist()
    big.save(tmp_path / "big.tif")
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "int32.tif")
    for name in ("big.tif", "int32.tif"):
        assert np.asarray(read_image(tmp_path / name, "L")).tolist() == [[0, 1, 128, 255]], name


def test_float_image_in_unit_range_is_scaled_and_others_are_refused_by_name(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "unit.tif")
    assert np.asarray(read_image(tmp_path / "unit.tif", "L")).tolist() == [[0, 128, 255]]
    Image.fromarray(np.array([[0.0, 300.0, 4000.0]], dtype=np.float32)).save(tmp_path / "radiance.tif")
    with pytest.raises(CorruptImageError, match=r"radiance\.tif.*mode F.*0\.\.4000.*\[0, 1\]"):
        read_image(tmp_path / "radiance.tif", "RGB")
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(CorruptImageError, match=r"wide\.tif.*mode I\b.*0\.\.70000.*0\.\.65535"):
        read_image(tmp_path / "wide.tif", "L")


def test_unpaired_gan_dataset_of_16bit_pngs_is_not_constant(tmp_path):
    for split in ("trainA", "trainB", "testA", "testB"):
        for i in range(2):
            _ramp16(tmp_path / split / f"{i}.png", width=32, height=32)
    dm = UnpairedDataModule(root=str(tmp_path), image_size=32, load_size=None, flip=False, num_workers=0,
                            pin_memory=False)
    dm.setup("fit")
    for dataset in (dm.train_a, dm.test_a):
        image = dataset[0][0]  # (3, 32, 32) in [-1, 1]
        assert image.shape == (3, 32, 32)
        # clipped, the ramp is 1.0 everywhere but its first column
        assert (image != 1.0).float().mean() > 0.5 and len(torch.unique(image)) > 20
        row = image[0, 0]
        assert row[0] == -1.0 and (row.diff() >= 0).all()
        assert row[-1].item() == pytest.approx(245 / 255 * 2 - 1, abs=1e-6)


# ---- 2. malformed dataset files name the file, the key and the layout -----------------------------------------------


def test_market_name_with_a_dash_inside_the_id_names_the_file_and_pattern(tmp_path):
    folder = tmp_path / "bounding_box_train"
    folder.mkdir()
    for name in ("0002_c1s1_000451_03.jpg", "-1_c1s1_000001_00.jpg", "12-3_c1s1_000001_00.jpg"):
        Image.new("RGB", (8, 16)).save(folder / name)
    with pytest.raises(ValueError, match=r"12-3_c1s1_000001_00\.jpg.*<pid>_c<camera>.*digits or -1"):
        parse_reid_folder(folder)
    (folder / "12-3_c1s1_000001_00.jpg").unlink()
    records = parse_reid_folder(folder)  # -1 stays a valid (junk) id, dropped
    assert [p.name for p in records.paths] == ["0002_c1s1_000451_03.jpg"] and records.pids.tolist() == [2]


def test_closerlook_label_past_label_names_names_json_label_and_length(tmp_path):
    write_closerlook(tmp_path)
    meta = json.loads((tmp_path / "base.json").read_text())
    assert max(meta["image_labels"]) == 5
    meta["label_names"] = meta["label_names"][:3]
    (tmp_path / "base.json").write_text(json.dumps(meta))
    dm = CloserLookDataModule(root=str(tmp_path), image_size=16, num_workers=0, pin_memory=False)
    with pytest.raises(ValueError, match=r"(?s)base\.json.*label 5.*label_names has 3 entries.*label_names"):
        dm.setup()


def test_coco_json_without_annotations_names_file_and_key(tmp_path):
    (tmp_path / "images").mkdir()
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}],
                                "categories": [{"id": 1, "name": "person"}]}))
    with pytest.raises(ValueError, match=r"(?s)instances_val2017\.json.*lacks \['annotations'\].*annotations/"):
        CocoDetection(tmp_path / "images", path)


def _rewrite_batch(root: Path, name: str, content) -> Path:
    path = root / "cifar-10-batches-py" / name
    with open(path, "wb") as f:
        pickle.dump(content, f)
    return path


@pytest.mark.parametrize("content, problem", [
    ([np.zeros((10, 3072), np.uint8), list(range(10))], "it holds a list"),
    ({"labels": list(range(10))}, "no 'data' key"),
    ({"data": np.zeros((10, 1024), np.uint8), "labels": list(range(10))}, r"'data' is a uint8 array \(10, 1024\)"),
    ({"data": np.zeros((10, 3072), np.float32), "labels": list(range(10))}, r"'data' is a float32 array"),
    ({"data": np.zeros((10, 3072), np.uint8)}, "neither 'labels' nor 'fine_labels'"),
    ({"data": np.zeros((10, 3072), np.uint8), "labels": list(range(9))}, "10 images in 'data' but 9 'labels'"),
])
def test_cifar_batch_of_the_wrong_structure_names_file_and_structure(tmp_path, content, problem):
    write_cifar10(tmp_path, per_batch=10)
    path = _rewrite_batch(tmp_path, "data_batch_2", content)
    expected = re.escape(f"'{path}' is not a CIFAR python batch: ") + f".*{problem}.*" + re.escape(
        "expected a dict with 'data', a uint8 array of shape (N, 3072)")
    with pytest.raises(RuntimeError, match=expected):
        read_cifar(tmp_path, "CIFAR10", train=True)
    with pytest.raises(RuntimeError, match=expected):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0, pin_memory=False).setup("fit")


@pytest.mark.parametrize("alphabets", [[], ["Alpha", "Beta"]], ids=["empty", "alphabets-without-characters"])
def test_empty_omniglot_background_names_folder_and_layout(tmp_path, alphabets):
    write_omniglot(tmp_path, alphabets={"images_evaluation": {"Delta": 4}})
    for alphabet in alphabets:
        (tmp_path / "images_background" / alphabet).mkdir(parents=True)
    (tmp_path / "images_background").mkdir(exist_ok=True)
    dm = OmniglotDataModule(root=str(tmp_path), val_alphabets=1)
    folder = re.escape(str(tmp_path / "images_background"))
    with pytest.raises(DatasetNotFoundError,
                       match=rf"{folder}.*images_background/<alphabet>/<characterNN>/<id>_<drawer>\.png"):
        dm.setup()


# ---- 3. CIFAR pickles: numpy arrays only --------------------------------------------------------------------------


def _py2_batch(data: np.ndarray, labels: list[int], batch_label: bytes) -> bytes:
    """A batch as the release files hold it: a Python-2 cPickle (protocol 2) whose text and array bytes are py2
    ``str`` (SHORT_BINSTRING / BINSTRING) and whose array is ``numpy.core.multiarray._reconstruct(ndarray, ...)``."""

    def string(s: bytes) -> bytes:
        return b"U" + bytes([len(s)]) + s if len(s) < 256 else b"T" + struct.pack("<i", len(s)) + s

    dtype = (b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R(K\x03" + string(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b") + b"\x87R(K\x01J"
             + struct.pack("<i", len(data)) + b"M\x00\x0c\x86" + dtype + b"\x89" + string(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([label]) for label in labels) + b"e"
    return (b"\x80\x02}(" + string(b"data") + array + string(b"labels") + label_list + string(b"batch_label")
            + string(batch_label) + b"u.")


class _RunsCode:
    """Unpickling this calls ``function(argument)``: what a crafted batch file does."""

    def __init__(self, function, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("target", ["data_batch_4", "batches.meta"])
@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
def test_cifar_loader_reads_release_pickles_and_refuses_code(tmp_path, target, how):
    write_cifar10(tmp_path, per_batch=10)
    folder = tmp_path / "cifar-10-batches-py"
    # the release format (Python-2 str, numpy.core) loads, bytes ≥ 128 included: latin1 keeps them
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (10, 3072), dtype=np.uint8)
    (folder / "data_batch_1").write_bytes(_py2_batch(data, [9 - i for i in range(10)], b"training batch 1 of 5"))
    images, labels = read_cifar(tmp_path, "CIFAR10", train=True)
    assert images.shape == (50, 3, 32, 32) and torch.equal(images[:10].reshape(10, 3072), torch.from_numpy(data))
    assert labels[:10].tolist() == list(range(9, -1, -1))

    marker = tmp_path / "pwned"
    if how == "os.system":
        payload, refused = _RunsCode(os.system, f"touch '{marker}'"), f"{os.system.__module__}.system"
    else:
        payload, refused = _RunsCode(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"
    content = ({"label_names": payload} if target == "batches.meta"
               else {"data": np.zeros((10, 3072), np.uint8), "labels": payload})
    path = _rewrite_batch(tmp_path, target, content)
    message = re.escape(f"'{path}' refers to the global '{refused}'") + ".*refused without calling it"
    with pytest.raises(pickle.UnpicklingError, match=message):
        read_cifar(tmp_path, "CIFAR10", train=True)
    with pytest.raises(pickle.UnpicklingError, match=message):
        CIFAR10DataModule(root=str(tmp_path), num_workers=0, pin_memory=False).setup("fit")
    if target == "batches.meta":  # read by both splits
        with pytest.raises(pickle.UnpicklingError, match=message):
            open_cifar(tmp_path, "CIFAR10", train=False)
    assert not marker.exists()

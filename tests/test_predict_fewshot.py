"""``zoo predict`` and the test-end table of the few-shot family: the episode writer, one's own support/query folders,
``test/accuracy_by_setting``, and the episodes notebook (slow)."""

import csv
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import ROOT, prediction_folder
from datamodules.base import DatasetNotFoundError
from datamodules.fewshot import GlyphsDataModule
from zoo.backbones import ConvNet
from zoo.cli import ZooCLI
from zoo.fewshot.baseline import Baseline
from zoo.fewshot.maml import MAML
from zoo.fewshot.matching_net import MatchingNet
from zoo.fewshot.protonet import ProtoNet
from zoo.fewshot.relation_net import RelationNet
from zoo.fewshot.siamese import SiameseNet

CONFIG = ROOT / "configs" / "fewshot" / "protonet_glyphs.yaml"
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
TEST_EPISODES = "--data.init_args.test_episodes=[{n_way: 5, k_shot: 1, n_query: 3, episodes: 6}, " \
                "{n_way: 3, k_shot: 2, n_query: 2, episodes: 4}]"


def _glyph_args(root: Path) -> list[str]:
    """A tiny glyph set (4 alphabets × 5 characters × 5 drawers, 0.3 s to write) and tiny episodes."""
    return [f"--data.init_args.root={root}", "--data.init_args.background_alphabets=3",
            "--data.init_args.evaluation_alphabets=1", "--data.init_args.characters_per_alphabet=5",
            "--data.init_args.drawers=5", "--data.init_args.val_alphabets=1",
            "--data.init_args.train_episodes={n_way: 5, k_shot: 1, n_query: 2, episodes: 4}",
            "--data.init_args.val_episodes={n_way: 5, k_shot: 1, n_query: 2, episodes: 2}", TEST_EPISODES]


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of ProtoNet on the tiny glyph set (``zoo fit``, which tests after fitting): the run folder, the
    checkpoint and the glyph root."""
    root = tmp_path_factory.mktemp("protonet")
    glyphs = root / "glyphs"
    cli = ZooCLI(args=["fit", "-c", str(CONFIG), f"--trainer.default_root_dir={root / 'run'}",
                       "--trainer.max_epochs=1", *QUIET, *_glyph_args(glyphs)])
    run = Path(cli.trainer.default_root_dir)
    return run, next(run.rglob("last.ckpt")), glyphs


def _predict(*args: str) -> Path:
    """``zoo predict`` in this process; returns the folder it wrote its files to (the checkpoint's run folder's
    ``predictions/``)."""
    cli = ZooCLI(args=["predict", "-c", str(CONFIG), *QUIET, *args])
    return prediction_folder(cli)


def _predict_dir(folder: Path, glyphs: Path, shots: dict[str, int]) -> Path:
    """``support/<class>/`` with ``shots[class]`` glyphs of one novel character each, and ``query/`` holding a copy of
    every support image (nested one level for class ``a``): ``query/<class>_<i>.png``."""
    characters = sorted((glyphs / "images_evaluation").glob("*/character*"))
    for (name, k), character in zip(shots.items(), characters):
        (folder / "support" / name).mkdir(parents=True)
        for i, png in enumerate(sorted(character.glob("*.png"))[:k]):
            shutil.copy(png, folder / "support" / name / png.name)
            query = folder / "query" / ("nested" if name == "a" else "") / f"{name}_{i}.png"
            query.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, query)
    return folder


# ---------------------------------------------------------------- predict on one's own support/query folders

def test_predict_on_a_folder_writes_one_row_per_query_and_an_exact_copy_of_a_shot_gets_its_class(trained, tmp_path):
    run, ckpt, glyphs = trained
    folder = _predict_dir(tmp_path / "mine", glyphs, {"a": 2, "b": 1})  # unequal shots: ProtoNet averages each
    out = _predict(f"--ckpt_path={ckpt}", f"--data.init_args.predict_dir={folder}",
                   f"--data.init_args.root={tmp_path / 'no_glyphs'}")
    rows = _read(out / "predictions.csv")
    assert list(rows[0]) == ["path", "predicted_class", "score", "probability"]
    assert sorted(Path(r["path"]).name for r in rows) == ["a_0.png", "a_1.png", "b_0.png"]
    by_name = {Path(r["path"]).name: r for r in rows}
    # b has one shot, so its prototype is that image: the copy is at distance 0, nearer than any other class mean
    assert by_name["b_0.png"]["predicted_class"] == "b"
    assert float(by_name["b_0.png"]["score"]) == pytest.approx(0.0, abs=1e-4)
    assert all(0.5 <= float(r["probability"]) <= 1.0 for r in rows)  # the argmax of two classes
    assert not (tmp_path / "no_glyphs").exists()  # predicting one's own images writes no glyph set


@pytest.mark.parametrize("broken", ["no_query", "no_support", "empty_class", "one_class", "loose_support_image"])
def test_a_predict_dir_without_the_layout_is_an_error_naming_it(broken, tmp_path):
    folder = tmp_path / "mine"
    for name in ("a", "b"):
        (folder / "support" / name).mkdir(parents=True)
        Image.new("L", (28, 28), 255).save(folder / "support" / name / "x.png")
    (folder / "query").mkdir()
    Image.new("L", (28, 28), 255).save(folder / "query" / "q.png")
    if broken == "no_query":
        shutil.rmtree(folder / "query")
    elif broken == "no_support":
        shutil.rmtree(folder / "support")
    elif broken == "empty_class":
        (folder / "support" / "b" / "x.png").unlink()
    elif broken == "one_class":
        shutil.rmtree(folder / "support" / "b")
    else:
        Image.new("L", (28, 28), 255).save(folder / "support" / "stray.png")
    dm = GlyphsDataModule(root=str(tmp_path / "glyphs"), predict_dir=str(folder))
    with pytest.raises(DatasetNotFoundError, match=r"support/<class name>/\*\.png(.|\n)*query/\*\*/\*\.png"):
        dm.predict_sets()


def test_a_missing_query_folder_fails_zoo_predict_with_the_layout(tmp_path):
    (tmp_path / "mine" / "support" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"query'? is missing(.|\n)*<predict_dir>/query/"):
        _predict(f"--trainer.default_root_dir={tmp_path / 'out'}", f"--data.init_args.predict_dir={tmp_path / 'mine'}")


class Flat(nn.Module):
    """Identity backbone: the 'images' are feature vectors ``(B, D, 1, 1)``."""

    def forward(self, x):
        return x


def test_protonet_support_set_means_each_class_over_its_own_number_of_shots():
    model = ProtoNet(backbone=Flat(), feature_dim=2).double()
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]], dtype=torch.float64).view(3, 2, 1, 1)
    labels = torch.tensor([0, 0, 1])  # class 0: two shots, mean (1, 0); class 1: one shot (0, 4)
    query = torch.tensor([[1.0, 1.0]], dtype=torch.float64).view(1, 2, 1, 1)
    logits = model.support_set_logits(support, labels, 2, query)
    assert torch.allclose(logits, torch.tensor([[-1.0, -10.0]], dtype=torch.float64))


def _folder_batch(n_way: int, k_shot: int, n_query: int, size: int = 28) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"support": torch.rand(n_way * k_shot, 1, size, size, generator=g),
            "support_labels": torch.arange(n_way).repeat_interleave(k_shot),
            "class_names": [f"class{i}" for i in range(n_way)],
            "query": torch.rand(n_query, 1, size, size, generator=g), "paths": [f"q{i}.png" for i in range(n_query)]}


METHODS = {
    "protonet": lambda: ProtoNet(backbone=ConvNet(1), feature_dim=64),
    "matching_net": lambda: MatchingNet(backbone=ConvNet(1), feature_dim=64),
    "relation_net": lambda: RelationNet(backbone=ConvNet(1, num_pools=2, padding=[0, 0, 1, 1]), feature_channels=64,
                                        feature_size=5),
    "siamese": lambda: SiameseNet(backbone=ConvNet(1), feature_dim=64),
    "maml": lambda: MAML(backbone=ConvNet(1), feature_dim=64, n_way=3, inner_steps=1),
    "baseline": lambda: Baseline(backbone=ConvNet(1), feature_dim=64, num_classes=5, finetune_epochs=2),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_classifies_any_number_of_queries_of_a_folder_episode(method):
    torch.manual_seed(0)
    model = METHODS[method]().eval()
    with torch.inference_mode():
        out = model.predict_step(_folder_batch(n_way=3, k_shot=2, n_query=7), 0)
    assert out["predicted"].shape == (7,) and set(out["predicted"].tolist()) <= {0, 1, 2}
    if method in ("siamese", "relation_net"):  # independent similarities in (0, 1), not logits
        assert out["probability"] is None and ((out["score"] > 0) & (out["score"] < 1)).all()
    else:
        assert ((out["probability"] >= 1 / 3 - 1e-6) & (out["probability"] <= 1)).all()


def test_unequal_shots_are_an_error_naming_the_classes_for_methods_that_need_equal_ones():
    batch = _folder_batch(n_way=2, k_shot=2, n_query=3)
    batch["support_labels"] = torch.tensor([0, 0, 0, 1])
    with pytest.raises(ValueError, match="class0: 3, class1: 1"):
        MatchingNet(backbone=ConvNet(1), feature_dim=64).eval().predict_step(batch, 0)


def test_maml_predicts_only_folders_with_its_trained_number_of_ways():
    with pytest.raises(ValueError, match="3 outputs but the episode is 2-way"):
        METHODS["maml"]().eval().predict_step(_folder_batch(n_way=2, k_shot=1, n_query=2), 0)


# ---------------------------------------------------------------- predict on the test episodes, the test-end table

def test_predicting_the_test_episodes_gives_zoo_tests_accuracy_per_setting(trained, tmp_path):
    run, ckpt, glyphs = trained
    data = _glyph_args(glyphs)
    tested = ZooCLI(args=["test", "-c", str(CONFIG), f"--ckpt_path={ckpt}", *QUIET, *data])
    metrics = {k: float(v) for k, v in tested.trainer.callback_metrics.items()}
    out = _predict(f"--ckpt_path={ckpt}", *data)
    summary = {r["setting"]: r for r in _read(out / "summary.csv")}
    assert list(summary) == ["5way1shot", "3way2shot"]  # the order of data.init_args.test_episodes
    for setting, row in summary.items():
        assert float(row["accuracy"]) == pytest.approx(metrics[f"test/acc_{setting}"], abs=1e-4)
        assert float(row["ci95"]) == pytest.approx(metrics[f"test/ci95_{setting}"], abs=1e-4)
        assert int(row["episodes"]) == metrics[f"test/num_episodes_{setting}"]
    assert (summary["5way1shot"]["n_way"], summary["3way2shot"]["k_shot"], summary["3way2shot"]["n_query"]) == \
        ("5", "2", "2")
    episodes = _read(out / "episodes.csv")
    assert len(episodes) == 6 * 5 * 3 + 4 * 3 * 2  # one row per query
    assert list(episodes[0]) == ["setting", "episode", "query", "true_class", "true_class_name", "predicted_class",
                                 "predicted_class_name", "correct"]
    assert all(r["correct"] == str(int(r["true_class"] == r["predicted_class"])) for r in episodes)
    assert re.fullmatch(r"Glyph_Alphabet_\d+/character\d+/rot000", episodes[0]["true_class_name"])
    first = [r for r in episodes if r["setting"] == "5way1shot" and r["episode"] == "0"]
    assert [int(r["query"]) for r in first] == list(range(15)) and len({r["true_class"] for r in first}) == 5


def test_test_end_table_has_one_row_per_setting_beside_the_baselines(trained):
    run, ckpt, glyphs = trained
    rows = _read(run / "tables" / "test_accuracy_by_setting.csv")  # written by fit's test (and zoo test's, the same)
    assert [r["setting"] for r in rows] == ["3way2shot", "5way1shot"]  # by (n_way, k_shot)
    assert list(rows[0]) == ["setting", "n_way", "k_shot", "episodes", "accuracy", "ci95",
                             "baseline_pixels_accuracy", "baseline_pixels_ci95", "baseline_random_accuracy",
                             "baseline_random_ci95"]
    assert [(r["n_way"], r["k_shot"], r["episodes"]) for r in rows] == [("3", "2", "4"), ("5", "1", "6")]
    assert all(0 <= float(r[c]) <= 100 for r in rows for c in ("accuracy", "baseline_pixels_accuracy"))


# ---------------------------------------------------------------- the notebook

@pytest.mark.slow
def test_fewshot_episodes_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # no checkpoint at ZOO_CKPT: the notebook trains its short run, into ZOO_TRAIN_ROOT
    os.environ.update(ZOO_CKPT=str(tmp_path / "none.ckpt"), ZOO_TRAIN_ROOT=str(tmp_path / "run"))
    try:
        notebook = nbformat.read(ROOT / "notebooks" / "fewshot_episodes.ipynb", as_version=4)
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        del os.environ["ZOO_CKPT"], os.environ["ZOO_TRAIN_ROOT"]
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"checkpoint: {tmp_path / 'run'}" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "no episode image was displayed"
    results = dict(re.findall(r"^(5way\dshot): ProtoNet ([0-9.]+) ± [0-9.]+ %", text, re.M))
    pixels = dict(re.findall(r"^(5way\dshot): .*pixels ([0-9.]+) ± [0-9.]+ %", text, re.M))
    assert set(results) == set(pixels) == {"5way1shot", "5way5shot"}
    assert all(float(results[s]) > float(pixels[s]) for s in results), (results, pixels)

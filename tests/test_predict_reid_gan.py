"""``zoo predict`` of the re-ID and GAN families (rank lists, translated PNGs), the re-ID CMC table, and the GAN
judge's fast_dev_run skip and disk cache."""

import csv
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, prediction_folder
from PIL import Image

from datamodules.base import DatasetNotFoundError
from zoo.cli import ZooCLI
from zoo.gan.evaluation import TranslationMetrics, cached_judge
from zoo.gan.predict import output_names
from zoo.reid.predict import rank_gallery

ECN_CONFIG = ROOT / "configs" / "reid" / "ecn_synthetic.yaml"
UGATIT_CONFIG = ROOT / "configs" / "gan" / "ugatit_digits.yaml"
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- re-ID ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reid_run(tmp_path_factory):
    """A 2-step ECN run on the synthetic people: its checkpoint, and the arguments to reuse it."""
    root = tmp_path_factory.mktemp("reid")
    args = ["-c", str(ECN_CONFIG), f"--data.init_args.root={root / 'people'}", "--model.init_args.embedding_dim=32",
            "--trainer.callbacks=[]", *QUIET]
    ZooCLI(args=["fit", *args, f"--trainer.default_root_dir={root / 'fit'}", "--trainer.max_epochs=1",
                 "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0", "--test_after_fit=false"])
    ckpt = next((root / "fit").rglob("last.ckpt"))
    return {"root": root, "args": args, "ckpt": ckpt}


def test_reid_predict_writes_one_rank_list_row_per_query_whose_rank1_and_map_are_the_test_metrics(reid_run):
    root, args, ckpt = reid_run["root"], reid_run["args"], reid_run["ckpt"]
    tested = ZooCLI(args=["test", *args, f"--trainer.default_root_dir={root / 'test'}", f"--ckpt_path={ckpt}"])
    metrics = tested.trainer.callback_metrics
    predicted = ZooCLI(args=["predict", *args, f"--trainer.default_root_dir={root / 'predict'}", f"--ckpt_path={ckpt}"])
    rows = _rows(prediction_folder(predicted) / "rank_lists.csv")
    queries = sorted((root / "people" / "target" / "query").glob("*.jpg"))
    queries = [q for q in queries if not q.name.startswith("-1")]
    assert [Path(r["query"]).name for r in rows] == [q.name for q in queries]
    assert all(r["pid"] == str(int(Path(r["query"]).name[:4])) for r in rows)
    assert all(f"_c{r['camid']}" in Path(r["query"]).name for r in rows)
    assert "distance_10" in rows[0] and "gallery_11" not in rows[0]  # top_k = 10 by default
    valid = [r for r in rows if r["first_match"]]
    rank1 = sum(r["first_match"] == "1" for r in valid) / len(valid)
    assert rank1 == pytest.approx(float(metrics["test/rank1"]), abs=1e-6)
    # rank 1 from the first listed gallery image, too: the same-camera same-id images are already left out
    assert sum(r["pid_1"] == r["pid"] for r in valid) / len(valid) == pytest.approx(rank1, abs=1e-9)
    assert sum(float(r["ap"]) for r in valid) / len(valid) == pytest.approx(float(metrics["test/mAP"]), abs=1e-5)
    # the distances are sorted, and the Market rule holds: no listed image shares both id and camera with its query
    for r in rows:
        distances = [float(r[f"distance_{k}"]) for k in range(1, 11)]
        assert distances == sorted(distances)
        for k in range(1, 11):
            same_camera = f"_c{r['camid']}" in Path(r[f"gallery_{k}"]).name
            assert not (r[f"pid_{k}"] == r["pid"] and same_camera)
    # the CMC table of `zoo test` (W&B table test/cmc; always a CSV in the run folder): ranks 1..20
    cmc = _rows(Path(tested.trainer.default_root_dir) / "tables" / "test_cmc.csv")
    assert [int(r["rank"]) for r in cmc] == list(range(1, 21))
    assert float(cmc[0]["accuracy"]) == pytest.approx(float(metrics["test/rank1"]), abs=1e-5)
    assert all(float(a["accuracy"]) <= float(b["accuracy"]) for a, b in zip(cmc, cmc[1:]))


def test_reid_predict_dir_without_market_names_ranks_a_renamed_copy_of_the_query_first(reid_run, tmp_path):
    root, args, ckpt = reid_run["root"], reid_run["args"], reid_run["ckpt"]
    target = root / "people" / "target"
    (tmp_path / "mine" / "query").mkdir(parents=True)
    (tmp_path / "mine" / "gallery").mkdir()
    me = sorted((target / "query").glob("0*.jpg"))[5]
    shutil.copy(me, tmp_path / "mine" / "query" / "me.jpg")
    shutil.copy(me, tmp_path / "mine" / "gallery" / "zz_copy_of_me.jpg")  # sorts last: only the ranking puts it first
    for i, path in enumerate(sorted((target / "bounding_box_test").glob("0*.jpg"))[:12]):
        shutil.copy(path, tmp_path / "mine" / "gallery" / f"person_{i}.jpg")
    predicted = ZooCLI(args=["predict", *args, f"--trainer.default_root_dir={tmp_path / 'run'}", f"--ckpt_path={ckpt}",
                             f"--data.init_args.predict_dir={tmp_path / 'mine'}"])
    (row,) = _rows(prediction_folder(predicted) / "rank_lists.csv")
    assert Path(row["query"]).name == "me.jpg" and row["pid"] == row["camid"] == row["first_match"] == ""
    assert Path(row["gallery_1"]).name == "zz_copy_of_me.jpg" and float(row["distance_1"]) < 1e-6
    assert all(row[f"gallery_{k}"] for k in range(1, 11))  # 13 gallery images, nothing left out


def test_rank_gallery_leaves_out_same_id_same_camera_only_when_both_ids_are_known():
    # one feature axis per gallery image; the query sits nearest to image 0, then 1, then 2
    gallery = torch.eye(3)
    query = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    gallery_pids, gallery_cams = torch.tensor([7, 8, 7]), torch.tensor([0, 1, 1])
    ranked = rank_gallery(query, gallery, torch.tensor([7, -1]), gallery_pids, torch.tensor([0, -1]), gallery_cams,
                          top_k=3)
    # query 0 (pid 7, camera 0): image 0 is its own id and camera, left out; its first match (image 2) is 2nd
    assert ranked["top"][0, :2].tolist() == [1, 2] and ranked["kept"][0].tolist() == [True, True, False]
    assert int(ranked["first_match"][0]) == 2 and float(ranked["ap"][0]) == pytest.approx(0.5)
    # query 1 (unknown id): nothing is left out and it has no first match
    assert ranked["top"][1].tolist() == [0, 1, 2] and ranked["kept"][1].all() and not ranked["valid"][1]


def test_reid_predict_dir_without_query_and_gallery_folders_names_the_layout(tmp_path):
    from datamodules.reid import SyntheticReIDDataModule

    (tmp_path / "query").mkdir()
    Image.new("RGB", (8, 16)).save(tmp_path / "query" / "a.png")
    data = SyntheticReIDDataModule(root=str(tmp_path / "unused"), predict_dir=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=r"no gallery folder(.|\n)*<predict_dir>/gallery/"):
        data.predict_sets()


# ---- GAN --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_root(tmp_path_factory):
    from datamodules.generated.gan_digit_domains import write_digit_domains

    return write_digit_domains(tmp_path_factory.mktemp("gan") / "digits")


def _gan_args(digit_root, run_dir, *extra):
    return ["-c", str(UGATIT_CONFIG), f"--data.init_args.root={digit_root}", f"--trainer.default_root_dir={run_dir}",
            "--data.init_args.eval_batch_size=4", *QUIET, *extra]


def test_gan_predict_on_a_folder_of_three_pngs_writes_three_translations_of_the_model_size(digit_root, tmp_path):
    folder = tmp_path / "mine"
    (folder / "more").mkdir(parents=True)
    for name, size in (("a.png", (50, 40)), ("b.png", (20, 20)), ("more/c.png", (64, 31))):
        Image.new("RGB", size, (200, 30, 30)).save(folder / name)
    predicted = ZooCLI(args=["predict", *_gan_args(digit_root, tmp_path / "run", "--trainer.callbacks=[]",
                                                   f"--data.init_args.predict_dir={folder}")])
    out = prediction_folder(predicted)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["A2B/a.png", "A2B/b.png", "A2B/more/c.png"]
    assert {Image.open(out / name).size for name in written} == {(32, 32)}
    index = _rows(out / "index.csv")
    assert [(r["direction"], Path(r["input"]).name, r["output"]) for r in index] == [
        ("A2B", "a.png", "A2B/a.png"), ("A2B", "b.png", "A2B/b.png"), ("A2B", "c.png", "A2B/more/c.png")]


def test_gan_predict_on_the_test_split_translates_both_folders_named_after_their_files(digit_root, tmp_path):
    # two batches of 2 per folder ("1" would read as 1.0, i.e. every batch)
    predicted = ZooCLI(args=["predict", *_gan_args(digit_root, tmp_path / "run", "--trainer.callbacks=[]",
                                                   "--data.init_args.eval_batch_size=2",
                                                   "--trainer.limit_predict_batches=2")])
    out = prediction_folder(predicted)
    index = _rows(out / "index.csv")
    assert [r["direction"] for r in index] == ["A2B"] * 4 + ["B2A"] * 4
    first_a = sorted(p.name for p in (Path(digit_root) / "testA").glob("*.png"))[:4]
    assert [r["output"] for r in index[:4]] == [f"A2B/{name}" for name in first_a]
    for r in index:
        image = Image.open(out / r["output"])
        assert image.size == (32, 32) and image.mode == "RGB"


def test_output_names_replace_the_ending_and_keep_it_where_two_files_would_collide():
    names = output_names([Path("/x/a.jpg"), Path("/x/a.png"), Path("/x/sub/b.webp")])
    assert names == ["a.jpg.png", "a.png.png", "sub/b.png"]


def _metrics_callback(cli) -> TranslationMetrics:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, TranslationMetrics))


def test_gan_judge_is_skipped_under_fast_dev_run_then_trained_once_and_loaded_from_its_cache(digit_root, tmp_path,
                                                                                             caplog):
    metrics_only = ("--trainer.callbacks=[{class_path: zoo.gan.evaluation.TranslationMetrics, "
                    "init_args: {features: judge, subsets: 5, subset_size: 20, judge_epochs: 1, baselines: false}}]")
    cache = Path(digit_root).parent / ".judge_cache"
    quick = _gan_args(digit_root, tmp_path / "dev", metrics_only, "--trainer.fast_dev_run=true")
    dev = ZooCLI(args=["fit", *quick])
    assert _metrics_callback(dev).judge_origin == "skipped" and not cache.exists()
    assert not [k for k in dev.trainer.callback_metrics if "kid" in k or "content" in k or "target_rate" in k]
    assert caplog.text.count("fast_dev_run, so the judge is not trained") == 1  # one line, for validation and test

    def short_run(name):  # a validation of the untrained model: the judge is built as in a fit, without GAN steps
        return ZooCLI(args=["validate", *_gan_args(digit_root, tmp_path / name, metrics_only,
                                                   "--trainer.limit_val_batches=2")])

    first = short_run("first")
    (cached,) = cache.glob("judge-*.pt")
    stamp = cached.stat().st_mtime_ns
    second = short_run("second")
    assert (_metrics_callback(first).judge_origin, _metrics_callback(second).judge_origin) == ("trained", "cache")
    assert cached.stat().st_mtime_ns == stamp
    assert "judge loaded from" in caplog.text
    # the cached judge is the trained one: the same validation numbers
    kid = [float(run.trainer.callback_metrics["val/kid_x100"]) for run in (first, second)]
    assert kid[0] == kid[1]


def _toy_domains(count: int = 24, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, count, 3, 32, 32, generator=generator) * 2 - 1
    images[1] = -images[1]  # two told-apart "domains"
    return ([(images[d, i], i % 3, i) for i in range(count)] for d in range(2))


def test_a_corrupt_or_foreign_judge_cache_file_is_retrained_not_trusted(tmp_path):
    train_a, train_b = _toy_domains()
    judge, origin, path = cached_judge(train_a, train_b, 3, tmp_path, epochs=1)
    assert origin == "trained" and path.is_file()
    again, origin, _ = cached_judge(train_a, train_b, 3, tmp_path, epochs=1)
    assert origin == "cache"
    assert all(torch.equal(a, b) for a, b in zip(judge.state_dict().values(), again.state_dict().values()))
    # another seed is another judge: another file
    assert cached_judge(train_a, train_b, 3, tmp_path, epochs=1, seed=1)[2] != path
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="cannot be used"):
        _, origin, _ = cached_judge(train_a, train_b, 3, tmp_path, epochs=1)
    assert origin == "trained"
    # a file holding another key (e.g. copied from another data set) is not trusted either
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "key": "0" * 64}, path)
    with pytest.warns(UserWarning, match="other data or settings"):
        assert cached_judge(train_a, train_b, 3, tmp_path, epochs=1)[1] == "trained"
    assert cached_judge(train_a, train_b, 3, tmp_path, epochs=1)[1] == "cache"


# ---- the notebook -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reid_rank_list_notebook_executes_and_prints_the_checkpoint_and_both_scores(tmp_path):
    """The notebook on a checkpoint of the config as it is (what it trains itself when it finds none; ~2 min)."""
    from conftest import run_zoo

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    result = run_zoo("fit", "-c", str(ECN_CONFIG), f"--trainer.default_root_dir={tmp_path}", "--test_after_fit=false",
                     *QUIET, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = next(tmp_path.rglob("last.ckpt"))
    before = os.environ.get("ZOO_CKPT")
    os.environ["ZOO_CKPT"] = str(ckpt)
    try:
        notebook = nbformat.read(ROOT / "notebooks" / "reid_rank_list.ipynb", as_version=4)
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        if before is None:
            del os.environ["ZOO_CKPT"]
        else:
            os.environ["ZOO_CKPT"] = before
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"checkpoint: {ckpt}" in text and "trained for 60 epochs" in text
    assert any("image/jpeg" in o.get("data", {}) for o in outputs), "no rank-list image was displayed"
    scores = {name.strip(): (float(r1), float(m)) for name, r1, m in
              re.findall(r"^(ECN \(this checkpoint\)|raw pixels)\s+R1 ([0-9.]+)\s+mAP ([0-9.]+)", text, re.M)}
    assert scores["raw pixels"] == (31.9, 23.7)  # the baseline of docs/models/reid.md
    assert scores["ECN (this checkpoint)"][0] > scores["raw pixels"][0] + 5
    assert scores["ECN (this checkpoint)"][1] > scores["raw pixels"][1] + 5

"""End-to-end demos; deselected by default (``pytest -m slow`` runs them)."""

import os
import re

import pytest

from conftest import DIGITS, ROOT, results_from_stdout, run_zoo

pytestmark = pytest.mark.slow


def test_digits_demo_reaches_099_beside_pixel_baselines(tmp_path):
    result = run_zoo("fit", "-c", str(DIGITS), f"--trainer.default_root_dir={tmp_path}",
                     "--trainer.enable_progress_bar=false", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = results_from_stdout(result.stdout)
    assert metrics["test/acc"] >= 0.99, metrics
    assert metrics["baseline/logreg_acc"] < metrics["test/acc"] and metrics["baseline/1nn_acc"] < metrics["test/acc"]


def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    result = run_zoo("fit", "-c", str(DIGITS), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=3",
                     "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]")
    assert result.returncode == 0, result.stderr[-3000:]
    os.environ["ZOO_CKPT"] = str(tmp_path / "version_0" / "checkpoints" / "last.ckpt")
    try:
        notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
        nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        del os.environ["ZOO_CKPT"]
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no CAM image was displayed"
    text = "".join(o.get("text", "") for o in outputs)
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", text).group(1))
    assert accuracy > 0.9
    assert f"from run:   {tmp_path / 'version_0'} " in text  # says which run's checkpoint it loaded


def test_protonet_on_glyphs_beats_both_baselines_on_novel_classes(tmp_path):
    # A short run of the embedded few-shot default: 2 epochs, 200 test episodes of 5-way 1-shot on unseen alphabets.
    result = run_zoo("fit", "-c", str(ROOT / "configs" / "fewshot" / "protonet_glyphs.yaml"),
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                     "--trainer.enable_progress_bar=false", "--trainer.max_epochs=2",
                     f"--data.init_args.root={tmp_path / 'glyphs'}",
                     "--data.init_args.test_episodes=[{n_way: 5, k_shot: 1, n_query: 15, episodes: 200}]",
                     "--trainer.callbacks=[{class_path: zoo.fewshot.callbacks.EpisodeBaselines}]", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = results_from_stdout(result.stdout)
    ours, ci = metrics["test/acc_5way1shot"], metrics["test/ci95_5way1shot"]
    for baseline in ("pixels", "random"):
        other = metrics[f"test/baseline_{baseline}_acc_5way1shot"]
        assert ours - ci > other + metrics[f"test/baseline_{baseline}_ci95_5way1shot"], metrics


def test_api_net_on_toy_birds_learns_the_parts_and_prefers_its_own_gate(tmp_path):
    """Seed 0 of the documented demo (docs/models/finegrained.md): far above pixels (≤ 12.5 %), self > other."""
    import csv

    result = run_zoo("fit", "-c", str(ROOT / "configs" / "finegrained" / "api_net_toybirds.yaml"),
                     f"--data.init_args.root={tmp_path / 'birds'}", f"--trainer.default_root_dir={tmp_path}",
                     "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
                     "--trainer.enable_progress_bar=false", timeout=1500,
                     env={"OMP_NUM_THREADS": "1"})  # the documented runs used one thread: same arithmetic
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    test_acc = [float(r["test/acc"]) for r in rows if r.get("test/acc")][-1]
    margin = [float(r["train/p_self_minus_other_epoch"]) for r in rows if r.get("train/p_self_minus_other_epoch")]
    assert test_acc >= 0.9, test_acc
    assert margin[-1] > 0 and margin[-1] > margin[0], margin
    assert list(tmp_path.rglob("pairs/epoch*.png")), "PairLogger wrote no pair grid"


def test_uda_on_digits_beats_supervised_only_and_the_pixel_baselines(tmp_path):
    def run(method: str) -> dict[str, float]:
        result = run_zoo("fit", "-c", str(ROOT / "configs" / "semisup" / f"{method}_digits.yaml"),
                         f"--trainer.default_root_dir={tmp_path / method}", "--trainer.logger=false",
                         "--trainer.enable_progress_bar=false", timeout=1200, env={"OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        return results_from_stdout(result.stdout)

    uda, supervised = run("uda"), run("supervised")
    # seed 0, 5 labels per class: the unlabeled digits must add several points over the same CNN on labels alone
    assert uda["test/acc"] >= supervised["test/acc"] + 0.03, (uda, supervised)
    assert uda["test/acc"] > uda["baseline/logreg_acc"] and uda["test/acc"] > uda["baseline/label_spreading_acc"]


def test_ecn_on_toy_people_beats_source_only_on_the_target_domain(tmp_path):
    """Seed 0 of the documented demo (docs/models/reid.md): ECN ≥ 10 points above source-only in R1 and mAP."""
    def run(config: str) -> dict[str, float]:
        result = run_zoo("fit", "-c", str(ROOT / "configs" / "reid" / f"{config}_synthetic.yaml"),
                         f"--data.init_args.root={tmp_path / 'people'}", f"--trainer.default_root_dir={tmp_path / config}",
                         "--trainer.logger=false", "--trainer.enable_progress_bar=false", timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]
        # Two test loaders (query, gallery): Lightning prints each epoch-level metric once per loader column.
        return results_from_stdout(result.stdout, "test/")

    ecn, source_only = run("ecn"), run("source_only")
    assert ecn["test/rank1"] >= source_only["test/rank1"] + 0.10, (ecn, source_only)
    assert ecn["test/mAP"] >= source_only["test/mAP"] + 0.10, (ecn, source_only)
    assert (tmp_path / "ecn" / "version_0" / "rank_lists" / "test_epoch060.png").exists()


@pytest.mark.parametrize("model", ["ugatit", "nice_gan"])
def test_translation_on_digit_domains_beats_identity_kid_and_keeps_the_digit(model, tmp_path):
    """Seed 0 of the documented demo (docs/models/gan.md): both translations far below the identity mapping's KID,
    judged target-domain, and most translated digits still read as the same digit."""
    result = run_zoo("fit", "-c", str(ROOT / "configs" / "gan" / f"{model}_digits.yaml"),
                     f"--data.init_args.root={tmp_path / 'digits'}", f"--trainer.default_root_dir={tmp_path}",
                     "--trainer.logger=false", "--trainer.enable_progress_bar=false", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = results_from_stdout(result.stdout, "test/")
    for direction in ("a2b", "b2a"):
        assert metrics[f"test/kid_x100_{direction}"] < 0.5 * metrics[f"test/identity_kid_x100_{direction}"], metrics
        assert metrics[f"test/kid_x100_{direction}"] < 0.5 * metrics[f"test/untrained_kid_x100_{direction}"], metrics
        assert metrics[f"test/target_rate_{direction}"] >= 0.9, metrics
        assert metrics[f"test/content_acc_{direction}"] >= 0.6, metrics
    assert list((tmp_path / "version_0" / "translations").glob("test_*.png"))


@pytest.mark.parametrize("config", ["atss_digits", "gfl_digits", "rfcn_digits"])
def test_detector_on_digit_canvases_reaches_map50_070(config, tmp_path):
    # The embedded detection default as users run it (12 epochs; 3 min for ATSS/GFL, about 8 for R-FCN on 2 cores).
    # The documented 2-seed means are ATSS/GFL map_50 ≈ 0.95, R-FCN ≈ 0.88; the bar is 0.7.
    result = run_zoo("fit", "-c", str(ROOT / "configs" / "detection" / f"{config}.yaml"),
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                     "--trainer.enable_progress_bar=false", f"--data.init_args.root={tmp_path / 'canvas'}",
                     timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = results_from_stdout(result.stdout, "test/")
    assert metrics["test/map_50"] >= 0.7, metrics
    assert metrics["test/map"] >= 0.5, metrics


def _best_pseudo_miou(run_dir) -> float:
    table = next(run_dir.glob("version_*/tables/val_miou_vs_bg_threshold.csv")).read_text().splitlines()[1:]
    return max(float(row.split(",")[1]) for row in table)


def test_ppc_and_seam_on_digit_canvases_beat_all_background_and_ppc_keeps_up_with_seam(tmp_path):
    """Seed 0 of the documented demo (docs/models/wsss.md): the all-background predictor scores 0.082 mIoU on the
    pseudo-mask canvases; the issue's bars are "above all-background" and "PPC at most 2 points below SEAM-lite"."""
    scores = {}
    for variant in ("seam", "ppc"):
        result = run_zoo("fit", "-c", str(ROOT / "configs" / "wsss" / f"{variant}_digits.yaml"),
                         f"--data.init_args.root={tmp_path / 'data'}",
                         f"--trainer.default_root_dir={tmp_path / variant}",
                         "--trainer.logger=false", "--trainer.enable_progress_bar=false", timeout=1500)
        assert result.returncode == 0, result.stderr[-3000:]
        scores[variant] = _best_pseudo_miou(tmp_path / variant)
        assert results_from_stdout(result.stdout, "test/")["test/cam_miou"] > 0.3
    assert min(scores.values()) > 0.3, scores  # all background: 0.082
    assert scores["ppc"] >= scores["seam"] - 0.02, scores


def test_soft_teacher_on_5_percent_labelled_canvases_beats_its_supervised_start(tmp_path):
    # The embedded default as documented (docs/models/detection.md): supervised Faster R-CNN on the labelled 5 %
    # (1200 steps, about 7 min on 2 cores), then Soft Teacher from its last.ckpt (300 steps, about 5 min).
    common = ["--trainer.enable_progress_bar=false", f"--data.init_args.root={tmp_path / 'canvas'}"]
    supervised = run_zoo("fit", "-c", str(ROOT / "configs" / "detection" / "faster_rcnn_digits.yaml"),
                         f"--trainer.default_root_dir={tmp_path / 'supervised'}", "--trainer.logger=false", *common,
                         timeout=1800)
    assert supervised.returncode == 0, supervised.stderr[-3000:]
    baseline = results_from_stdout(supervised.stdout, "test/")
    checkpoint = tmp_path / "supervised" / "version_0" / "checkpoints" / "last.ckpt"
    csv_dir = tmp_path / "csv"
    soft = run_zoo("fit", "-c", str(ROOT / "configs" / "detection" / "soft_teacher_digits.yaml"),
                   f"--trainer.default_root_dir={tmp_path / 'soft_teacher'}", f"--finetune.init_from={checkpoint}",
                   "--trainer.logger=CSVLogger", f"--trainer.logger.init_args.save_dir={csv_dir}", *common,
                   timeout=1800)
    assert soft.returncode == 0, soft.stderr[-3000:]
    metrics = results_from_stdout(soft.stdout, "test/")
    rows = next(csv_dir.rglob("metrics.csv")).read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("train/pseudo_precision")
    precision = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    # Documented (seeds 0 / 1): supervised mAP@0.5 0.792 / 0.837, Soft Teacher's teacher 0.852 / 0.895; precision of
    # its boxes > 0.9 on the unlabelled canvases 0.92 / 0.95. The bars leave room for CPU nondeterminism.
    assert metrics["test/map_50"] >= baseline["test/map_50"] + 0.02, (metrics, baseline)
    assert sum(precision) / len(precision) >= 0.85, precision

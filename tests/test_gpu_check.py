"""``bench/gpu_check.py`` is the one command for a lent GPU: its CPU smoke version runs here."""

import importlib.util
import sys

from conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)


def test_every_embedded_default_config_is_checked_and_no_download_config_is():
    names = gpu_check.embedded_configs()
    for expected in ("classification/digits", "detection/gfl_digits", "fewshot/maml_glyphs", "gan/nice_gan_digits",
                     "reid/ecn_synthetic", "semisup/mpl_digits", "finegrained/api_net_toybirds"):
        assert expected in names
    assert not [n for n in names if n.endswith(("_coco", "_voc", "_cub", "_miniimagenet", "_cifar10_4000"))]
    assert "semisup/mpl_finetune_digits" not in names


def test_smoke_run_writes_a_row_per_config_and_precision_with_the_bf16_ratio(tmp_path):
    out = tmp_path / "gpu_check.md"
    table = gpu_check.main(["--smoke", "--steps", "4", "--warmup", "1", "--out", str(out)])
    assert out.read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| classification") or line.startswith("| semisup")]
    assert len(rows) == 4 and all("| yes |" in row for row in rows)
    bf16 = [row.split("|") for row in rows if "bf16-mixed" in row]
    assert all(float(cells[5]) > 0 for cells in bf16)  # the speed-up column is filled on the bf16 rows


def test_a_diverging_run_is_reported_not_finite(tmp_path):
    row = gpu_check.run("classification/digits", "32-true", 30, 1, str(tmp_path),
                        extra=["--optimizer.init_args.lr=1e6", "--last_checkpoint.every_n_train_steps=1"])
    assert row.finite.startswith("no")

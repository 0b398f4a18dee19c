import pytest
import torch
from torch import nn

from zoo.checkpoint import AtomicCheckpointIO, load_weights, read_state_dict, remap_keys


def test_remap_keys_longest_prefix_wins_and_strips():
    sd = {"encoder.conv.weight": 1, "encoder.head.bias": 2, "other": 3}
    out = remap_keys(sd, {"encoder.": "backbone.", "encoder.head.": ""})
    assert out == {"backbone.conv.weight": 1, "bias": 2, "other": 3}


def test_load_weights_reports_shape_mismatch_and_loads_the_rest(tmp_path):
    source = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 5))
    target = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 10))
    path = tmp_path / "w.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    before = target[1].weight.clone()
    report = load_weights(target, path)
    assert sorted(report.loaded) == ["0.bias", "0.weight"]
    assert {k for k, _, _ in report.shape_mismatched} == {"1.weight", "1.bias"}
    assert torch.equal(target[0].weight, source[0].weight)
    assert torch.equal(target[1].weight, before)
    assert "1.weight: file (5, 8) vs model (10, 8)" in report.summary()


def test_read_state_dict_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        read_state_dict(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="bad.ckpt"):
        read_state_dict(bad)


def test_atomic_save_keeps_previous_file_when_write_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 5, "w": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"global_step": 6, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


@pytest.mark.parametrize("config, extra", [
    ("detection/gfl_digits", ["--data.init_args.num_train=8", "--data.init_args.num_val=2", "--data.init_args.num_test=2"]),
    ("detection/rfcn_digits", ["--data.init_args.num_train=8", "--data.init_args.num_val=2", "--data.init_args.num_test=2"]),
    ("semisup/mpl_digits", ["--data.init_args.batch_size=4"]),
    ("semisup/uda_digits", ["--data.init_args.batch_size=4"]),
    ("fewshot/protonet_glyphs", ["--data.init_args.background_alphabets=3", "--data.init_args.evaluation_alphabets=1",
                                 "--data.init_args.characters_per_alphabet=5", "--data.init_args.drawers=5",
                                 "--data.init_args.val_alphabets=1",
                                 "--data.init_args.train_episodes={n_way: 5, k_shot: 1, n_query: 2, episodes: 4}",
                                 "--data.init_args.val_episodes={n_way: 5, k_shot: 1, n_query: 2, episodes: 2}"]),
])
def test_a_cli_checkpoint_loads_by_model_class_alone(config, extra, tmp_path):
    """``Model.load_from_checkpoint(path)`` rebuilds the networks (backbone, neck) from the config the CLI stored in
    the checkpoint, with no argument: what a user fine-tuning or evaluating from Python writes first."""
    from conftest import ROOT

    from zoo.cli import ZooCLI

    data_root = ["--data.init_args.root=" + str(tmp_path / "data")] if not config.startswith("semisup") else []
    cli = ZooCLI(args=["fit", "-c", str(ROOT / "configs" / f"{config}.yaml"), *data_root, *extra,
                       "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--test_after_fit=false",
                       "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
                       f"--trainer.default_root_dir={tmp_path / 'run'}"])
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    loaded = type(cli.model).load_from_checkpoint(ckpt, map_location="cpu")
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())

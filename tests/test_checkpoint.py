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

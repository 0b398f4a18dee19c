import torch

from conftest import quiet_args
from zoo.cli import ZooCLI


def test_pretrain_on_0_to_4_then_finetune_0_to_9_with_frozen_backbone(tmp_path):
    ZooCLI(args=["fit", *quiet_args(tmp_path / "pre", "--trainer.max_epochs=3",
                                    "--data.init_args.classes=[0,1,2,3,4]", "--model.init_args.num_classes=5")])
    pre_ckpt = tmp_path / "pre" / "version_0" / "checkpoints" / "last.ckpt"
    assert pre_ckpt.is_file()
    pre_state = torch.load(pre_ckpt, map_location="cpu", weights_only=True)["state_dict"]

    fine = ZooCLI(args=["fit", *quiet_args(tmp_path / "fine", "--trainer.max_epochs=3",
                                           f"--finetune.init_from={pre_ckpt}", "--finetune.freeze=[backbone.*]",
                                           "--test_after_fit=true")])
    after = fine.model.state_dict()
    backbone_keys = [k for k in pre_state if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone_keys)
    for key in backbone_keys:  # weights and BN statistics of the frozen backbone: bit-identical
        assert torch.equal(after[key], pre_state[key]), key
    assert after["head.fc.weight"].shape == (10, 128)  # the new 10-class head was skipped, not loaded
    # A new head on frozen features learnt from digits 0-4 alone still separates all ten (chance: 0.1).
    assert float(fine.trainer.callback_metrics["test/acc"]) > 0.5


def test_freeze_pattern_that_matches_nothing_is_an_error(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="bakbone"):
        ZooCLI(args=["fit", *quiet_args(tmp_path, "--trainer.fast_dev_run=true", "--finetune.freeze=[bakbone.*]")])

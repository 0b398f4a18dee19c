"""MLP-Mixer (Tolstikhin et al. 2021) and ResMLP (Touvron et al. 2021) as zoo backbones over timm's ``MlpMixer``."""

import pytest
import torch
from timm.models.mlp_mixer import Affine, MixerBlock, MlpMixer, ResBlock

from conftest import ROOT, quiet_args, results_from_stdout, run_zoo, write_image_folder
from zoo.backbones import MLPMixer, ResMLP
from zoo.classification.classifier import ImageClassifier
from zoo.classifier import Classifier
from zoo.cli import ZooCLI
from zoo.fewshot.episodic import query_targets
from zoo.fewshot.protonet import ProtoNet

CONFIGS = ROOT / "configs" / "classification"
DIGITS_SIZES = dict(img_size=8, in_chans=1, patch_size=2, num_blocks=4, embed_dim=64)  # spec §7.5: 16 tokens


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("backbone_class", [MLPMixer, ResMLP])
@pytest.mark.parametrize("size, patch", [(8, 2), (32, 4)])
def test_feature_map_is_the_patch_grid_of_embed_dim_channels(backbone_class, size, patch):
    net = backbone_class(img_size=size, in_chans=1, patch_size=patch, num_blocks=2, embed_dim=32)
    features = net(torch.randn(3, 1, size, size))
    assert features.shape == (3, 32, size // patch, size // patch)
    assert (net.out_channels, net.reduction) == (32, patch)
    logits = Classifier(net, 10)(torch.randn(3, 1, size, size))
    assert logits.shape == (3, 10)


@pytest.mark.parametrize("backbone_class", [MLPMixer, ResMLP])
def test_grid_is_the_tokens_in_row_major_patch_order(backbone_class):
    # The map at (i, j) must be token i·w + j of timm's forward_features, i.e. the patch in row i, column j.
    net = backbone_class(**DIGITS_SIZES).eval()
    images = torch.randn(2, 1, 8, 8)
    tokens = net.model.forward_features(images)  # (B, 16, C)
    grid = net(images)
    torch.testing.assert_close(grid[:, :, 1, 3], tokens[:, 1 * 4 + 3])
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), tokens)


@pytest.mark.parametrize("backbone_class, timm_args", [
    (MLPMixer, {}),
    (ResMLP, dict(mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine)),
])
def test_zoo_classifier_equals_timms_mlpmixer_in_parameters_and_logits(backbone_class, timm_args):
    net = backbone_class(**DIGITS_SIZES)
    ours = Classifier(net, 10).eval()
    reference = MlpMixer(num_classes=10, **DIGITS_SIZES, **timm_args).eval()
    assert _parameter_count(ours) == _parameter_count(reference)
    # With timm's weights copied in, GAP over the grid + linear is timm's token mean + head, logit for logit.
    reference.load_state_dict({**{k: v for k, v in net.model.state_dict().items()},
                               "head.weight": ours.head.fc.weight, "head.bias": ours.head.fc.bias})
    images = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(ours(images), reference(images))


def test_block_parameter_counts_match_the_papers_formulas():
    d, s = 64, 16
    mixer_block = MLPMixer(**DIGITS_SIZES).model.blocks[0]
    # 2 LayerNorms (2d each) + token MLP S→d/2→S + channel MLP d→4d→d, with biases.
    expected_mixer = 2 * 2 * d + (s * d // 2 + d // 2 + d // 2 * s + s) + (d * 4 * d + 4 * d + 4 * d * d + d)
    assert _parameter_count(mixer_block) == expected_mixer == 34_416
    resmlp_block = ResMLP(**DIGITS_SIZES).model.blocks[0]
    # 2 Affine (2d each) + one S×S linear with bias + channel MLP (8d² + 5d) + 2 LayerScale vectors (d each).
    expected_resmlp = 2 * 2 * d + s * s + s + (8 * d * d + 5 * d) + 2 * d
    assert _parameter_count(resmlp_block) == expected_resmlp == 33_744


def test_token_mixing_weights_have_the_papers_shapes():
    d, s = 64, 16
    for block in MLPMixer(**DIGITS_SIZES).model.blocks:
        assert isinstance(block, MixerBlock)
        assert block.mlp_tokens.fc1.weight.shape == (d // 2, s)  # D_S = d/2 hidden units across the S patches
        assert block.mlp_tokens.fc2.weight.shape == (s, d // 2)
        assert block.mlp_channels.fc1.weight.shape == (4 * d, d)
    for block in ResMLP(**DIGITS_SIZES).model.blocks:
        assert isinstance(block, ResBlock)
        assert block.linear_tokens.weight.shape == (s, s)  # ResMLP's A: one linear layer across patches


def _permute_patches(images: torch.Tensor, patch: int, order: torch.Tensor) -> torch.Tensor:
    """Images with their ``patch``×``patch`` tiles rearranged: tile ``k`` of the result is tile ``order[k]``."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    tiles = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, patch, patch)
    tiles = tiles[:, order]
    return tiles.reshape(b, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@pytest.mark.parametrize("backbone_class", [MLPMixer, ResMLP])
def test_token_mixing_is_position_aware_without_a_positional_embedding(backbone_class):
    torch.manual_seed(0)
    net = backbone_class(**DIGITS_SIZES, **({"init_values": 1.0} if backbone_class is ResMLP else {})).eval()
    assert not [n for n, _ in net.named_parameters() if "pos" in n]  # no positional embedding
    images = torch.randn(2, 1, 8, 8)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    moved = _permute_patches(images, 2, order)
    with torch.no_grad():
        grid, grid_moved = net(images), net(moved)
    # A token-wise (bag-of-patches) network would just carry its outputs along with the patches: equivariance.
    carried = grid.flatten(2)[:, :, order]
    assert not torch.allclose(grid_moved.flatten(2), carried, atol=1e-3)
    # ...and pooled features (what the classifier sees) would not change; here they do.
    assert not torch.allclose(grid_moved.mean((2, 3)), grid.mean((2, 3)), atol=1e-3)
    # Sanity of the permutation itself: the stem (a per-patch linear map) is exactly equivariant.
    stem, stem_moved = net.model.stem(images), net.model.stem(moved)
    torch.testing.assert_close(stem_moved, stem[:, order])


def test_resmlp_has_only_affine_norms_and_mixer_only_layernorm():
    resmlp, mixer = ResMLP(**DIGITS_SIZES), MLPMixer(**DIGITS_SIZES)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in resmlp.modules())
    assert sum(isinstance(m, Affine) for m in resmlp.modules()) == 2 * 4 + 1  # two per block + the final norm
    assert not any(isinstance(m, Affine) for m in mixer.modules())


def test_resmlp_block_is_near_identity_at_init():
    torch.manual_seed(0)
    x = torch.randn(8, 16, 64)
    for block in ResMLP(**DIGITS_SIZES, init_values=1e-4).model.blocks:
        assert ((block(x) - x).norm() / x.norm()).item() < 1e-3
    # The bound is not vacuous: a Mixer block (no LayerScale) moves its input by far more.
    mixer_block = MLPMixer(**DIGITS_SIZES).model.blocks[0]
    assert ((mixer_block(x) - x).norm() / x.norm()).item() > 0.1


def test_resmlp_layerscale_default_follows_depth_and_init_values_overrides_it():
    def layerscale(net):
        return {round(v, 8) for block in net.model.blocks for v in (*block.ls1.tolist(), *block.ls2.tolist())}

    assert layerscale(ResMLP(**DIGITS_SIZES)) == {0.1}  # 4 blocks: CaiT's 0.1 for depth ≤ 18
    assert layerscale(ResMLP(**{**DIGITS_SIZES, "num_blocks": 20, "embed_dim": 8})) == {1e-5}
    assert layerscale(ResMLP(**DIGITS_SIZES, init_values=1e-4)) == {1e-4}


@pytest.mark.parametrize("backbone_class, name, channels, reduction, block_type", [
    (ResMLP, "resmlp_12_224", 384, 16, ResBlock),
    (MLPMixer, "mixer_s32_224", 512, 32, MixerBlock),
])
def test_registered_names_build_at_the_papers_sizes(backbone_class, name, channels, reduction, block_type):
    net = backbone_class(name=name, pretrained=False)
    assert (net.out_channels, net.reduction) == (channels, reduction)
    assert all(isinstance(b, block_type) for b in net.model.blocks)
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 224, 224)).shape == (1, channels, 224 // reduction, 224 // reduction)


def test_resmlp_name_takes_init_values_but_not_with_pretrained_weights():
    net = ResMLP(name="resmlp_12_224", init_values=0.1)  # the official ResMLP-12 init (timm starts at 1e-4)
    assert torch.all(net.model.blocks[5].ls2 == 0.1)
    with pytest.raises(ValueError, match="init_values"):
        ResMLP(name="resmlp_12_224", pretrained=True, init_values=0.1)


def test_a_name_with_different_custom_sizes_is_a_clear_error():
    with pytest.raises(ValueError, match=r"patch_size=16 \(the model has 32\)"):
        MLPMixer(name="mixer_s32_224", patch_size=16)
    with pytest.raises(ValueError, match="embed_dim=64"):
        ResMLP(name="resmlp_12_224", embed_dim=64)
    with pytest.raises(ValueError, match="resmlp_12_224"):
        MLPMixer(name="resmlp_12_224")  # another family's name
    with pytest.raises(ValueError, match="registered `name`"):
        MLPMixer(pretrained=True)
    # Giving the registered sizes again is fine.
    assert MLPMixer(name="mixer_s32_224", patch_size=32, num_blocks=8, embed_dim=512, mlp_ratio=(0.5, 4.0)).reduction == 32


@pytest.mark.parametrize("backbone_class", [MLPMixer, ResMLP])
def test_an_input_of_another_size_is_a_clear_error(backbone_class):
    with pytest.raises(ValueError, match=r"built for 8×8 images .* got 16×16"):
        backbone_class(**DIGITS_SIZES)(torch.zeros(1, 1, 16, 16))


def test_protonet_episode_with_a_mixer_backbone_trains_the_backbone():
    torch.manual_seed(0)
    model = ProtoNet(backbone=MLPMixer(**DIGITS_SIZES), feature_dim=64 * 4 * 4)
    n_way, k_shot, n_query = 3, 2, 4
    support, query = torch.randn(n_way, k_shot, 1, 8, 8), torch.randn(n_way, n_query, 1, 8, 8)
    scores = model.episode_logits(support, query)
    assert scores.shape == (n_way * n_query, n_way)
    loss = model.episode_loss(scores, query_targets(n_way, n_query, scores.device))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.backbone.model.blocks[0].mlp_tokens.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone_class", [MLPMixer, ResMLP])
def test_class_activation_maps_on_the_patch_grid_average_to_the_logits(backbone_class):
    model = ImageClassifier(backbone=backbone_class(**DIGITS_SIZES), num_classes=10).eval()
    with torch.no_grad():
        logits, cams = model.class_activation_maps(torch.randn(2, 1, 8, 8))
    assert cams.shape == (2, 10, 4, 4)
    torch.testing.assert_close(cams.mean((2, 3)) + model.head.fc.bias, logits)  # CAM's identity (Zhou et al., Eq. 2)


@pytest.mark.parametrize("config, backbone_class", [("mixer_digits", MLPMixer), ("resmlp_digits", ResMLP)])
def test_digits_configs_fast_dev_run(config, backbone_class, tmp_path):
    cli = ZooCLI(args=["fit", *quiet_args(tmp_path, "--trainer.fast_dev_run=true",
                                          config=CONFIGS / f"{config}.yaml")])
    assert cli.trainer.global_step == 1
    assert isinstance(cli.model.backbone, backbone_class)


@pytest.mark.parametrize("config", ["mixer_b16_imagefolder", "resmlp_12_imagefolder"])
def test_paper_size_configs_fast_dev_run_on_an_image_folder(config, tmp_path):
    # The papers' architectures at a 64 px input (a registered name takes img_size), on a 10-class folder fixture.
    write_image_folder(tmp_path / "data", classes=[f"c{i}" for i in range(10)], per_class=2)
    cli = ZooCLI(args=["fit", *quiet_args(tmp_path / "run", "--trainer.fast_dev_run=true",
                                          f"--data.init_args.root={tmp_path / 'data'}", "--data.init_args.image_size=64",
                                          "--model.init_args.backbone.init_args.img_size=64",
                                          "--model.init_args.num_classes=10", "--data.init_args.num_workers=0",
                                          "--data.init_args.batch_size=2", "--trainer.precision=32-true",
                                          config=CONFIGS / f"{config}.yaml")])
    assert cli.trainer.global_step == 1 and cli.model.backbone.img_size == (64, 64)


@pytest.mark.parametrize("config, backbone_class, channels, reduction, optimizer, peak_lr, warmup_epochs", [
    ("mixer_b16_imagefolder.yaml", MLPMixer, 768, 16, "AdamW", 1e-3, 32),  # big_vision: 10k steps at batch 4096
    ("resmlp_12_imagefolder.yaml", ResMLP, 384, 16, "Lamb", 5e-3, 5),  # DeiT's 5 warm-up epochs
])
def test_paper_size_configs_build_with_the_papers_schedule(config, backbone_class, channels, reduction, optimizer,
                                                           peak_lr, warmup_epochs, tmp_path):
    cli = ZooCLI(args=["-c", str(CONFIGS / config), "--trainer.logger=false",
                       f"--trainer.default_root_dir={tmp_path}"], run=False)
    backbone = cli.model.backbone
    assert isinstance(backbone, backbone_class)
    assert (backbone.out_channels, backbone.reduction) == (channels, reduction)
    (opt,), (scheduler,) = cli.model.configure_optimizers()
    assert type(opt).__name__ == optimizer
    learning_rates = []
    for _ in range(cli.trainer.max_epochs):  # Lightning steps an epoch-interval scheduler once per epoch
        learning_rates.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: nothing moves, but the scheduler may step after it
        scheduler.step()
    assert learning_rates[0] < peak_lr / 30
    assert max(learning_rates) == pytest.approx(peak_lr, rel=1e-4)
    assert learning_rates.index(max(learning_rates)) == warmup_epochs - 1
    assert learning_rates[-1] == pytest.approx(1e-5, rel=0.05)  # both recipes end at 1e-5
    if backbone_class is ResMLP:  # the official ResMLP-12 LayerScale init, not timm's 1e-4
        assert torch.all(backbone.model.blocks[0].ls1 == 0.1)


def test_the_backbone_docstring_examples_hold():
    import doctest

    import zoo.backbones

    result = doctest.testmod(zoo.backbones)
    assert result.failed == 0 and result.attempted >= 6  # the examples of TimmBackbone, MLPMixer and ResMLP ran


@pytest.mark.slow
def test_mixer_digits_demo_reaches_the_pixel_baselines_level(tmp_path):
    # The full demo, seed 0 (about 40 s on the 2-core dev machine). Measured on 2026-12-06 (one torch thread): test
    # acc 0.9722 / 0.9778 / 0.9500 for seeds 0 / 1 / 2, logistic regression on the pixels 0.9722 (seed 0 ties it, 10
    # errors each), 1-NN 0.9778. So the run is held to a measured floor and to within one point of logistic
    # regression, not to beating it; the digits CNN beats both (0.9944).
    result = run_zoo("fit", "-c", str(CONFIGS / "mixer_digits.yaml"), f"--trainer.default_root_dir={tmp_path}",
                     "--trainer.enable_progress_bar=false", "--seed_everything=0", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = results_from_stdout(result.stdout)
    assert metrics["test/acc"] >= 0.96, metrics
    assert metrics["test/acc"] >= metrics["baseline/logreg_acc"] - 0.01, metrics


"""U-GAT-IT and NICE-GAN parts: normalisations, CAM, losses, spectral norm, schedule, decoupling, KID."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo.gan.evaluation import kernel_inception_distance
from zoo.schedules import half_then_linear_decay
from zoo.gan.layers import (ILN, AdaILN, ClassActivationAttention, clip_rho_,
                            legacy_spectral_norm_state_dict, lsgan_d_loss, lsgan_g_loss)
from zoo.gan.nice_gan import NICEGAN, NICEDiscriminator
from zoo.gan.ugatit import UGATIT, UGATITDiscriminator, UGATITGenerator


def tiny_ugatit(**kwargs) -> UGATIT:
    return UGATIT(ngf=4, ndf=4, n_res=1, global_layers=4, local_layers=3, img_size=16, light=True, **kwargs)


def tiny_nice(**kwargs) -> NICEGAN:
    return NICEGAN(ch=4, n_res=1, n_layers=6, global_extra=1, img_size=32, light=True, **kwargs)


# ---- AdaILN / ILN ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rho, reference", [
    (1.0, lambda x: F.instance_norm(x, eps=1e-5)),
    (0.0, lambda x: F.layer_norm(x, x.shape[1:], eps=1e-5)),
])
def test_adailn_is_instance_norm_at_rho_1_and_layer_norm_at_rho_0_then_affine(rho, reference):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, 7) * 3 + 1
    gamma, beta = torch.randn(3, 5), torch.randn(3, 5)
    norm = AdaILN(5)
    with torch.no_grad():
        norm.rho.fill_(rho)
    expected = reference(x) * gamma[:, :, None, None] + beta[:, :, None, None]
    torch.testing.assert_close(norm(x, gamma, beta), expected, atol=1e-5, rtol=1e-5)


def test_adailn_mixes_linearly_between_the_two():
    x = torch.randn(2, 4, 5, 5)
    gamma, beta = torch.ones(2, 4), torch.zeros(2, 4)
    norm = AdaILN(4, rho_init=0.25)
    expected = 0.25 * F.instance_norm(x, eps=1e-5) + 0.75 * F.layer_norm(x, x.shape[1:], eps=1e-5)
    torch.testing.assert_close(norm(x, gamma, beta), expected, atol=1e-5, rtol=1e-5)


def test_iln_starts_as_layer_norm_and_the_clipper_keeps_rho_in_0_1():
    iln = ILN(3)
    assert (iln.rho == 0).all() and (iln.gamma == 1).all() and (iln.beta == 0).all()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(iln(x), F.layer_norm(x, x.shape[1:], eps=1e-5), atol=1e-5, rtol=1e-5)
    net = nn.Sequential(AdaILN(2), ILN(2))
    with torch.no_grad():
        net[0].rho.copy_(torch.tensor([-0.5, 1.7]).view(1, 2, 1, 1))
        net[1].rho.copy_(torch.tensor([0.3, 2.0]).view(1, 2, 1, 1))
    clip_rho_([net])
    assert net[0].rho.flatten().tolist() == [0.0, 1.0]
    assert net[1].rho.flatten().tolist() == pytest.approx([0.3, 1.0])


def test_generator_rho_is_clipped_after_a_training_step():
    model = tiny_ugatit(lr=1.0)  # Adam's first step moves every ρ by ≈ 1: out of [0, 1] unless clipped
    rho = torch.cat([r.flatten() for r in _train_steps(model, 1)])
    assert 0.0 <= rho.min() and rho.max() <= 1.0
    assert ((rho == 0) | (rho == 1)).float().mean() > 0.5


def _train_steps(model, steps, size=16):
    import lightning as L

    class Domains(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"A": (torch.rand(3, size, size, generator=g) * 2 - 1, -1, i),
                    "B": (torch.rand(3, size, size, generator=g) - 1, -1, i)}

    trainer = L.Trainer(max_steps=2 * steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, torch.utils.data.DataLoader(Domains(), batch_size=2))
    return [m.rho.detach() for m in model.modules() if isinstance(m, (AdaILN, ILN))]


# ---- CAM -------------------------------------------------------------------------------------------------------------

def test_cam_logits_are_the_pooled_features_scored_and_the_map_is_reweighted_per_channel():
    torch.manual_seed(0)
    cam = ClassActivationAttention(4, activation=nn.Identity())
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():  # 1×1 conv that keeps the GAP-weighted half only
        cam.conv1x1.weight.zero_()
        cam.conv1x1.weight[:, :4, 0, 0] = torch.eye(4)
        cam.conv1x1.bias.zero_()
    out, logit, heatmap = cam(x)
    assert logit.shape == (2, 2) and heatmap.shape == (2, 1, 5, 6)
    w_gap, w_gmp = cam.gap_fc.weight[0], cam.gmp_fc.weight[0]
    torch.testing.assert_close(logit[:, 0], x.mean(dim=(2, 3)) @ w_gap)
    torch.testing.assert_close(logit[:, 1], x.amax(dim=(2, 3)) @ w_gmp)
    torch.testing.assert_close(out, x * w_gap[None, :, None, None])
    torch.testing.assert_close(heatmap, out.sum(1, keepdim=True))


def test_generator_and_discriminator_shapes():
    x = torch.randn(2, 3, 32, 32)
    image, cam_logit, heatmap = UGATITGenerator(ngf=8, n_res=2, img_size=32, light=False)(x)
    assert image.shape == x.shape and cam_logit.shape == (2, 2) and heatmap.shape == (2, 1, 8, 8)
    assert image.abs().max() <= 1
    logits, cam_logit, _ = UGATITDiscriminator(ndf=8, n_layers=5)(x)
    assert logits.shape == (2, 1, 2, 2) and cam_logit.shape == (2, 2)


# ---- losses ----------------------------------------------------------------------------------------------------------

def test_lsgan_losses_vanish_for_a_perfect_discriminator_and_a_perfect_generator():
    ones, zeros = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    assert lsgan_d_loss([ones, torch.ones(2, 2)], [zeros, torch.zeros(2, 2)]) == 0
    assert lsgan_d_loss([zeros], [ones]) == 2  # everything wrong: (0 − 1)² + (1 − 0)²
    assert lsgan_g_loss([ones, torch.ones(2, 2)]) == 0
    assert lsgan_g_loss([torch.full((4,), 0.5)]) == pytest.approx(0.25)


class _StubGenerator(nn.Module):
    """Identity translation; CAM logit ``sign · 40 · mean(x)``, so it can be told which domain is its source."""

    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign, self.dummy = sign, nn.Parameter(torch.zeros(()))

    def forward(self, x):
        logit = self.sign * 40 * x.mean(dim=(1, 2, 3))[:, None].expand(-1, 2) + self.dummy
        return x + self.dummy, logit, x.sum(1, keepdim=True)


def test_ugatit_generator_loss_weights_and_cam_targets():
    model = tiny_ugatit()
    real_a, real_b = torch.full((2, 3, 16, 16), 0.5), torch.full((2, 3, 16, 16), -0.5)
    # A → B generator says "source" (+) for A images, B → A says "source" for B images: the CAM loss must be ~0.
    model.gen_a2b, model.gen_b2a = _StubGenerator(+1), _StubGenerator(-1)
    losses = model.generator_losses(real_a, real_b)
    assert losses["cycle"] == 0 and losses["identity"] == 0  # identity generators: no cycle, no identity loss
    assert losses["g_cam"] < 1e-2
    expected = losses["g_adversarial"] + 10 * losses["cycle"] + 10 * losses["identity"] + 1000 * losses["g_cam"]
    torch.testing.assert_close(losses["g_loss"], expected)
    model.gen_a2b, model.gen_b2a = _StubGenerator(-1), _StubGenerator(+1)  # each calls its source the target
    assert model.generator_losses(real_a, real_b)["g_cam"] > 10


def test_cycle_loss_is_zero_for_identity_generators_and_positive_otherwise():
    model = tiny_ugatit()
    real_a, real_b = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    assert model.generator_losses(real_a, real_b)["cycle"] > 0
    model.gen_a2b, model.gen_b2a = _StubGenerator(1), _StubGenerator(-1)
    assert model.generator_losses(real_a, real_b)["cycle"] == 0


# ---- spectral normalisation -----------------------------------------------------------------------------------------

def _is_sn(module: nn.Module) -> bool:
    return torch.nn.utils.parametrize.is_parametrized(module, "weight")


def test_spectral_norm_on_every_discriminator_layer_but_the_1x1_and_nowhere_in_the_generators():
    model = tiny_ugatit()
    for d in (model.dis_global_a, model.dis_local_b):
        for name, m in d.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                assert _is_sn(m) == (name != "cam.conv1x1"), name
    assert not any(_is_sn(m) for m in model.gen_a2b.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    nice = tiny_nice()
    sn = {name: _is_sn(m) for name, m in nice.dis_a.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert not sn.pop("conv1x1") and all(sn.values()), sn
    assert not any(_is_sn(m) for m in nice.gen_to_b.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_spectral_norm_bounds_the_largest_singular_value_by_one_after_training_forwards():
    torch.manual_seed(0)
    d = UGATITDiscriminator(ndf=8, n_layers=4).train()
    for _ in range(20):
        d(torch.randn(2, 3, 16, 16))
    layers = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and _is_sn(m)]
    assert len(layers) == 6  # 3 convs, 2 CAM heads, output conv
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert abs(float(sigma) - 1) < 1e-2


def test_legacy_spectral_norm_checkpoints_load_with_the_key_map():
    torch.manual_seed(0)
    legacy = torch.nn.utils.spectral_norm(nn.Conv2d(3, 4, 3))
    for _ in range(5):
        legacy(torch.randn(1, 3, 5, 5))
    legacy.eval()
    state = legacy.state_dict()
    assert {"weight_orig", "weight_u", "weight_v"} <= set(state)
    modern = torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 3)).eval()
    modern.load_state_dict(legacy_spectral_norm_state_dict(state))
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(modern(x), legacy(x))


# ---- schedule ----------------------------------------------------------------------------------------------------

def test_learning_rate_is_flat_for_the_first_half_then_linear_to_zero():
    factor = half_then_linear_decay(100)
    assert [factor(s) for s in (0, 25, 50)] == [1.0, 1.0, 1.0]
    assert factor(75) == pytest.approx(0.5) and factor(100) == 0.0 and factor(90) == pytest.approx(0.2)
    model = tiny_ugatit(total_iterations=10)
    (opt_g, opt_d), schedules = model.configure_optimizers()
    lrs = []
    for _ in range(10):
        lrs.append(opt_g.param_groups[0]["lr"])
        for s in schedules:
            s["scheduler"].step()
    assert lrs[:6] == [1e-4] * 6 and lrs[6:] == pytest.approx([8e-5, 6e-5, 4e-5, 2e-5])
    assert opt_d.param_groups[0]["lr"] == pytest.approx(0.0)
    assert opt_g.param_groups[0]["betas"] == (0.5, 0.999) and opt_g.param_groups[0]["weight_decay"] == 1e-4


# ---- NICE-GAN ---------------------------------------------------------------------------------------------------------

def test_nice_code_shape_and_heads():
    d = NICEDiscriminator(ndf=8, n_layers=6, global_extra=1)
    local, global_, cam_logit, heatmap, z = d(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 16, 8, 8) and cam_logit.shape == (2, 1) and heatmap.shape == (2, 1, 8, 8)
    assert local.shape[-1] > global_.shape[-1]  # the global head sees more of the image per logit
    with pytest.raises(ValueError, match="n_layers"):
        NICEDiscriminator(n_layers=5)


def test_a_discriminator_too_deep_for_the_image_size_fails_at_construction_naming_the_size():
    with pytest.raises(ValueError, match="at least 96 px, got img_size=64"):
        UGATIT(light=True, img_size=64)  # the paper's 7-layer global discriminator: 5 stride-2 convs
    with pytest.raises(ValueError, match="at least 96 px, got img_size=64"):
        NICEGAN(light=True, img_size=64)
    UGATIT(light=True, img_size=64, global_layers=6, ngf=4, ndf=4)(torch.randn(1, 3, 64, 64))


def test_nice_generator_step_leaves_the_encoders_alone_and_the_discriminator_step_moves_them():
    torch.manual_seed(0)
    model = tiny_nice(total_iterations=10)
    # parameters only: the spectral norm's power-iteration vectors (buffers) advance on every training forward
    encoder_before = {k: v.detach().clone() for k, v in model.dis_a.encoder.named_parameters()}
    decoder_before = {k: v.clone() for k, v in model.gen_to_b.state_dict().items()}
    opt_g, opt_d = [o for o in model.configure_optimizers()[0]]
    real_a, real_b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    opt_g.zero_grad()
    model.generator_losses(real_a, real_b)["g_loss"].backward()
    opt_g.step()
    for k, v in model.dis_a.encoder.named_parameters():
        assert torch.equal(v, encoder_before[k]), k
    assert any(not torch.equal(v, decoder_before[k]) for k, v in model.gen_to_b.state_dict().items())
    opt_d.zero_grad()
    model.discriminator_loss(real_a, real_b).backward()
    opt_d.step()
    changed = [k for k, v in model.dis_a.encoder.named_parameters() if not torch.equal(v, encoder_before[k])]
    assert any(k.endswith("original") for k in changed)
    assert not any(p is q for p in model.generator_parameters() for q in model.discriminator_parameters())


def test_nice_translation_goes_through_the_source_domains_encoder():
    model = tiny_nice().eval()
    x = torch.rand(1, 3, 32, 32)
    expected = model.gen_to_b(model.dis_a.encode(x)[0])
    torch.testing.assert_close(model.translate(x, "a2b"), expected)
    with torch.no_grad():
        model.dis_b.encoder[1].parametrizations.weight.original.mul_(2)  # B's encoder does not take part in A → B
    torch.testing.assert_close(model.translate(x, "a2b"), expected)


# ---- KID --------------------------------------------------------------------------------------------------------------

def test_kid_matches_torchmetrics_on_full_sets_and_is_near_zero_for_one_distribution():
    from torchmetrics.image.kid import KernelInceptionDistance

    torch.manual_seed(0)
    real, fake = torch.randn(60, 16), torch.randn(60, 16) + 0.5
    reference = KernelInceptionDistance(feature=nn.Identity(), subsets=3, subset_size=60)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    ours, _ = kernel_inception_distance(real, fake, subsets=3, subset_size=60)
    assert ours == pytest.approx(float(reference.compute()[0]), rel=1e-4)
    swapped, _ = kernel_inception_distance(fake, real, subsets=3, subset_size=60)
    assert swapped == pytest.approx(ours)  # symmetric
    noise, _ = kernel_inception_distance(torch.randn(500, 16), torch.randn(500, 16), subsets=20, subset_size=200)
    assert abs(noise) < 0.1 * ours


def test_kid_clips_the_subset_size_to_the_sample():
    real, fake = torch.randn(30, 8), torch.randn(40, 8) + 1
    assert kernel_inception_distance(real, fake, subsets=5, subset_size=1000) == \
        kernel_inception_distance(real, fake, subsets=5, subset_size=30)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(real[:1], fake)


# ---- training through Lightning: resume, the CLI on format fixtures ------------------------------------------------

def _write_domains(root, count=4, size=16):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("trainA", "trainB", "testA", "testB"):
        (root / split).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def _fit(model, root, max_epochs, ckpt_path=None, checkpoint_dir=None):
    import lightning as L

    from datamodules.gan import UnpairedDataModule
    from zoo.callbacks import LastCheckpoint

    data = UnpairedDataModule(root=str(root), image_size=16, load_size=None, flip=False, batch_size=2, steps_per_epoch=2,
                              num_workers=0, pin_memory=False)
    callbacks = [LastCheckpoint(dirpath=checkpoint_dir)] if checkpoint_dir else []
    trainer = L.Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, enable_checkpointing=bool(checkpoint_dir), callbacks=callbacks)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def test_resume_restores_both_networks_both_optimizers_and_the_schedule(tmp_path):
    import lightning as L

    root = _write_domains(tmp_path / "data")
    # two epochs of 2 iterations straight, against one epoch (last.ckpt written at its end) and a resume
    L.seed_everything(0)
    straight = tiny_ugatit(total_iterations=4)
    _fit(straight, root, max_epochs=2)
    L.seed_everything(0)
    _fit(tiny_ugatit(total_iterations=4), root, max_epochs=1, checkpoint_dir=tmp_path / "ckpt")
    L.seed_everything(123)  # a different init: everything must come from the checkpoint
    resumed = tiny_ugatit(total_iterations=4)
    trainer = _fit(resumed, root, max_epochs=2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.global_step == 8  # 4 iterations, a D and a G step each
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    for opt_a, opt_b in zip(straight.optimizers(use_pl_optimizer=False), resumed.optimizers(use_pl_optimizer=False)):
        for state_a, state_b in zip(opt_a.state.values(), opt_b.state.values()):
            torch.testing.assert_close(state_a["exp_avg"], state_b["exp_avg"])
    for sched_a, sched_b in zip(straight.lr_schedulers(), resumed.lr_schedulers()):
        assert sched_a.last_epoch == sched_b.last_epoch == 4
        assert sched_a.get_last_lr() == sched_b.get_last_lr() == [0.0]


@pytest.mark.parametrize("name", ["ugatit", "nice_gan"])
def test_real_data_config_trains_and_scores_on_a_format_fixture(name, tmp_path):
    from conftest import ROOT

    from zoo.cli import ZooCLI

    root = _write_domains(tmp_path / "data", count=6, size=40)
    small = (["--model.init_args.ngf=4", "--model.init_args.ndf=4", "--model.init_args.n_res=1",
              "--model.init_args.global_layers=4", "--model.init_args.local_layers=3"] if name == "ugatit" else
             ["--model.init_args.ch=4", "--model.init_args.n_res=1", "--model.init_args.n_layers=6",
              "--model.init_args.global_extra=1"])
    # the paper's Inception KID needs torch-fidelity and a download: score with a 1-epoch judge instead
    config = tmp_path / f"{name}.yaml"
    text = (ROOT / "configs" / "gan" / f"{name}_selfie2anime.yaml").read_text()
    config.write_text(text.replace("features: inception", "features: judge\n        judge_epochs: 1")
                      .replace("subsets: 100", "subsets: 5"))
    cli = ZooCLI(args=["fit", "-c", str(config), f"--data.init_args.root={root}", "--data.init_args.image_size=32",
                       "--data.init_args.load_size=36", "--data.init_args.num_workers=0",
                       "--data.init_args.eval_batch_size=4", "--data.init_args.steps_per_epoch=2",
                       "--model.init_args.img_size=32", "--model.init_args.light=true", *small, "--trainer.max_steps=4", "--trainer.max_epochs=1",
                       "--trainer.check_val_every_n_epoch=1", "--trainer.logger=false",
                       "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert cli.trainer.global_step == 4  # two iterations, a D step and a G step each
    metrics = cli.trainer.callback_metrics
    assert {"test/kid_x100_a2b", "test/kid_x100_b2a", "test/identity_kid_x100_a2b",
            "test/untrained_target_rate_b2a"} <= set(metrics), sorted(metrics)
    assert "test/content_acc_a2b" not in metrics  # no labels: nothing to preserve is known
    assert (tmp_path / "run" / "version_0" / "translations" / "test_epoch000.png").exists() or \
        list((tmp_path / "run" / "version_0" / "translations").glob("test_*.png"))
    assert list((tmp_path / "run" / "version_0" / "checkpoints").glob("best-*.ckpt"))  # selected by val/kid_x100, so it was logged


def test_two_process_evaluation_gathers_every_test_image_once_and_matches_one_process(tmp_path):
    """testA/testB are sharded across ranks (7 images: shards of 4 and 3); the features are all-gathered, padding
    dropped and the order restored, so KID, target rates and the baselines equal the single-process numbers."""
    from conftest import ROOT, results_from_stdout, run_zoo

    root = _write_domains(tmp_path / "data", count=7, size=36)
    config = tmp_path / "ugatit.yaml"
    text = (ROOT / "configs" / "gan" / "ugatit_selfie2anime.yaml").read_text()
    config.write_text(text.replace("features: inception", "features: judge\n        judge_epochs: 1")
                      .replace("subsets: 100", "subsets: 10"))
    common = ["test", "-c", str(config), f"--data.init_args.root={root}", "--data.init_args.image_size=32",
              "--data.init_args.load_size=36", "--data.init_args.num_workers=0", "--data.init_args.eval_batch_size=2",
              "--model.init_args.img_size=32", "--model.init_args.light=true", "--model.init_args.ngf=4",
              "--model.init_args.ndf=4", "--model.init_args.n_res=1", "--model.init_args.global_layers=4",
              "--model.init_args.local_layers=3", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              "--trainer.accelerator=cpu"]

    def metrics(*extra: str) -> dict[str, float]:
        result = run_zoo(*common, f"--trainer.default_root_dir={tmp_path / str(len(extra))}", *extra, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        return results_from_stdout(result.stdout, "test/")

    one = metrics("--trainer.devices=1")
    two = metrics("--trainer.devices=2", "--trainer.strategy=ddp")
    assert len(one) == 13 and set(one) == set(two), (one, two)  # KID and target rate × 3 translations × 2, mean KID
    for name in one:
        assert two[name] == pytest.approx(one[name], rel=1e-3, abs=1e-4), name

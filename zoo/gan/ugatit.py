"""U-GAT-IT: Unsupervised Generative Attentional Networks with Adaptive Layer-Instance Normalization for
Image-to-Image Translation (Kim, Kim, Kang & Lee, ICLR 2020, https://arxiv.org/abs/1907.10830).

A CycleGAN-style pair of generators ``G_AB``, ``G_BA`` with, per domain, a global and a local discriminator, plus:

* CAM attention (§2.1.1) in the generators and the discriminators: an auxiliary classifier ``η`` on the pooled
  encoder map says which domain the input comes from; its weights re-weight the map's channels, so the generator
  attends to what distinguishes the domains (``zoo.gan.layers.ClassActivationAttention``).
* AdaILN (eq. 1) in the decoder's residual blocks, ``γ, β`` from an MLP on the attended map (full mode flattens the
  whole map, ``light=True`` pools it first), and ILN in the up-sampling blocks; ρ clipped to [0, 1] after each step.
* Spectral normalisation on every discriminator layer except the CAM block's 1×1 convolution.

Losses (§2.2), for the A side (B symmetric): LSGAN on the patch output and on the CAM logits of both discriminators
(weight 1), cycle ``‖G_BA(G_AB(a)) − a‖₁`` (10), identity ``‖G_BA(a) − a‖₁`` (10) and the generator's CAM loss
``BCE(η_BA(b), 1) + BCE(η_BA(a), 0)`` (1000): ``G_BA``'s classifier must tell its source domain B from A.
The discriminator step comes first, on fakes of the current generators, then a fresh generator forward pass
(``UGATIT.py::train``). The official D step does not detach the fakes; it makes no difference (the generator
gradients it leaves are zeroed before the G step), so they are computed without a graph here.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.gan.base import UnpairedTranslationModule
from zoo.checkpoint import drop_module_hyperparameters
from zoo.gan.layers import (ILN, AdaILN, ClassActivationAttention, check_patch_depth, clip_rho_, lsgan_d_loss,
                            lsgan_g_loss, spectral_norm)

__all__ = ["ResnetBlock", "AdaILNResnetBlock", "UGATITGenerator", "UGATITDiscriminator", "UGATIT"]


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, bias: bool = False) -> nn.Sequential:
    """Reflection padding then a convolution, as every layer of the official generator."""
    return nn.Sequential(nn.ReflectionPad2d(kernel // 2), nn.Conv2d(in_channels, out_channels, kernel, stride, 0,
                                                                    bias=bias))


class ResnetBlock(nn.Module):
    """Encoder residual block: (pad, conv3, IN, ReLU, pad, conv3, IN) + identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(inplace=True),
                                  _conv(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class AdaILNResnetBlock(nn.Module):
    """Decoder residual block with AdaILN after each convolution, ``γ, β`` shared by the two (official code)."""

    def __init__(self, channels: int, unbiased: bool = False) -> None:
        super().__init__()
        self.conv1, self.norm1 = _conv(channels, channels, 3), AdaILN(channels, unbiased=unbiased)
        self.conv2, self.norm2 = _conv(channels, channels, 3), AdaILN(channels, unbiased=unbiased)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x), gamma, beta))
        return x + self.norm2(self.conv2(out), gamma, beta)


class UGATITGenerator(nn.Module):
    """Encoder (conv7, ``n_down`` stride-2 convs, ``n_res`` IN residual blocks) → CAM → γ/β MLP → ``n_res`` AdaILN
    residual blocks → ``n_down`` × (nearest up-sampling, conv3, ILN, ReLU) → conv7 → tanh.

    Returns ``(image, cam_logit (B, 2), heatmap (B, 1, h, w))``. Full mode's MLP input is the flattened
    ``(img_size / 2^n_down)² × C`` map (268 M parameters per generator at 256 px, ``ngf`` 64); ``light`` pools it.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, ngf: int = 64, n_res: int = 4, n_down: int = 2,
                 img_size: int = 256, light: bool = False, unbiased: bool = False) -> None:
        super().__init__()
        self.light = light
        layers: list[nn.Module] = [_conv(in_channels, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(inplace=True)]
        for i in range(n_down):
            layers += [_conv(ngf * 2 ** i, ngf * 2 ** (i + 1), 3, stride=2), nn.InstanceNorm2d(ngf * 2 ** (i + 1)),
                       nn.ReLU(inplace=True)]
        channels = ngf * 2 ** n_down
        layers += [ResnetBlock(channels) for _ in range(n_res)]
        self.encoder = nn.Sequential(*layers)
        self.cam = ClassActivationAttention(channels, spectral=False, activation=nn.ReLU(inplace=True))
        mlp_in = channels if light else (img_size // 2 ** n_down) ** 2 * channels
        self.mlp = nn.Sequential(nn.Linear(mlp_in, channels, bias=False), nn.ReLU(inplace=True),
                                 nn.Linear(channels, channels, bias=False), nn.ReLU(inplace=True))
        self.gamma = nn.Linear(channels, channels, bias=False)
        self.beta = nn.Linear(channels, channels, bias=False)
        self.bottleneck = nn.ModuleList(AdaILNResnetBlock(channels, unbiased) for _ in range(n_res))
        up: list[nn.Module] = []
        for i in range(n_down):
            c = channels // 2 ** i
            up += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(c, c // 2, 3), ILN(c // 2, unbiased=unbiased),
                   nn.ReLU(inplace=True)]
        up += [_conv(ngf, out_channels, 7), nn.Tanh()]
        self.decoder = nn.Sequential(*up)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, cam_logit, heatmap = self.cam(self.encoder(x))
        style = self.mlp(x.mean(dim=(2, 3)) if self.light else x.flatten(1))
        gamma, beta = self.gamma(style), self.beta(style)
        for block in self.bottleneck:
            x = block(x, gamma, beta)
        return self.decoder(x), cam_logit, heatmap


class UGATITDiscriminator(nn.Module):
    """PatchGAN with CAM: ``n_layers − 2`` stride-2 SN convs (ndf, 2ndf, …), one stride-1 SN conv doubling the
    channels, CAM (SN heads, plain 1×1 conv, LeakyReLU 0.2), and an SN conv4 to one channel of patch logits.

    ``n_layers=7`` is the global discriminator (receptive field over the whole 256 px image), ``5`` the local one.
    Returns ``(patch_logits, cam_logit (B, 2), heatmap)``.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 7) -> None:
        super().__init__()
        if n_layers < 3:
            raise ValueError(f"n_layers must be ≥ 3 (one stride-2 conv, one stride-1 conv, the output), got {n_layers}")

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(c_in, c_out, 4, stride, 0)),
                    nn.LeakyReLU(0.2, inplace=True)]

        layers = block(in_channels, ndf, 2)
        for i in range(1, n_layers - 2):
            layers += block(ndf * 2 ** (i - 1), ndf * 2 ** i, 2)
        channels = ndf * 2 ** (n_layers - 3)
        layers += block(channels, channels * 2, 1)
        self.features = nn.Sequential(*layers)
        self.cam = ClassActivationAttention(channels * 2, spectral=True, activation=nn.LeakyReLU(0.2, inplace=True))
        self.classifier = nn.Sequential(nn.ReflectionPad2d(1),
                                        spectral_norm(nn.Conv2d(channels * 2, 1, 4, 1, 0, bias=False)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, cam_logit, heatmap = self.cam(self.features(x))
        return self.classifier(x), cam_logit, heatmap


def _normal_init(module: nn.Module, std: float = 0.02) -> None:
    """N(0, 0.02) weights and zero biases for convolutions and linears (TF code's initialiser)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class UGATIT(UnpairedTranslationModule):
    """U-GAT-IT with the paper's loss weights and optimisation; see the module docstring.

    Args:
        in_channels: image channels of both domains.
        ngf, ndf: base widths of generators and discriminators (64 in the paper).
        n_res: residual blocks in the encoder and in the decoder (4).
        n_down: stride-2 steps of the generator (2).
        global_layers, local_layers: ``n_layers`` of the global (7) and the local (5) discriminators.
        img_size: training crop size (full mode's MLP input depends on it).
        light: pooled MLP input (the paper's light model).
        adv_weight, cycle_weight, identity_weight, cam_weight: loss weights (1, 10, 10, 1000).
        unbiased_variance: AdaILN/ILN with the PyTorch port's unbiased variance instead of TF's biased one.
        init_std: N(0, std) initialisation of convolutions and linears (TF); ``None``: PyTorch's defaults (the
            PyTorch port).
        lr, betas, weight_decay, decay_lr, total_iterations: see ``UnpairedTranslationModule``.
    """

    def __init__(self, *, in_channels: int = 3, ngf: int = 64, ndf: int = 64, n_res: int = 4, n_down: int = 2,
                 global_layers: int = 7, local_layers: int = 5, img_size: int = 256, light: bool = False,
                 adv_weight: float = 1.0, cycle_weight: float = 10.0, identity_weight: float = 10.0,
                 cam_weight: float = 1000.0, unbiased_variance: bool = False, init_std: float | None = 0.02,
                 lr: float = 1e-4, betas: Sequence[float] = (0.5, 0.999), weight_decay: float = 1e-4,
                 decay_lr: bool = True, total_iterations: int | None = None) -> None:
        super().__init__(lr=lr, betas=tuple(betas), weight_decay=weight_decay, decay_lr=decay_lr,
                         total_iterations=total_iterations)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        check_patch_depth(img_size, global_layers - 2, f"the global discriminator (global_layers={global_layers})")
        check_patch_depth(img_size, local_layers - 2, f"the local discriminator (local_layers={local_layers})")
        self.gen_a2b, self.gen_b2a = self.build_generator(), self.build_generator()
        self.dis_global_a, self.dis_global_b = self.build_discriminator(global_layers), self.build_discriminator(global_layers)
        self.dis_local_a, self.dis_local_b = self.build_discriminator(local_layers), self.build_discriminator(local_layers)

    def build_generator(self) -> UGATITGenerator:
        hp = self.hparams
        generator = UGATITGenerator(hp.in_channels, hp.in_channels, hp.ngf, hp.n_res, hp.n_down, hp.img_size, hp.light,
                                    hp.unbiased_variance)
        if hp.init_std is not None:
            _normal_init(generator, hp.init_std)
        return generator

    def build_discriminator(self, n_layers: int) -> UGATITDiscriminator:
        discriminator = UGATITDiscriminator(self.hparams.in_channels, self.hparams.ndf, n_layers)
        if self.hparams.init_std is not None:
            _normal_init(discriminator, self.hparams.init_std)
        return discriminator

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        return (p for g in (self.gen_a2b, self.gen_b2a) for p in g.parameters())

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        return (p for d in (self.dis_global_a, self.dis_local_a, self.dis_global_b, self.dis_local_b)
                for p in d.parameters())

    def translate(self, images: torch.Tensor, direction: str) -> torch.Tensor:
        return (self.gen_a2b if direction == "a2b" else self.gen_b2a)(images)[0]

    def untrained_translator(self, direction: str) -> Callable[[torch.Tensor], torch.Tensor]:
        generator = self.build_generator().to(self.device).eval()
        return lambda images: generator(images)[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """A → B translation (what ``predict`` and exported models serve)."""
        return self.gen_a2b(images)[0]

    # ---- losses -------------------------------------------------------------------------------------------------

    def _judge(self, images: torch.Tensor, domain: str) -> list[torch.Tensor]:
        """Patch logits and CAM logits of the global and the local discriminator of ``domain``."""
        dis_global, dis_local = ((self.dis_global_a, self.dis_local_a) if domain == "A"
                                 else (self.dis_global_b, self.dis_local_b))
        global_out, global_cam, _ = dis_global(images)
        local_out, local_cam, _ = dis_local(images)
        return [global_out, global_cam, local_out, local_cam]

    def discriminator_loss(self, real_a: torch.Tensor, real_b: torch.Tensor, fake_a: torch.Tensor,
                           fake_b: torch.Tensor) -> torch.Tensor:
        w = self.hparams.adv_weight
        return w * (lsgan_d_loss(self._judge(real_a, "A"), self._judge(fake_a, "A"))
                    + lsgan_d_loss(self._judge(real_b, "B"), self._judge(fake_b, "B")))

    def generator_losses(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        fake_b, cam_ab_on_a, _ = self.gen_a2b(real_a)
        fake_a, cam_ba_on_b, _ = self.gen_b2a(real_b)
        cycle_a, cycle_b = self.gen_b2a(fake_b)[0], self.gen_a2b(fake_a)[0]
        same_a, cam_ba_on_a, _ = self.gen_b2a(real_a)
        same_b, cam_ab_on_b, _ = self.gen_a2b(real_b)
        adversarial = lsgan_g_loss(self._judge(fake_a, "A")) + lsgan_g_loss(self._judge(fake_b, "B"))
        cycle = F.l1_loss(cycle_a, real_a) + F.l1_loss(cycle_b, real_b)
        identity = F.l1_loss(same_a, real_a) + F.l1_loss(same_b, real_b)
        bce = F.binary_cross_entropy_with_logits
        # Each generator's η must call its own source domain 1 and its target domain 0 (§2.2, CAM loss).
        cam = (bce(cam_ba_on_b, torch.ones_like(cam_ba_on_b)) + bce(cam_ba_on_a, torch.zeros_like(cam_ba_on_a))
               + bce(cam_ab_on_a, torch.ones_like(cam_ab_on_a)) + bce(cam_ab_on_b, torch.zeros_like(cam_ab_on_b)))
        total = (hp.adv_weight * adversarial + hp.cycle_weight * cycle + hp.identity_weight * identity
                 + hp.cam_weight * cam)
        return {"g_loss": total, "g_adversarial": adversarial, "cycle": cycle, "identity": identity, "g_cam": cam}

    # ---- training ---------------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        real_a, real_b = batch["A"][0], batch["B"][0]
        opt_g, opt_d = self.optimizers()

        with torch.no_grad():
            fake_b, fake_a = self.gen_a2b(real_a)[0], self.gen_b2a(real_b)[0]
        d_loss = self.discriminator_loss(real_a, real_b, fake_a, fake_b)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()

        self.toggle_optimizer(opt_g)  # discriminators frozen: no gradients computed for them in the G step
        losses = self.generator_losses(real_a, real_b)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(losses["g_loss"])
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        clip_rho_([self.gen_a2b, self.gen_b2a])

        self.step_schedules()
        self.log_losses({"d_loss": d_loss, **losses})

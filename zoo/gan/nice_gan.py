"""NICE-GAN: Reusing Discriminators for Encoding: Towards Unsupervised Image-to-Image Translation (Chen, Xu, Yang,
Ye, Ma & Zhou, CVPR 2020, https://arxiv.org/abs/2003.00273).

There is no generator encoder: the first layers of each domain's discriminator *are* the encoder (§3.1). The
discriminator of domain X is ``E_X`` (two stride-2 SN convolutions, then a CAM block with a learned residual weight
λ, initialised to 0) followed by two classifier heads on the code ``z``, a local (smaller receptive field) and a
global one. The generator of domain Y is a decoder from ``z``: conv, AdaLIN residual blocks with ``γ, β`` from an MLP,
up-sampling by sub-pixel convolution with ILN, conv7, tanh. So A → B is ``G_B(E_A(a))``.

*Decoupled training* (§3.2): the encoders are updated only by the discriminator loss; the generator loss flows
through them (cycle: ``G_A(E_B(G_B(E_A(a))))``, adversarial) but never changes them — the generator optimiser holds
the decoders alone (official ``NICE.py``, issue #2).

Losses, A side (B symmetric): LSGAN on both heads and on the CAM logit (weight 1); cycle ``‖G_A(E_B(G_B(E_A(a)))) −
a‖₁`` (10); reconstruction ``‖G_A(E_A(a)) − a‖₁`` (10), which replaces U-GAT-IT's identity loss. The AdaLIN/ILN mix
here is a softmax over two per-channel logits (IN, LN), initialised to (3.2, 1) in AdaLIN and (1, 3.2) in ILN, so it
needs no clipping.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.gan.base import UnpairedTranslationModule
from zoo.gan.layers import check_patch_depth, instance_and_layer_norm, lsgan_d_loss, lsgan_g_loss, spectral_norm
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["SoftAdaLIN", "SoftLIN", "NICEDiscriminator", "NICEGenerator", "NICEGAN"]


class SoftAdaLIN(nn.Module):
    """``(ρ_IN·IN(x) + ρ_LN·LN(x))·γ + β`` with ``(ρ_IN, ρ_LN) = softmax(logits)`` per channel, ``γ, β`` given."""

    def __init__(self, num_features: int, eps: float = 1e-5, rho_logits: tuple[float, float] = (3.2, 1.0),
                 unbiased: bool = False) -> None:
        super().__init__()
        self.eps, self.unbiased = eps, unbiased
        self.rho = nn.Parameter(torch.tensor(rho_logits).repeat(num_features, 1))  # (C, 2)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        out_in, out_ln = instance_and_layer_norm(x, self.eps, self.unbiased)
        rho = self.rho.softmax(dim=1)
        return rho[:, 0, None, None] * out_in + rho[:, 1, None, None] * out_ln

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return self.mix(x) * gamma[:, :, None, None] + beta[:, :, None, None]


class SoftLIN(SoftAdaLIN):
    """The same mix with learned ``γ, β`` (1, 0), logits initialised towards LN (1, 3.2)."""

    def __init__(self, num_features: int, eps: float = 1e-5, unbiased: bool = False) -> None:
        super().__init__(num_features, eps, (1.0, 3.2), unbiased)
        self.gamma = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_features, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.mix(x) * self.gamma + self.beta


def _sn_block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(c_in, c_out, 4, stride, 0)), nn.LeakyReLU(0.2, inplace=True)]


class NICEDiscriminator(nn.Module):
    """Encoder ``E`` + CAM + a local and a global classifier (official ``networks.py::Discriminator``).

    ``E``: two stride-2 SN convs to ``2·ndf`` channels at 1/4 resolution. CAM: one SN linear scores
    ``[GAP(x); GMP(x)]`` (``cam_logit``, ``(B, 1)``); its weight re-weights ``[x; x]``, a 1×1 conv returns to
    ``2·ndf`` channels, and ``z = LeakyReLU(λ·that + x)`` with λ learned from 0. Local head: ``n_layers − 6``
    stride-2 convs then a stride-1 conv doubling the width and an SN conv4 to one channel; global head: the local
    head's stride-2 convs, ``global_extra`` more (2 in the paper), a stride-1 doubling conv and the output conv.

    Returns ``(local_logits, global_logits, cam_logit, heatmap, z)``.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 7, global_extra: int = 2) -> None:
        super().__init__()
        if n_layers < 6 or global_extra < 1:
            raise ValueError(f"need n_layers ≥ 6 and global_extra ≥ 1, got {n_layers}, {global_extra}")
        self.encoder = nn.Sequential(*_sn_block(in_channels, ndf, 2), *_sn_block(ndf, 2 * ndf, 2))
        channels = 2 * ndf
        self.cam_fc = spectral_norm(nn.Linear(2 * channels, 1, bias=False))
        self.conv1x1 = nn.Conv2d(2 * channels, channels, kernel_size=1)
        self.lamda = nn.Parameter(torch.zeros(1))  # official spelling: λ of the residual CAM connection

        shared: list[nn.Module] = []
        c = channels
        for _ in range(n_layers - 6):
            shared += _sn_block(c, 2 * c, 2)
            c *= 2
        self.local_trunk = nn.Sequential(*shared)
        self.local_head = nn.Sequential(*_sn_block(c, 2 * c, 1), nn.ReflectionPad2d(1),
                                        spectral_norm(nn.Conv2d(2 * c, 1, 4, 1, 0, bias=False)))
        extra: list[nn.Module] = []
        for _ in range(global_extra):
            extra += _sn_block(c, 2 * c, 2)
            c *= 2
        self.global_trunk = nn.Sequential(*extra)
        self.global_head = nn.Sequential(*_sn_block(c, 2 * c, 1), nn.ReflectionPad2d(1),
                                         spectral_norm(nn.Conv2d(2 * c, 1, 4, 1, 0, bias=False)))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, cam_logit, heatmap)``: the code the generators decode from."""
        x0 = self.encoder(images)
        pooled = torch.cat([x0.mean(dim=(2, 3)), x0.amax(dim=(2, 3))], dim=1)
        weight = self.cam_fc.weight  # (1, 2C), the normalised weight (official: the raw ``weight_orig``)
        cam_logit = F.linear(pooled, weight)
        x = self.conv1x1(torch.cat([x0, x0], dim=1) * weight[0, :, None, None])
        z = F.leaky_relu(self.lamda * x + x0, 0.2)
        return z, cam_logit, z.sum(dim=1, keepdim=True)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z, cam_logit, heatmap = self.encode(images)
        local_features = self.local_trunk(z)
        global_logits = self.global_head(self.global_trunk(local_features))
        return self.local_head(local_features), global_logits, cam_logit, heatmap, z


class NICEGenerator(nn.Module):
    """Decoder from ``z`` (``2·ngf`` channels at 1/4 resolution; ``ngf`` must equal the discriminators' ``ndf``).

    conv3 to ``4·ngf`` + ILN + ReLU; MLP → ``γ, β`` (full mode flattens the map, ``light`` pools it); ``n_res``
    AdaLIN residual blocks; two up-sampling stages (conv3 halving, ILN, ReLU, 1×1 conv ×4 channels, PixelShuffle 2,
    ILN, ReLU); conv7; tanh.
    """

    def __init__(self, out_channels: int = 3, ngf: int = 64, n_res: int = 6, img_size: int = 256,
                 light: bool = False, unbiased: bool = False) -> None:
        super().__init__()
        self.light = light
        channels = 4 * ngf
        self.stem = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(2 * ngf, channels, 3, 1, 0),
                                  SoftLIN(channels, unbiased=unbiased), nn.ReLU(inplace=True))
        mlp_in = channels if light else (img_size // 4) ** 2 * channels
        self.mlp = nn.Sequential(nn.Linear(mlp_in, channels, bias=False), nn.ReLU(inplace=True),
                                 nn.Linear(channels, channels, bias=False), nn.ReLU(inplace=True))
        self.gamma = nn.Linear(channels, channels, bias=False)
        self.beta = nn.Linear(channels, channels, bias=False)
        self.blocks = nn.ModuleList(_AdaLINResnetBlock(channels, unbiased) for _ in range(n_res))
        up: list[nn.Module] = []
        for c in (channels, channels // 2):
            up += [nn.ReflectionPad2d(1), nn.Conv2d(c, c // 2, 3, 1, 0, bias=False), SoftLIN(c // 2, unbiased=unbiased),
                   nn.ReLU(inplace=True), nn.Conv2d(c // 2, 2 * c, 1), nn.PixelShuffle(2),
                   SoftLIN(c // 2, unbiased=unbiased), nn.ReLU(inplace=True)]
        up += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7, 1, 0, bias=False), nn.Tanh()]
        self.up = nn.Sequential(*up)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.stem(z)
        style = self.mlp(x.mean(dim=(2, 3)) if self.light else x.flatten(1))
        gamma, beta = self.gamma(style), self.beta(style)
        for block in self.blocks:
            x = block(x, gamma, beta)
        return self.up(x)


class _AdaLINResnetBlock(nn.Module):
    def __init__(self, channels: int, unbiased: bool) -> None:
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)
        self.conv1, self.norm1 = nn.Conv2d(channels, channels, 3, bias=False), SoftAdaLIN(channels, unbiased=unbiased)
        self.conv2, self.norm2 = nn.Conv2d(channels, channels, 3, bias=False), SoftAdaLIN(channels, unbiased=unbiased)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(self.pad(x)), gamma, beta))
        return x + self.norm2(self.conv2(self.pad(out)), gamma, beta)


class NICEGAN(UnpairedTranslationModule):
    """NICE-GAN with the official loss weights and decoupled optimisation; see the module docstring.

    Args:
        in_channels: image channels of both domains.
        ch: base width ``ngf = ndf`` (64); the code ``z`` has ``2·ch`` channels.
        n_res: AdaLIN residual blocks of each decoder (6).
        n_layers: the discriminators' depth parameter (7 in the paper; ≥ 6), see ``NICEDiscriminator``.
        global_extra: stride-2 convs of the global head beyond the local head's (2; fewer for tiny images).
        img_size: training crop size (full mode's MLP input depends on it).
        light: pooled MLP input (the paper's reported numbers are from the light model, official issue #18).
        adv_weight, cycle_weight, recon_weight: loss weights (1, 10, 10; the paper's text says 10 for adversarial,
            the code's default is 1, issue #8).
        unbiased_variance: AdaLIN/LIN with the official unbiased variance instead of the biased one.
        lr, betas, weight_decay, decay_lr, total_iterations: see ``UnpairedTranslationModule``.
    """

    def __init__(self, *, in_channels: int = 3, ch: int = 64, n_res: int = 6, n_layers: int = 7, global_extra: int = 2,
                 img_size: int = 256, light: bool = False, adv_weight: float = 1.0, cycle_weight: float = 10.0,
                 recon_weight: float = 10.0, unbiased_variance: bool = False, lr: float = 1e-4,
                 betas: Sequence[float] = (0.5, 0.999), weight_decay: float = 1e-4, decay_lr: bool = True,
                 total_iterations: int | None = None) -> None:
        super().__init__(lr=lr, betas=tuple(betas), weight_decay=weight_decay, decay_lr=decay_lr,
                         total_iterations=total_iterations)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        check_patch_depth(img_size, n_layers - 4 + global_extra,
                          f"the global head (n_layers={n_layers}, global_extra={global_extra})")
        self.dis_a, self.dis_b = self.build_discriminator(), self.build_discriminator()
        self.gen_to_a, self.gen_to_b = self.build_generator(), self.build_generator()

    def build_generator(self) -> NICEGenerator:
        hp = self.hparams
        return NICEGenerator(hp.in_channels, hp.ch, hp.n_res, hp.img_size, hp.light, hp.unbiased_variance)

    def build_discriminator(self) -> NICEDiscriminator:
        hp = self.hparams
        return NICEDiscriminator(hp.in_channels, hp.ch, hp.n_layers, hp.global_extra)

    def generator_parameters(self) -> Iterator[nn.Parameter]:
        # The decoders only: the encoders inside the discriminators are left to the D step (decoupled training).
        return (p for g in (self.gen_to_a, self.gen_to_b) for p in g.parameters())

    def discriminator_parameters(self) -> Iterator[nn.Parameter]:
        return (p for d in (self.dis_a, self.dis_b) for p in d.parameters())

    def translate(self, images: torch.Tensor, direction: str) -> torch.Tensor:
        if direction == "a2b":
            return self.gen_to_b(self.dis_a.encode(images)[0])
        return self.gen_to_a(self.dis_b.encode(images)[0])

    def untrained_translator(self, direction: str) -> Callable[[torch.Tensor], torch.Tensor]:
        encoder, decoder = self.build_discriminator().to(self.device).eval(), self.build_generator().to(self.device).eval()
        return lambda images: decoder(encoder.encode(images)[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """A → B translation (what ``predict`` and exported models serve)."""
        return self.translate(images, "a2b")

    # ---- losses -------------------------------------------------------------------------------------------------

    def discriminator_loss(self, real_a: torch.Tensor, real_b: torch.Tensor) -> torch.Tensor:
        real_out_a, real_out_b = self.dis_a(real_a), self.dis_b(real_b)
        with torch.no_grad():  # the fakes are inputs of this step (the official code detaches them)
            fake_a, fake_b = self.gen_to_a(real_out_b[4]), self.gen_to_b(real_out_a[4])
        fake_out_a, fake_out_b = self.dis_a(fake_a), self.dis_b(fake_b)
        # local logits, global logits and CAM logit of each domain's discriminator
        return self.hparams.adv_weight * (lsgan_d_loss(real_out_a[:3], fake_out_a[:3])
                                          + lsgan_d_loss(real_out_b[:3], fake_out_b[:3]))

    def generator_losses(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        with torch.no_grad():  # no gradient is ever wanted in the encoders from here, nor through the real codes
            z_a, z_b = self.dis_a.encode(real_a)[0], self.dis_b.encode(real_b)[0]
        fake_b, fake_a = self.gen_to_b(z_a), self.gen_to_a(z_b)
        fake_out_a, fake_out_b = self.dis_a(fake_a), self.dis_b(fake_b)
        cycle_b, cycle_a = self.gen_to_b(fake_out_a[4]), self.gen_to_a(fake_out_b[4])
        recon_a, recon_b = self.gen_to_a(z_a), self.gen_to_b(z_b)
        adversarial = lsgan_g_loss(fake_out_a[:3]) + lsgan_g_loss(fake_out_b[:3])
        cycle = F.l1_loss(cycle_a, real_a) + F.l1_loss(cycle_b, real_b)
        recon = F.l1_loss(recon_a, real_a) + F.l1_loss(recon_b, real_b)
        total = hp.adv_weight * adversarial + hp.cycle_weight * cycle + hp.recon_weight * recon
        return {"g_loss": total, "g_adversarial": adversarial, "cycle": cycle, "recon": recon}

    # ---- training ---------------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        real_a, real_b = batch["A"][0], batch["B"][0]
        opt_g, opt_d = self.optimizers()

        d_loss = self.discriminator_loss(real_a, real_b)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()

        self.toggle_optimizer(opt_g)  # discriminators and encoders frozen; gradients still flow through them
        losses = self.generator_losses(real_a, real_b)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(losses["g_loss"])
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        self.step_schedules()
        self.log_losses({"d_loss": d_loss, **losses})

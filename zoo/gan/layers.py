"""Parts U-GAT-IT (Kim et al., ICLR 2020) and NICE-GAN (Chen et al., CVPR 2020) share.

* ``AdaILN`` / ``ILN``: Adaptive Layer-Instance Normalisation (U-GAT-IT §2.1.1, eq. 1): a learned per-channel mix
  ``ρ·IN(x) + (1 − ρ)·LN(x)``, then an affine map with ``γ, β`` from the generator's MLP (AdaILN) or learned (ILN).
* ``ClassActivationAttention``: the CAM block of generators and discriminators (§2.1.1): an auxiliary domain
  classifier on the global-average- and global-max-pooled feature map, whose weights re-weight the map's channels.
* LSGAN losses (Mao et al. 2017), spectral normalisation (Miyato et al. 2018) through
  ``torch.nn.utils.parametrizations``, and the key map that loads official checkpoints saved with the legacy
  ``torch.nn.utils.spectral_norm``. The learning-rate schedule is ``zoo.schedules.half_then_linear_decay``.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = [
    "instance_and_layer_norm", "AdaILN", "ILN", "clip_rho_", "ClassActivationAttention", "lsgan_d_loss",
    "lsgan_g_loss", "check_patch_depth", "spectral_norm", "legacy_spectral_norm_state_dict",
]


def instance_and_layer_norm(x: torch.Tensor, eps: float = 1e-5, unbiased: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` normalised over ``(H, W)`` per channel (IN) and over ``(C, H, W)`` per sample (LN), without affine.

    The official TensorFlow code (whose models produced the paper's KID table) uses the biased variance, as
    ``F.instance_norm``/``F.layer_norm`` do; the PyTorch port uses ``torch.var``'s unbiased one (``unbiased=True``).
    """
    in_var, in_mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=int(unbiased))
    ln_var, ln_mean = torch.var_mean(x, dim=(1, 2, 3), keepdim=True, correction=int(unbiased))
    return (x - in_mean) * torch.rsqrt(in_var + eps), (x - ln_mean) * torch.rsqrt(ln_var + eps)


class AdaILN(nn.Module):
    """``(ρ·IN(x) + (1 − ρ)·LN(x))·γ + β`` with ``γ, β`` of shape ``(B, C)`` given per sample (U-GAT-IT eq. 1).

    ``ρ`` starts at 0.9 (PyTorch code; TF starts at 1 and subtracts 0.1 in the forward pass, the same value) and is
    kept in [0, 1] by ``clip_rho_`` after every generator step.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, rho_init: float = 0.9, unbiased: bool = False) -> None:
        super().__init__()
        self.eps, self.unbiased = eps, unbiased
        self.rho = nn.Parameter(torch.full((1, num_features, 1, 1), rho_init))

    def forward(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        out_in, out_ln = instance_and_layer_norm(x, self.eps, self.unbiased)
        out = self.rho * out_in + (1 - self.rho) * out_ln
        return out * gamma[:, :, None, None] + beta[:, :, None, None]


class ILN(nn.Module):
    """Layer-Instance Normalisation of the up-sampling blocks: ρ, γ, β learned, initialised to 0, 1, 0 (pure LN)."""

    def __init__(self, num_features: int, eps: float = 1e-5, unbiased: bool = False) -> None:
        super().__init__()
        self.eps, self.unbiased = eps, unbiased
        self.rho = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, num_features, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_in, out_ln = instance_and_layer_norm(x, self.eps, self.unbiased)
        return (self.rho * out_in + (1 - self.rho) * out_ln) * self.gamma + self.beta


@torch.no_grad()
def clip_rho_(modules: Iterable[nn.Module], low: float = 0.0, high: float = 1.0) -> None:
    """Clamp every ``AdaILN``/``ILN`` ρ in place (the official ``RhoClipper``, applied after each generator step)."""
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, (AdaILN, ILN)):
                sub.rho.clamp_(low, high)


class ClassActivationAttention(nn.Module):
    """The CAM attention block (U-GAT-IT §2.1.1, Fig. 1).

    An auxiliary classifier ``η`` scores "is this the source domain" from the global-average-pooled and the
    global-max-pooled map with two weight vectors ``w_gap, w_gmp ∈ R^C`` (``cam_logit``, shape ``(B, 2)``). The same
    weights, as per-channel importances, re-weight the map: ``a = [x ⊙ w_gap ; x ⊙ w_gmp]`` (2C channels), fused back
    to C channels by a 1×1 convolution and an activation. ``heatmap`` is that result summed over channels.

    In the discriminators the two linear heads are spectrally normalised and the re-weighting uses the normalised
    weight ``W/σ(W)``, i.e. the weight the logit is computed with; the official code takes
    ``list(fc.parameters())[0]``, the raw ``weight_orig``, there, which only rescales ``a`` by σ before the 1×1
    convolution.
    """

    def __init__(self, channels: int, spectral: bool = False, activation: nn.Module | None = None) -> None:
        super().__init__()
        wrap = spectral_norm if spectral else (lambda m: m)
        self.gap_fc = wrap(nn.Linear(channels, 1, bias=False))
        self.gmp_fc = wrap(nn.Linear(channels, 1, bias=False))
        self.conv1x1 = nn.Conv2d(2 * channels, channels, kernel_size=1)
        self.activation = activation if activation is not None else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w_gap, w_gmp = self.gap_fc.weight, self.gmp_fc.weight  # (1, C) each
        gap_logit = F.linear(x.mean(dim=(2, 3)), w_gap)
        gmp_logit = F.linear(x.amax(dim=(2, 3)), w_gmp)
        weighted = torch.cat([x * w_gap[0, :, None, None], x * w_gmp[0, :, None, None]], dim=1)
        out = self.activation(self.conv1x1(weighted))
        return out, torch.cat([gap_logit, gmp_logit], dim=1), out.sum(dim=1, keepdim=True)


def lsgan_d_loss(real: Iterable[torch.Tensor], fake: Iterable[torch.Tensor]) -> torch.Tensor:
    """Least-squares discriminator loss summed over outputs: ``Σ E[(D(real) − 1)²] + E[D(fake)²]``."""
    return sum(F.mse_loss(r, torch.ones_like(r)) + F.mse_loss(f, torch.zeros_like(f)) for r, f in zip(real, fake))


def lsgan_g_loss(fake: Iterable[torch.Tensor]) -> torch.Tensor:
    """Least-squares generator loss summed over the discriminators' outputs on fakes: ``Σ E[(D(G(x)) − 1)²]``."""
    return sum(F.mse_loss(f, torch.ones_like(f)) for f in fake)


def check_patch_depth(img_size: int, stride2_convs: int, what: str) -> None:
    """A PatchGAN branch halves the map ``stride2_convs`` times (reflection pad 1, conv4, stride 2), then a stride-1
    conv takes one pixel off and the output conv needs a reflection pad of 1, i.e. a map of at least 2 px: raise a
    clear error at construction instead of a padding error at the first forward pass."""
    if img_size // 2 ** stride2_convs < 3:
        raise ValueError(f"{what} has {stride2_convs} stride-2 convs: it needs images of at least "
                         f"{3 * 2 ** stride2_convs} px, got img_size={img_size}; use fewer layers for small images")


_LEGACY_SN = {"weight_orig": "parametrizations.weight.original", "weight_u": "parametrizations.weight.0._u",
              "weight_v": "parametrizations.weight.0._v"}


def legacy_spectral_norm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of a state dict saved with the legacy ``nn.utils.spectral_norm`` (the official checkpoints:
    ``conv.weight_orig``, ``conv.weight_u``, ``conv.weight_v``) to the parametrisation API used here
    (``conv.parametrizations.weight.original``, ``…0._u``, ``…0._v``). Other keys pass through."""
    renamed = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in _LEGACY_SN:
            key = f"{prefix}.{_LEGACY_SN[leaf]}" if prefix else _LEGACY_SN[leaf]
        renamed[key] = value
    return renamed

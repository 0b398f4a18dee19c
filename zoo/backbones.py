"""Backbones: any timm model as a feature extractor, plus the small research networks papers train from scratch.

Contract shared by every backbone here (and expected by heads across the zoo):

* ``TimmBackbone`` / ``ConvNet``: ``forward(x) -> (B, out_channels, H/r, W/r)``, the last feature map, with
  ``out_channels: int`` and ``reduction: int``.
* ``TimmFeatures``: ``forward(x) -> list`` of maps from several stages (``features_only``), with
  ``out_channels: list[int]`` and ``reductions: list[int]``; this is what an FPN consumes.
* ``MLPMixer`` / ``ResMLP`` (timm's ``MlpMixer``): the tokens after the final norm, laid back on the patch grid,
  ``(B, embed_dim, H/patch, W/patch)``, with ``reduction = patch_size``.

``pretrained`` is passed straight to ``timm.create_model`` (default ``False``: nothing is downloaded unless asked).
Small research backbones (Conv-4/Conv-6 of the few-shot papers, WRN-28-2 of the semi-supervised ones) live in this
file too, so that every family builds on the same few definitions.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import timm
import torch
from timm.layers import to_2tuple
from timm.models.mlp_mixer import Affine, MixerBlock, MlpMixer, ResBlock
from torch import nn

__all__ = ["TimmBackbone", "TimmFeatures", "ConvNet", "StridedConvFeatures", "MLPMixer", "ResMLP", "MLP", "CifarResNet"]


class TimmBackbone(nn.Module):
    """A timm model without its pooling and classifier: returns the last feature map.

    Args:
        name: any ``timm.list_models()`` name, e.g. ``resnet18``, ``resnet50``, ``convnext_tiny``.
        pretrained: load timm's pretrained weights (needs internet or a populated HF cache).
        in_chans: input channels; timm adapts the stem (and pretrained stem weights) to it.
        **kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ``output_stride``...).

    Example:
        >>> net = TimmBackbone("resnet18")
        >>> net(torch.zeros(2, 3, 64, 64)).shape, net.out_channels, net.reduction
        (torch.Size([2, 512, 2, 2]), 512, 32)
    """

    def __init__(self, name: str = "resnet18", pretrained: bool = False, in_chans: int = 3, **kwargs) -> None:
        super().__init__()
        self.model = timm.create_model(name, pretrained=pretrained, in_chans=in_chans, num_classes=0, global_pool="", **kwargs)
        self.out_channels: int = self.model.num_features
        info = getattr(self.model, "feature_info", None)
        self.reduction: int = int(info[-1]["reduction"]) if info else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        if features.ndim != 4:
            raise ValueError(
                f"TimmBackbone({type(self.model).__name__}) returned shape {tuple(features.shape)}; "
                "heads here need a (B, C, H, W) map: pick a convolutional model or one with a spatial output."
            )
        return features


class TimmFeatures(nn.Module):
    """Feature maps from several stages of a timm model (``features_only=True``), e.g. for an FPN.

    Args:
        name: timm model name.
        out_indices: which stages to return (timm's indexing; ``(1, 2, 3, 4)`` gives strides 4..32 on a ResNet).
        pretrained: load timm's pretrained weights.
        in_chans: input channels.
        output_stride: 16 or 8 turns the strides of the last stages into dilation (R-FCN's atrous block5);
            ``None`` keeps the model's own (32 for a ResNet).
    """

    def __init__(
        self,
        name: str = "resnet18",
        out_indices: Sequence[int] = (1, 2, 3, 4),
        pretrained: bool = False,
        in_chans: int = 3,
        output_stride: Optional[int] = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if output_stride is not None:
            kwargs["output_stride"] = output_stride
        self.model = timm.create_model(
            name, pretrained=pretrained, in_chans=in_chans, features_only=True, out_indices=tuple(out_indices), **kwargs
        )
        self.out_channels: list[int] = list(self.model.feature_info.channels())
        self.reductions: list[int] = list(self.model.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model(x)


class StridedConvFeatures(nn.Module):
    """A small from-scratch CNN with ``TimmFeatures``' multi-stage contract, for detectors on the embedded data.

    Stage ``i`` halves the resolution with a stride-2 conv → BN → ReLU, then a 3×3 conv → BN → ReLU, so stage ``i``
    has reduction ``2**(i+1)``. ``output_stride`` turns the strides of the later stages into dilation (doubling at
    each replaced stage), as ResNet's atrous block5 does for R-FCN (Dai et al. 2016, §3).

    Args:
        in_chans: input channels.
        widths: channels of each stage.
        out_indices: stages returned, in order.
        output_stride: the largest reduction allowed (a power of 2); stages beyond it keep the resolution.
        dilate: stages beyond ``output_stride`` dilate their convolutions (the atrous trick); ``False`` keeps them
            plain, so the receptive field stays small (class maps of small from-scratch networks localise better).
    """

    def __init__(self, in_chans: int = 3, widths: Sequence[int] = (16, 32, 64, 128, 128),
                 out_indices: Sequence[int] = (2, 3, 4), output_stride: int = 32, dilate: bool = True) -> None:
        super().__init__()
        stages, channels, reduction, dilation, reductions = [], in_chans, 1, 1, []
        for width in widths:
            stride = 2 if reduction * 2 <= output_stride else 1
            if stride == 1 and dilate:
                dilation *= 2
            reduction *= stride
            stages.append(nn.Sequential(
                nn.Conv2d(channels, width, 3, stride, padding=dilation if stride == 1 else 1,
                          dilation=dilation if stride == 1 else 1, bias=False),
                nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(width), nn.ReLU(inplace=True)))
            channels = width
            reductions.append(reduction)
        if any(not 0 <= i < len(widths) for i in out_indices):
            raise ValueError(f"out_indices {list(out_indices)} must index the {len(widths)} stages")
        self.stages = nn.ModuleList(stages)
        self.out_indices = tuple(out_indices)
        self.out_channels: list[int] = [widths[i] for i in out_indices]
        self.reductions: list[int] = [reductions[i] for i in out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outputs.append(x)
        return outputs


class ConvNet(nn.Module):
    """Plain stacks of 3×3 conv → BN → ReLU, with 2×2 max-pooling after the first ``num_pools`` blocks.

    ``ConvNet(widths=[64] * 4)`` is the Conv-4 of the few-shot literature (Vinyals et al. 2016, Snell et al. 2017);
    the digits classifier uses ``widths=[32, 64, 128], convs_per_block=2, num_pools=2`` to keep an 8×8 map at 32×32
    input, fine enough for class activation maps.

    Args:
        in_chans: input channels.
        widths: output channels of each block.
        convs_per_block: conv layers per block.
        num_pools: blocks followed by max-pooling (counted from the first); default: all of them.
        padding: conv padding, one value for all blocks or one per block (RelationNet's Conv-4 uses ``[0, 0, 1, 1]``).
        bn_running_stats: ``False`` makes BatchNorm always normalise with the current batch's statistics, in
            training and evaluation alike (MAML's "transductive" BN, as in Finn et al.'s code).
    """

    def __init__(
        self,
        in_chans: int = 3,
        widths: Sequence[int] = (64, 64, 64, 64),
        convs_per_block: int = 1,
        num_pools: Optional[int] = None,
        padding: int | Sequence[int] = 1,
        bn_running_stats: bool = True,
    ) -> None:
        super().__init__()
        num_pools = len(widths) if num_pools is None else num_pools
        paddings = [padding] * len(widths) if isinstance(padding, int) else list(padding)
        if len(paddings) != len(widths):
            raise ValueError(f"padding has {len(paddings)} entries for {len(widths)} blocks")
        layers: list[nn.Module] = []
        channels = in_chans
        for i, width in enumerate(widths):
            for _ in range(convs_per_block):
                layers += [nn.Conv2d(channels, width, 3, padding=paddings[i], bias=False),
                           nn.BatchNorm2d(width, track_running_stats=bn_running_stats), nn.ReLU(inplace=True)]
                channels = width
            if i < num_pools:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.out_channels: int = channels
        self.reduction: int = 2**num_pools

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class ResNet(nn.Module):
    """The ResNet-10/18/34 of "A Closer Look at Few-shot Classification" (Chen et al. 2019), built from torchvision.

    torchvision's ``ResNet`` with ``BasicBlock`` is CloserLook's ``ResNet``/``SimpleBlock`` (7×7/2 stem, max-pool,
    four stages of 64–512 channels, 1×1 projection shortcuts); depth 10 is one block per stage. ``pooled=True``
    returns the globally averaged ``(B, 512, 1, 1)`` (512-d once flattened), ``pooled=False`` the ``(B, 512, 7, 7)``
    map at 224×224 (RelationNet).

    Args:
        depth: 10, 18 or 34.
        in_chans: input channels.
        pooled: global-average-pool the last map.
    """

    blocks = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}

    def __init__(self, depth: int = 18, in_chans: int = 3, pooled: bool = True) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock, ResNet as TorchvisionResNet

        if depth not in self.blocks:
            raise ValueError(f"depth must be one of {sorted(self.blocks)}, got {depth}")
        net = TorchvisionResNet(BasicBlock, self.blocks[depth])
        if in_chans != 3:
            net.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                      net.layer4)
        self.pool = nn.AdaptiveAvgPool2d(1) if pooled else nn.Identity()
        self.out_channels, self.reduction = 512, 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))


class _PreActBlock(nn.Module):
    """BN → LeakyReLU → conv3×3 → BN → LeakyReLU → conv3×3, with a 1×1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bn_momentum: float, slope: float,
                 activate_before_residual: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.act = nn.LeakyReLU(slope, inplace=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
                         if in_channels != out_channels or stride != 1 else None)
        # The first block of the network feeds the pre-activated input to its shortcut too (FixMatch's TF `residual`).
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act(self.bn1(x))
        out = self.conv2(self.act(self.bn2(self.conv1(pre))))
        if self.shortcut is None:
            return x + out
        return self.shortcut(pre if self.activate_before_residual else x) + out


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016) in the pre-activation form of the semi-supervised benchmarks.

    WRN-28-2 (1.5 M parameters) is the network UDA, FixMatch, Meta Pseudo Labels and USB report CIFAR-10 results
    with: a 3×3 stem of 16 channels, three stages of ``(depth − 4) / 6`` blocks with ``16k, 32k, 64k`` channels and
    strides 1, 2, 2, then BN → LeakyReLU. Returns the ``(B, 64k, H/4, W/4)`` map; ``zoo.classifier.ClassifierHead`` pools it.

    Args:
        depth: ``6n + 4`` (28 → 4 blocks per stage).
        widen_factor: ``k`` (2 for CIFAR-10/SVHN, 8 for CIFAR-100).
        in_chans: input channels.
        bn_momentum: PyTorch BN momentum; 0.001 is the TF decay 0.999 of FixMatch / MPL (UDA-TF used 0.1).
        leaky_slope: negative slope of the activations (0.1 as in FixMatch / MPL; 0 gives UDA-TF's ReLU).
    """

    def __init__(self, depth: int = 28, widen_factor: int = 2, in_chans: int = 3, bn_momentum: float = 0.001,
                 leaky_slope: float = 0.1) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        layers: list[nn.Module] = [nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)]
        channels = 16
        for stage, (width, stride) in enumerate(zip(widths, (1, 2, 2))):
            for i in range(blocks):
                layers.append(_PreActBlock(channels, width, stride if i == 0 else 1, bn_momentum, leaky_slope,
                                           activate_before_residual=stage == 0 and i == 0))
                channels = width
        layers += [nn.BatchNorm2d(channels, momentum=bn_momentum), nn.LeakyReLU(leaky_slope)]
        self.features = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        self.out_channels: int = channels
        self.reduction: int = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class MLP(nn.Module):
    """A fully connected network on flattened images, as a feature-map backbone: ``(B, C, H, W) → (B, width, 1, 1)``.

    The class-incremental MNIST/digits networks of the continual-learning literature are such MLPs (FACIL's ``MLP``
    with ``--network mlp``; two hidden layers of 100 in the ANCL spec's digits default). Linear → ReLU per layer,
    optionally BatchNorm1d before the ReLU.

    Args:
        in_features: ``C·H·W`` of the input images (64 for 8 × 8 grey digits).
        widths: output width of each hidden layer; the last is ``out_channels``.
        batch_norm: BatchNorm1d after each linear layer.
    """

    def __init__(self, in_features: int = 64, widths: Sequence[int] = (100, 100), batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features
        for width in widths:
            layers += [nn.Linear(features, width), *([nn.BatchNorm1d(width)] if batch_norm else []), nn.ReLU(inplace=True)]
            features = width
        self.layers = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_channels: int = features
        self.reduction: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x[0].numel() != self.in_features:
            raise ValueError(f"MLP expects images of {self.in_features} values (C·H·W), got {tuple(x.shape[1:])}")
        return self.layers(x)[:, :, None, None]


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 (§4.2): a 3 × 3 stem of 16 channels, three stages of ``n`` basic blocks with
    16, 32, 64 channels and strides 1, 2, 2; depth ``6n + 2``. ResNet-32 (``n = 5``, 0.46 M parameters) is the network
    of FACIL and ANCL's CIFAR-100 experiments (``src/networks/resnet32.py``: torchvision-style ``BasicBlock`` with a
    1 × 1 conv + BN projection where the shape changes). Returns the ``(B, 64, H/4, W/4)`` map.

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110).
        in_chans: input channels.
    """

    def __init__(self, depth: int = 32, in_chans: int = 3) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        if (depth - 2) % 6:
            raise ValueError(f"CifarResNet depth must be 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        layers: list[nn.Module] = [nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)]
        channels = 16
        for width, stride in zip((16, 32, 64), (1, 2, 2)):
            for i in range(blocks):
                step = stride if i == 0 else 1
                projection = None
                if step != 1 or channels != width:
                    projection = nn.Sequential(nn.Conv2d(channels, width, 1, step, bias=False), nn.BatchNorm2d(width))
                layers.append(BasicBlock(channels, width, step, projection))
                channels = width
        self.features = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.out_channels: int = channels
        self.reduction: int = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _layerscale_init(depth: int) -> float:
    """LayerScale's initial value by depth, CaiT's rule (Touvron et al. 2021, "Going deeper with image transformers")
    that ResMLP follows (ResMLP §3.1): 0.1 up to 18 blocks, 1e-5 up to 24, 1e-6 deeper. The official ResMLP code
    (facebookresearch/deit ``resmlp_models.py``) uses 0.1 / 1e-5 / 1e-6 for ResMLP-12 / 24 / 36."""
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


class _TokenGrid(nn.Module):
    """A timm ``MlpMixer`` without head whose tokens ``(B, N, C)`` after the final norm are laid back on the patch grid.

    The tokens come out of ``PatchEmbed`` in row-major patch order, so ``(B, N, C) → (B, C, H/p, W/p)`` is a view (no
    copy; the map is channels-last in memory). The zoo's ``ClassifierHead`` (GAP + linear) on this map computes
    exactly timm's head (token mean + linear), and CAM, few-shot and semi-supervised heads get a feature map.
    Token mixing has a fixed number of tokens, so the input must be ``img_size`` × ``img_size``.
    """

    def __init__(self, model: MlpMixer) -> None:
        super().__init__()
        self.model = model
        self.img_size: tuple[int, int] = tuple(model.stem.img_size)
        self.grid_size: tuple[int, int] = tuple(model.stem.grid_size)
        self.out_channels: int = int(model.embed_dim)
        self.reduction: int = int(model.stem.patch_size[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if (height, width) != self.img_size:
            raise ValueError(
                f"{type(self).__name__} was built for {self.img_size[0]}×{self.img_size[1]} images "
                f"({self.grid_size[0] * self.grid_size[1]} patches, and the token-mixing layers have that many inputs) "
                f"but got {height}×{width}: resize the data to img_size or build the backbone with img_size set to "
                "the data's size"
            )
        tokens = self.model.forward_features(x)  # (B, N, C), after the final norm
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid_size)

    @staticmethod
    def _registered(name: str, family: str, prefix: str) -> None:
        architecture = name.split(".")[0]  # "mixer_b16_224.goog_in21k_ft_in1k" → its architecture
        names = timm.list_models(f"{prefix}*")
        if architecture not in names:
            raise ValueError(f"{family} takes a registered timm name, one of {names}; got '{name}'")

    @staticmethod
    def _check_sizes(name: str, requested: dict, built: dict) -> None:
        """A registered name fixes the architecture (timm's registry functions cannot take ``patch_size`` etc.: they
        build ``dict(patch_size=..., **kwargs)`` and fail on a second value); a size given beside it must agree."""
        differing = {key: (value, built[key]) for key, value in requested.items()
                     if value is not None and value != built[key]}
        if differing:
            details = ", ".join(f"{key}={given} (the model has {actual})" for key, (given, actual) in differing.items())
            raise ValueError(f"'{name}' fixes the architecture, but {details}: drop the custom sizes to use the "
                             "registered model, or drop `name` to build custom sizes")


class MLPMixer(_TokenGrid):
    """MLP-Mixer (Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision", NeurIPS 2021) as a feature-map
    backbone, built on timm's ``MlpMixer`` / ``MixerBlock``.

    Each block mixes tokens, ``X += W₂ GELU(W₁ LN(X)ᵀ)``ᵀ with ``W₁`` of shape ``(mlp_ratio[0]·d, S)`` across the ``S``
    patches, then channels, ``X += W₄ GELU(W₃ LN(X))`` with hidden ``mlp_ratio[1]·d`` (paper §2, Eq. 1; the ratios are
    fractions of the embedding width ``d``, not of ``S``). There is no positional embedding: the token-mixing MLP sees
    the patches in a fixed order, so it is position-aware by itself (§2).

    Two ways to build it:

    * ``name``: a registered timm architecture at the paper's sizes (``mixer_s32_224``, ``mixer_b16_224``, …); only
      ``img_size``, ``in_chans`` and ``drop_path_rate`` may change it. ``pretrained`` loads timm's weights.
    * custom sizes (``name=None``): ``img_size`` (default 8), ``patch_size`` (2), ``num_blocks`` (4), ``embed_dim`` (64),
      ``mlp_ratio`` (``(0.5, 4.0)``, the paper's ``D_S = d/2``, ``D_C = 4d``); the defaults are the 8×8 digits demo.

    Args:
        name: a ``timm.list_models("mixer_*")`` name, or ``None`` for custom sizes.
        pretrained: load timm's weights for ``name`` (needs internet or the HF cache).
        img_size: input side; the input must have exactly this size (the number of tokens is fixed).
        in_chans: input channels.
        patch_size, num_blocks, embed_dim, mlp_ratio: the architecture (with ``name``: omit them or give the same).
        drop_path_rate: stochastic depth; timm applies the same rate to every block.

    Example:
        >>> net = MLPMixer(img_size=8, in_chans=1)
        >>> net(torch.zeros(2, 1, 8, 8)).shape, net.out_channels, net.reduction
        (torch.Size([2, 64, 4, 4]), 64, 2)
    """

    def __init__(
        self,
        name: Optional[str] = None,
        pretrained: bool = False,
        img_size: Optional[int] = None,
        in_chans: int = 3,
        patch_size: Optional[int] = None,
        num_blocks: Optional[int] = None,
        embed_dim: Optional[int] = None,
        mlp_ratio: Optional[tuple[float, float]] = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        if name is None:
            if pretrained:
                raise ValueError("MLPMixer: pretrained weights exist only for a registered `name` (e.g. mixer_b16_224)")
            model = MlpMixer(num_classes=0, img_size=img_size or 8, in_chans=in_chans, patch_size=patch_size or 2,
                             num_blocks=num_blocks or 4, embed_dim=embed_dim or 64,
                             mlp_ratio=tuple(mlp_ratio) if mlp_ratio is not None else (0.5, 4.0),
                             block_layer=MixerBlock, drop_path_rate=drop_path_rate)
        else:
            self._registered(name, "MLPMixer", "mixer_")
            extra = {} if img_size is None else {"img_size": img_size}
            model = timm.create_model(name, pretrained=pretrained, in_chans=in_chans, num_classes=0,
                                      drop_path_rate=drop_path_rate, **extra)
            block = model.blocks[0]
            dim = int(model.embed_dim)
            hidden = (block.mlp_tokens.fc1.out_features, block.mlp_channels.fc1.out_features)
            requested_hidden = (None if mlp_ratio is None
                                else tuple(int(r * (embed_dim or dim)) for r in to_2tuple(tuple(mlp_ratio))))
            self._check_sizes(name, {"patch_size": patch_size, "num_blocks": num_blocks, "embed_dim": embed_dim,
                                     "token/channel hidden widths": requested_hidden},
                              {"patch_size": model.stem.patch_size[0], "num_blocks": len(model.blocks),
                               "embed_dim": dim, "token/channel hidden widths": hidden})
        super().__init__(model)


class ResMLP(_TokenGrid):
    """ResMLP (Touvron et al., "ResMLP: Feedforward networks for image classification with data-efficient training",
    2021) as a feature-map backbone, built on timm's ``MlpMixer`` with ``ResBlock`` and ``Affine``.

    Each block is ``Z = X + ls₁ ⊙ (A · Aff(X)ᵀ)ᵀ`` with a single linear layer ``A`` of shape ``(S, S)`` across the
    patches, then ``Y = Z + ls₂ ⊙ C GELU(B Aff(Z))`` with hidden ``mlp_ratio·d`` (paper §2, Eqs. 2–3). ``Aff(x) = α ⊙
    x + β`` replaces LayerNorm (no statistics; α = 1, β = 0 at init), also as the final norm; the per-channel
    LayerScale ``ls`` starts small, so every block starts near the identity. No positional embedding (§2).

    Two ways to build it:

    * ``name``: a registered timm architecture (``resmlp_12_224``, ``resmlp_24_224``, …); only ``img_size``,
      ``in_chans``, ``drop_path_rate`` and, untrained, ``init_values`` may change it. timm starts ``resmlp_12_224``'s
      LayerScale at 1e-4, the official code (deit ``resmlp_models.py``) ResMLP-12 at 0.1: pass ``init_values: 0.1``
      to train it as the paper did.
    * custom sizes (``name=None``): ``img_size`` (default 8), ``patch_size`` (2), ``num_blocks`` (4), ``embed_dim``
      (64), ``mlp_ratio`` (4); the defaults are the 8×8 digits demo.

    Args:
        name: a ``timm.list_models("resmlp_*")`` name, or ``None`` for custom sizes.
        pretrained: load timm's weights for ``name``.
        img_size: input side; the input must have exactly this size.
        in_chans: input channels.
        patch_size, num_blocks, embed_dim, mlp_ratio: the architecture (with ``name``: omit them or give the same).
        init_values: LayerScale's initial value; default: CaiT's depth rule (0.1 up to 18 blocks, 1e-5 up to 24, 1e-6
            deeper) for custom sizes, timm's value for a name. Not allowed with ``pretrained`` (the weights set it).
        drop_path_rate: stochastic depth; timm applies the same rate to every block.

    Example:
        >>> net = ResMLP(img_size=8, in_chans=1)
        >>> net(torch.zeros(2, 1, 8, 8)).shape, net.out_channels, net.reduction
        (torch.Size([2, 64, 4, 4]), 64, 2)
    """

    def __init__(
        self,
        name: Optional[str] = None,
        pretrained: bool = False,
        img_size: Optional[int] = None,
        in_chans: int = 3,
        patch_size: Optional[int] = None,
        num_blocks: Optional[int] = None,
        embed_dim: Optional[int] = None,
        mlp_ratio: Optional[float] = None,
        init_values: Optional[float] = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        if name is None:
            if pretrained:
                raise ValueError("ResMLP: pretrained weights exist only for a registered `name` (e.g. resmlp_12_224)")
            depth = num_blocks or 4
            layerscale = _layerscale_init(depth) if init_values is None else init_values
            model = MlpMixer(num_classes=0, img_size=img_size or 8, in_chans=in_chans, patch_size=patch_size or 2,
                             num_blocks=depth, embed_dim=embed_dim or 64,
                             mlp_ratio=4.0 if mlp_ratio is None else mlp_ratio,
                             block_layer=partial(ResBlock, init_values=layerscale), norm_layer=Affine,
                             drop_path_rate=drop_path_rate)
        else:
            self._registered(name, "ResMLP", "resmlp_")
            if pretrained and init_values is not None:
                raise ValueError("ResMLP: init_values is an initialisation; with pretrained=True the weights set "
                                 "LayerScale, so leave init_values unset")
            extra = {} if img_size is None else {"img_size": img_size}
            model = timm.create_model(name, pretrained=pretrained, in_chans=in_chans, num_classes=0,
                                      drop_path_rate=drop_path_rate, **extra)
            dim = int(model.embed_dim)
            hidden = model.blocks[0].mlp_channels.fc1.out_features
            self._check_sizes(name, {"patch_size": patch_size, "num_blocks": num_blocks, "embed_dim": embed_dim,
                                     "channel hidden width": None if mlp_ratio is None
                                     else int(mlp_ratio * (embed_dim or dim))},
                              {"patch_size": model.stem.patch_size[0], "num_blocks": len(model.blocks),
                               "embed_dim": dim, "channel hidden width": hidden})
            if init_values is not None:
                # LayerScale is a per-channel scale initialised to a constant (ResMLP §2); re-initialising it leaves
                # every other weight as timm drew it.
                with torch.no_grad():
                    for block in model.blocks:
                        block.ls1.fill_(init_values)
                        block.ls2.fill_(init_values)
        super().__init__(model)

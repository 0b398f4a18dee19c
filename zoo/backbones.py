"""Backbones: any timm model as a feature extractor, plus the small research networks papers train from scratch.

Contract shared by every backbone here (and expected by heads across the zoo):

* ``TimmBackbone`` / ``ConvNet``: ``forward(x) -> (B, out_channels, H/r, W/r)``, the last feature map, with
  ``out_channels: int`` and ``reduction: int``.
* ``TimmFeatures``: ``forward(x) -> list`` of maps from several stages (``features_only``), with
  ``out_channels: list[int]`` and ``reductions: list[int]``; this is what an FPN consumes.

``pretrained`` is passed straight to ``timm.create_model`` (default ``False``: nothing is downloaded unless asked).
Small research backbones (Conv-4/Conv-6 of the few-shot papers, WRN-28-2 of the semi-supervised ones) live in this
file too, so that every family builds on the same few definitions.
"""

from __future__ import annotations

from typing import Optional, Sequence

import timm
import torch
from torch import nn

__all__ = ["TimmBackbone", "TimmFeatures", "ConvNet", "StridedConvFeatures"]


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
    """

    def __init__(self, in_chans: int = 3, widths: Sequence[int] = (16, 32, 64, 128, 128),
                 out_indices: Sequence[int] = (2, 3, 4), output_stride: int = 32) -> None:
        super().__init__()
        stages, channels, reduction, dilation, reductions = [], in_chans, 1, 1, []
        for width in widths:
            stride = 2 if reduction * 2 <= output_stride else 1
            if stride == 1:
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

"""Pixel-to-Prototype Contrast (PPC) for weakly supervised semantic segmentation, on a SEAM-style CAM network.

Paper: "Weakly Supervised Semantic Segmentation by Pixel-to-Prototype Contrast", Y. Du, Z. Fu, Q. Liu, Y. Wang,
CVPR 2022 (https://arxiv.org/abs/2110.07110). Official code: https://github.com/usr922/wseg (@e96b961), built on
SEAM: "Self-supervised Equivariant Attention Mechanism for Weakly Supervised Semantic Segmentation", Y. Wang, J. Zhang,
M. Kan, S. Shan, X. Chen, CVPR 2020 (https://github.com/YudeWang/SEAM). The class maps are CAMs
(``zoo.cam.class_activation_maps``, Zhou et al. 2016).

Only image-level labels train the network. Each step sees a crop and its downscale (SEAM's scale-equivariance view):

* **classification**: multi-label soft margin on the global average of each view's CAM (the background channel 0
  excluded), plus SEAM's adaptive min-pooling term on the refined maps (``contrast_train.py``);
* **ER / ECR** (SEAM §3.2-3.3): the max-normalised CAMs of the two views must agree after rescaling; each view's
  PCM-refined map must match the other view's CAM reduced to its top class per pixel (mean of the worst 20 %);
* **PPC** (paper §3): pixel embeddings from a projection head are pulled to their class prototype and pushed from the
  others (InfoNCE, τ = 0.1). Prototypes are the CAM-weighted means of the top-k embeddings of each class over the
  whole batch, without gradient; a pixel's class is its pseudo label (the label-masked CAM against a constant
  background score 0.2). Cross-view terms contrast view-1 pixels with view-2 prototypes (and view-2 pseudo labels),
  the intra-view term adds semi-hard prototype mining and hard pixel sampling (§3.3). Every weight is 0.1.

Where the official code differs from the paper, the zoo follows the code (spec §3.3, §9):

* prototypes use the refined map after per-channel min-max normalisation, **not** label-masked, with the background
  channel set to the constant 0.2, so the background prototype is the mean of arbitrary pixels
  (``estimate_prototypes``);
* the semi-hard negatives are the prototypes ranked 4th to 13th by similarity, the positive added to the denominator
  (it may also be among them); hard pixels are a random half of a class's pixels plus the half just above the 10 %
  hardest (the code's "last n/2 of the lowest 60 %"); classes are averaged over those present, singletons counting;
* the official ``PolyOptimizer`` passes its weight decay as SGD's momentum (``SGD.__init__(params, lr, wd)``), so it
  trains with momentum 5e-4: ``momentum`` defaults to 0 here, and the decay is per group (0 for biases).

Departures, all for cost: the ER/ECR maps are compared at the second view's size by resizing the feature-resolution
maps directly (the code first upsamples to the input: with ``align_corners=True`` the max-normalisation commutes with
that upsampling), and the min-pooling term is taken at feature resolution. Under DDP the prototypes come from the
all-gathered batch (``sync_prototypes``), so they equal those of one process with the global batch.

Inference (``contrast_infer.py``): refined maps at scales {0.5, 1, 1.5, 2} and their flips, summed at the image size,
label-masked, max-normalised; pseudo mask = argmax over [background score, maps]. Validation sweeps the background
score (``eval.py --curve``) on loader 0 (VOC train 1464: the seed mIoU) and reports loader 1 (VOC val) at the
threshold chosen there; ``zoo predict`` writes the pseudo masks at that threshold as VOC-palette PNGs, the training
masks of the stage-2 network (``zoo.wsss.segmentation``).

```bibtex
@inproceedings{du2022ppc,
  title={Weakly Supervised Semantic Segmentation by Pixel-to-Prototype Contrast},
  author={Du, Ye and Fu, Zehua and Liu, Qingjie and Wang, Yunhong},
  booktitle={CVPR}, year={2022}
}
@inproceedings{wang2020seam,
  title={Self-supervised Equivariant Attention Mechanism for Weakly Supervised Semantic Segmentation},
  author={Wang, Yude and Zhang, Jie and Kan, Meina and Shan, Shiguang and Chen, Xilin},
  booktitle={CVPR}, year={2020}
}
```
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, Optional, Sequence

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from zoo.callbacks import log_table
from zoo.cam import class_activation_maps
from zoo.predict import PredictionWriter
from zoo.schedules import poly
from zoo.wsss.evaluation import MaskWriter, ThresholdSweepIoU, masks_from_maps

__all__ = [
    "max_norm", "pcm_input", "PixelCorrelationModule", "CAMNetOutput", "SEAMNet",
    "multilabel_cam_loss", "adaptive_min_pooling_loss", "max_onehot", "with_background", "equivariant_cross_loss",
    "prototype_scores", "pseudo_labels", "gather_batches", "estimate_prototypes", "info_nce", "semi_hard_intra_nce",
    "PPC",
]


# ---- maps --------------------------------------------------------------------------------------------------------

def max_norm(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """SEAM's ``max_norm`` of ``(N, C, h, w)``: ReLU, then per-channel ``relu(x − min − ε) / (max − min + ε)``.
    An all-zero channel (a class masked out) stays 0."""
    maps = F.relu(maps)
    flat = maps.flatten(2)
    low, high = flat.min(-1).values[..., None, None], flat.max(-1).values[..., None, None]
    return F.relu(maps - low - eps) / (high - low + eps)


@torch.no_grad()
def pcm_input(cam: torch.Tensor) -> torch.Tensor:
    """The map the PCM propagates (``resnet38_contrast.py``): max-normalised CAM, background = 1 − max foreground,
    the foreground channels other than each pixel's maximum zeroed; no gradient."""
    cam = F.relu(cam.detach())
    peak = cam.flatten(2).max(-1).values[..., None, None] + 1e-5
    fg = F.relu(cam[:, 1:] - 1e-5) / peak[:, 1:]
    top = fg.max(1, keepdim=True).values
    return torch.cat([1 - top, torch.where(fg < top, torch.zeros_like(fg), fg)], 1)


class PixelCorrelationModule(nn.Module):
    """SEAM's pixel correlation module (PCM, §3.3): refines a class map by pixel affinities.

    ``f = conv1×1([image, ReLU(conv(mid_1)), ReLU(conv(mid_2))])`` (the mid-level features detached, so the PCM
    never trains the backbone), L2-normalised per pixel; ``aff = ReLU(fᵀf)`` normalised to sum 1 over the source
    pixels; ``refined = cam · aff``.

    Args:
        mid_channels: channels of the two backbone levels fed in (ResNet-38's conv4 / conv5: 512, 1024).
        widths: their reduced widths (64, 128 as the official code).
        image_channels: channels of the input image.
    """

    def __init__(self, mid_channels: Sequence[int], widths: Sequence[int] = (64, 128), image_channels: int = 3) -> None:
        super().__init__()
        self.reduce = nn.ModuleList(nn.Conv2d(c, w, 1, bias=False) for c, w in zip(mid_channels, widths))
        self.embed = nn.Conv2d(sum(widths) + image_channels, sum(widths), 1, bias=False)
        for conv in self.reduce:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.embed.weight, gain=4)

    def forward(self, cam: torch.Tensor, images: torch.Tensor, mids: Sequence[torch.Tensor]) -> torch.Tensor:
        size = cam.shape[-2:]

        def at_cam_size(x: torch.Tensor) -> torch.Tensor:
            return x if x.shape[-2:] == size else F.interpolate(x, size, mode="bilinear", align_corners=True)

        parts = [at_cam_size(images)] + [F.relu(conv(at_cam_size(m.detach()))) for conv, m in zip(self.reduce, mids)]
        f = self.embed(torch.cat(parts, 1)).flatten(2)
        f = f / (f.norm(dim=1, keepdim=True) + 1e-5)
        aff = F.relu(f.transpose(1, 2) @ f)
        aff = aff / (aff.sum(1, keepdim=True) + 1e-5)
        return (cam.flatten(2) @ aff).view_as(cam)


class CAMNetOutput(NamedTuple):
    """What ``SEAMNet`` returns, all at the feature resolution."""

    cam: torch.Tensor  # (N, K + 1, h, w), channel 0 = background
    cam_rv: torch.Tensor  # the PCM-refined map (the CAM itself without PCM)
    projection: torch.Tensor  # (N, D, h, w) pixel embeddings, after ReLU, not normalised


class SEAMNet(nn.Module):
    """The SEAM / PPC network (``resnet38_contrast.py``): backbone → Dropout2d → CAM classifier (no bias, background
    channel 0) and projection head (1×1 conv, no bias, ReLU), plus the optional PCM.

    Args:
        backbone: returns a list of feature maps (``TimmFeatures`` / ``StridedConvFeatures``); the last one is the
            CAM's, the two before it feed the PCM. Its ``out_channels`` lists their widths.
        num_classes: foreground classes (20 on VOC).
        projection_dim: width of the pixel embeddings (128).
        dropout: Dropout2d on the last features (0.5).
        use_pcm: refine the maps with the PCM (SEAM); without it ``cam_rv`` is the CAM.
        pcm_widths: the PCM's reduced widths.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, projection_dim: int = 128, dropout: float = 0.5,
                 use_pcm: bool = True, pcm_widths: Sequence[int] = (64, 128)) -> None:
        super().__init__()
        channels = list(backbone.out_channels)
        if use_pcm and len(channels) < 3:
            raise ValueError(f"use_pcm needs a backbone with at least 3 output levels (the PCM reads the two before "
                             f"the last); this one gives {len(channels)}: set out_indices accordingly")
        self.backbone = backbone
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Linear(channels[-1], num_classes + 1, bias=False)  # the 1×1 conv fc8, as CAM's weight
        self.projection = nn.Conv2d(channels[-1], projection_dim, 1, bias=False)
        self.pcm = PixelCorrelationModule(channels[-3:-1], pcm_widths) if use_pcm else None
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.xavier_uniform_(self.projection.weight)

    def new_layers(self) -> list[nn.Module]:
        """The layers trained from scratch (10× / 20× learning rate)."""
        return [m for m in (self.classifier, self.projection, self.pcm) if m is not None]

    def forward(self, images: torch.Tensor) -> CAMNetOutput:
        features = self.backbone(images)
        top = self.dropout(features[-1])
        cam = class_activation_maps(top, self.classifier.weight)
        projection = F.relu(self.projection(top))
        cam_rv = self.pcm(pcm_input(cam), images, features[-3:-1]) if self.pcm is not None else cam
        return CAMNetOutput(cam, cam_rv, projection)


# ---- losses --------------------------------------------------------------------------------------------------------

def multilabel_cam_loss(cam: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin on the global average of the foreground CAM channels (``labels``: ``(N, K)``)."""
    return F.multilabel_soft_margin_loss(cam.float().mean((2, 3))[:, 1:], labels.float())


def adaptive_min_pooling_loss(fg_maps: torch.Tensor) -> torch.Tensor:
    """SEAM/PPC's ``adaptive_min_pooling_loss``: per pixel the strongest foreground map; the mean of ReLU of the
    ``hw / 4`` smallest values per image. It pushes a quarter of every image below 0 (background)."""
    strongest = fg_maps.float().max(1).values.flatten(1)
    k = max(1, strongest.shape[1] // 4)
    return F.relu(strongest.topk(k, dim=1, largest=False).values).mean()


def with_background(maps: torch.Tensor) -> torch.Tensor:
    """Set channel 0 of label-masked, max-normalised maps to ``1 − max foreground``."""
    return torch.cat([1 - maps[:, 1:].max(1, keepdim=True).values, maps[:, 1:]], 1)


def max_onehot(maps: torch.Tensor) -> torch.Tensor:
    """Keep each pixel's strongest foreground value and zero the other foreground channels; background kept (not a
    0/1 one-hot: ``contrast_train.max_onehot``)."""
    fg = maps[:, 1:]
    keep = fg == fg.max(1, keepdim=True).values
    return torch.cat([maps[:, :1], fg * keep], 1)


def equivariant_cross_loss(target_maps: torch.Tensor, refined_maps: torch.Tensor, ratio: float = 0.2) -> torch.Tensor:
    """SEAM's ECR: ``|max_onehot(target.detach()) − refined|``, the mean of the largest ``ratio`` of the values of each
    image (all channels)."""
    diff = (max_onehot(target_maps.detach()) - refined_maps).abs().flatten(1)
    k = max(1, int(ratio * diff.shape[1]))
    return diff.topk(k, dim=1).values.mean()


# ---- pixel-to-prototype contrast -----------------------------------------------------------------------------------

@torch.no_grad()
def prototype_scores(refined_maps: torch.Tensor, bg_threshold: float) -> torch.Tensor:
    """The no-gradient scores of the prototypes and pseudo labels: ``max_norm`` of the refined map per channel, the
    background channel replaced by the constant ``bg_threshold``."""
    scores = max_norm(refined_maps.detach().float())
    scores[:, 0] = bg_threshold
    return scores


@torch.no_grad()
def pseudo_labels(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N, h, w)`` pseudo labels: argmax of the scores masked by ``[1, labels]``. A class absent from the image never
    wins (its score is 0 against the background's positive constant); a pixel whose present classes all score below
    the background constant is background."""
    mask = torch.cat([labels.new_ones(len(labels), 1), labels], 1).to(scores.dtype)
    return (scores * mask[..., None, None]).argmax(1)


@torch.no_grad()
def gather_batches(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate every rank's batch of each tensor (ranks may hold different batch sizes); the tensors themselves
    without DDP. No gradient: what the prototypes are estimated from."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    world = dist.get_world_size()
    size = torch.tensor([len(tensors[0])], device=tensors[0].device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    gathered = []
    for tensor in tensors:
        padded = torch.cat([tensor, tensor.new_zeros(longest - len(tensor), *tensor.shape[1:])]).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[: int(n)] for part, n in zip(parts, sizes)]))
    return tuple(gathered)


@torch.no_grad()
def estimate_prototypes(scores: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
    """Class prototypes ``(K + 1, D)``: for each class the top-``k`` pixels of its score over the **whole batch**, the
    mean of their embeddings weighted by the score, L2-normalised (paper Eq. 4 as ``contrast_train.py`` computes it).

    Args:
        scores: ``(N, K + 1, h, w)`` from ``prototype_scores`` (not label-masked).
        features: ``(N, D, h, w)`` pixel embeddings (detached here).
        k: pixels per class (the code's ``h · w / 8`` of one image, taken over the batch).
    """
    num_classes, dim = scores.shape[1], features.shape[1]
    flat_scores = scores.transpose(0, 1).reshape(num_classes, -1)
    flat_features = features.detach().float().permute(0, 2, 3, 1).reshape(-1, dim)
    top, index = flat_scores.topk(min(k, flat_scores.shape[1]), dim=1)
    weighted = (top.unsqueeze(-1) * flat_features[index]).sum(1) / top.sum(1, keepdim=True).clamp_min(1e-12)
    return F.normalize(weighted, dim=-1)


def info_nce(features: torch.Tensor, positive: torch.Tensor, prototypes: torch.Tensor,
             temperature: float = 0.1) -> torch.Tensor:
    """Per-pixel InfoNCE ``−log(exp(f·p⁺/τ) / Σ_c exp(f·p_c/τ))`` (paper Eq. 3), all prototypes in the denominator.

    Args:
        features: ``(P, D)`` L2-normalised pixel embeddings.
        positive: ``(P,)`` index of each pixel's prototype.
        prototypes: ``(C, D)`` L2-normalised.
    """
    return F.cross_entropy(features @ prototypes.t() / temperature, positive, reduction="none")


def semi_hard_intra_nce(features: torch.Tensor, positive: torch.Tensor, prototypes: torch.Tensor,
                        temperature: float = 0.1, skip: int = 3, num_negatives: int = 10,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The intra-view term with semi-hard prototype mining and hard pixel sampling (paper §3.3), vectorised.

    Prototype mining: the negatives of a pixel are the prototypes ranked ``skip + 1`` to ``skip + num_negatives`` by
    similarity (the 3 most similar are likely its own class or noise); the denominator is ``exp(f·p⁺/τ)`` plus theirs.
    Pixel sampling, per class ``c`` with ``n`` pixels (``n ≥ 2``): a random ``n // 2`` of them and the ``n // 2``
    just above the hardest 10 % (ranks ``⌊0.6n⌋ − n//2`` to ``⌊0.6n⌋`` by ascending similarity to the positive); the
    class loss is the mean over both halves (a pixel in both counts twice). The result is the sum over classes
    divided by the number of classes present (singletons counted but contributing 0), as ``contrast_train.py``.
    """
    num_pixels, num_protos = features.shape[0], prototypes.shape[0]
    similarity = features @ prototypes.t()  # (P, C)
    positive_logit = similarity.gather(1, positive[:, None]).squeeze(1) / temperature
    with torch.no_grad():
        ranked = similarity.topk(min(skip + num_negatives, num_protos), dim=1).indices[:, skip:]
    negative_logits = similarity.gather(1, ranked) / temperature
    loss = torch.logsumexp(torch.cat([positive_logit[:, None], negative_logits], 1), 1) - positive_logit

    with torch.no_grad():
        counts = torch.bincount(positive, minlength=num_protos)
        start = counts.cumsum(0) - counts
        n = counts[positive]

        def rank_within_class(key: torch.Tensor) -> torch.Tensor:
            order = key.argsort(stable=True)
            order = order[positive[order].argsort(stable=True)]  # grouped by class, ascending key inside
            rank = torch.empty_like(order)
            rank[order] = torch.arange(num_pixels, device=order.device)
            return rank - start[positive]

        half = n // 2
        upper = (n.double() * 0.6).floor().long()
        hardness_rank = rank_within_class((similarity.gather(1, positive[:, None]).squeeze(1) + 1) / 2)
        random_rank = rank_within_class(torch.rand(num_pixels, generator=generator).to(features.device))
        picked = (random_rank < half).double() + ((hardness_rank >= upper - half) & (hardness_rank < upper)).double()
        weight = torch.where(n >= 2, picked / (2 * half).clamp_min(1), torch.zeros_like(picked))
        present = int((counts > 0).sum())
    return (weight.to(loss.dtype) * loss).sum() / max(present, 1)


# ---- the LightningModule -------------------------------------------------------------------------------------------

class PPC(L.LightningModule):
    """SEAM-style CAM network trained with image-level labels, with the PPC terms; pseudo masks at evaluation.

    The ablations of the issue run from configs: CAM alone (``use_er=false, use_pcm=false, use_min_pool=false``, no
    contrast), SEAM-lite (``use_er`` + PCM/ECR) and SEAM-lite + PPC (``use_cross_proto``, ``use_cross_cam``,
    ``use_intra``).

    Batches (the contract with ``datamodules.wsss``): training ``{"image" (N, 3, H, W), "labels" (N, K)}``;
    evaluation also ``"mask"`` (N, H, W) with 255 = ignore; predict ``"name"`` (ids). ``labels`` are multi-hot over
    the ``num_classes`` foreground classes.

    Args:
        backbone: see ``SEAMNet`` (ResNet-50 at output stride 8 on VOC; a small CNN on the digit canvases).
        num_classes: foreground classes.
        second_view_size: side of the downscaled view (128 for VOC's 448 crops, as the code).
        projection_dim, dropout, pcm_widths: see ``SEAMNet``.
        use_pcm: PCM refinement and the ECR loss (SEAM); without it the refined map is the CAM.
        use_er: SEAM's equivariant regularisation between the views.
        use_min_pool: SEAM's adaptive min-pooling term in the classification loss.
        use_cross_proto, use_cross_cam, use_intra: the three PPC terms.
        contrast_weight: weight of each PPC term (0.1), temperature: τ (0.1).
        contrast_start_epoch: the PPC terms join from this epoch on (0, the paper's: its backbone starts from ImageNet
            weights). A network trained from scratch has no meaningful prototypes at first, and contrasting against
            them from step 0 collapses its maps (measured on the digit canvases, docs/models/wsss.md).
        prototype_bg_threshold: the constant background score of prototypes and pseudo labels (0.2).
        prototype_k: pixels per prototype; ``None``: ``h · w / 8`` of the second view's feature map (the code's 32).
        hard_skip, hard_negatives: semi-hard mining (3, 10).
        sync_prototypes: under DDP, estimate the prototypes from the all-gathered batch.
        lr, momentum, weight_decay: SGD (0.01, 0 — see the module docstring —, 5e-4) with 1× / 2× / 10× / 20×
            groups (backbone weights, backbone biases and norms, new weights, new biases) and poly decay (power 0.9).
        optimizer: ``"sgd"`` (the paper's) or ``"adamw"`` (same groups and schedule; the from-scratch digit net).
        scales, flip: multi-scale inference.
        sweep_max, sweep_step: the swept background scores ``0, step, ..., max`` (``eval.py --curve``: 0 to 0.59).
        infer_bg_threshold: the one ``predict`` uses until a validation has chosen one (``contrast_infer.py``'s 0.26).
    """

    ddp_find_unused_parameters = True  # the projection head idles in the CAM-only ablation

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 20,
        second_view_size: int = 128,
        projection_dim: int = 128,
        dropout: float = 0.5,
        pcm_widths: Sequence[int] = (64, 128),
        use_pcm: bool = True,
        use_er: bool = True,
        use_min_pool: bool = True,
        use_cross_proto: bool = True,
        use_cross_cam: bool = True,
        use_intra: bool = True,
        contrast_weight: float = 0.1,
        contrast_start_epoch: int = 0,
        temperature: float = 0.1,
        prototype_bg_threshold: float = 0.2,
        prototype_k: Optional[int] = None,
        hard_skip: int = 3,
        hard_negatives: int = 10,
        sync_prototypes: bool = True,
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 5e-4,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        poly_power: float = 0.9,
        scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
        flip: bool = True,
        sweep_max: float = 0.59,
        sweep_step: float = 0.01,
        infer_bg_threshold: float = 0.26,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = SEAMNet(backbone, num_classes, projection_dim, dropout, use_pcm, pcm_widths)
        # chosen by the validation sweep, saved with the checkpoint: what ``predict`` thresholds at
        self.register_buffer("bg_threshold", torch.tensor(float(infer_bg_threshold)))
        thresholds = [round(sweep_step * i, 6) for i in range(int(round(sweep_max / sweep_step)) + 1)]
        self.pseudo_iou = ThresholdSweepIoU(num_classes + 1, thresholds)
        self.val_iou = ThresholdSweepIoU(num_classes + 1, thresholds)
        self._generator = torch.Generator()

    @property
    def uses_contrast(self) -> bool:
        hp = self.hparams
        started = self._trainer is None or self.current_epoch >= hp.contrast_start_epoch
        return (hp.use_cross_proto or hp.use_cross_cam or hp.use_intra) and started

    # ---- training ----------------------------------------------------------------------------------------------

    def _prototypes(self, scores: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
        if self.hparams.sync_prototypes:
            scores, features = gather_batches(scores, features.detach())
        return estimate_prototypes(scores, features, k)

    def _hard_sampling_generator(self) -> torch.Generator:
        # a CPU generator seeded per rank and step: a run and its resumption draw the same pixels
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self._generator.manual_seed(self.hparams.seed * 1_000_003 + self.global_step * 131 + rank)
        return self._generator

    def contrast_losses(self, out1: CAMNetOutput, out2: CAMNetOutput, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three PPC terms of ``contrast_train.py`` for two views (view 1 brought to view 2's feature size)."""
        hp = self.hparams
        size = out2.projection.shape[-2:]
        f1 = F.interpolate(out1.projection, size, mode="bilinear", align_corners=True).float()
        f2 = out2.projection.float()
        s1 = prototype_scores(F.interpolate(out1.cam_rv, size, mode="bilinear", align_corners=True),
                              hp.prototype_bg_threshold)
        s2 = prototype_scores(out2.cam_rv, hp.prototype_bg_threshold)
        pl1, pl2 = pseudo_labels(s1, labels).flatten(), pseudo_labels(s2, labels).flatten()
        k = hp.prototype_k or max(1, size[0] * size[1] // 8)
        p1, p2 = self._prototypes(s1, f1, k), self._prototypes(s2, f2, k)
        e1 = F.normalize(f1.permute(0, 2, 3, 1).flatten(0, 2), dim=-1)
        e2 = F.normalize(f2.permute(0, 2, 3, 1).flatten(0, 2), dim=-1)
        tau, w, zero = hp.temperature, hp.contrast_weight, f1.new_zeros(())
        with torch.autocast(e1.device.type, enabled=False):  # logits / 0.1 in float32, not bf16/fp16
            return self._contrast_terms(e1, e2, pl1, pl2, p1, p2, tau, w, zero)

    def _contrast_terms(self, e1: torch.Tensor, e2: torch.Tensor, pl1: torch.Tensor, pl2: torch.Tensor,
                        p1: torch.Tensor, p2: torch.Tensor, tau: float, w: float,
                        zero: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        losses = {}
        losses["cross_nce"] = (w * (info_nce(e1, pl1, p2, tau).mean() + info_nce(e2, pl2, p1, tau).mean()) / 2
                               if hp.use_cross_proto else zero)
        losses["cross_cam_nce"] = (w * (info_nce(e1, pl2, p1, tau).mean() + info_nce(e2, pl1, p2, tau).mean()) / 2
                                   if hp.use_cross_cam else zero)
        if hp.use_intra:
            generator = self._hard_sampling_generator()
            intra = [semi_hard_intra_nce(e, pl, p, tau, hp.hard_skip, hp.hard_negatives, generator)
                     for e, pl, p in ((e1, pl1, p1), (e2, pl2, p2))]
            losses["intra_nce"] = w * (intra[0] + intra[1]) / 2
        else:
            losses["intra_nce"] = zero
        return losses

    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every term of one step (``contrast_train.py``), unweighted beyond the official weights; ``loss`` is their
        sum."""
        hp = self.hparams
        small = F.interpolate(images, (hp.second_view_size, hp.second_view_size), mode="bilinear",
                              align_corners=True)
        out1, out2 = self.net(images), self.net(small)
        mask = torch.cat([labels.new_ones(len(labels), 1), labels], 1).float()[..., None, None]
        losses = {"cls": (multilabel_cam_loss(out1.cam, labels) + multilabel_cam_loss(out2.cam, labels)) / 2}
        if hp.use_min_pool:
            losses["cls"] = losses["cls"] + (adaptive_min_pooling_loss((out1.cam_rv * mask)[:, 1:])
                                             + adaptive_min_pooling_loss((out2.cam_rv * mask)[:, 1:])) / 2
        if hp.use_er or hp.use_pcm:
            size = small.shape[-2:]

            def at_view2(maps: torch.Tensor) -> torch.Tensor:
                maps = maps if maps.shape[-2:] == size else F.interpolate(maps, size, mode="bilinear",
                                                                           align_corners=True)
                return max_norm(maps.float()) * mask

            cam1, cam2 = at_view2(out1.cam), at_view2(out2.cam)
            if hp.use_er:
                losses["er"] = (cam1[:, 1:] - cam2[:, 1:]).abs().mean()
            if hp.use_pcm:
                cam1, cam2 = with_background(cam1), with_background(cam2)
                rv1, rv2 = at_view2(out1.cam_rv), at_view2(out2.cam_rv)
                losses["ecr"] = equivariant_cross_loss(cam2, rv1) + equivariant_cross_loss(cam1, rv2)
        if self.uses_contrast:
            losses.update(self.contrast_losses(out1, out2, labels))
        losses["loss"] = sum(losses.values())
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.training_losses(batch["image"], batch["labels"])
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, prog_bar=False, on_step=True, on_epoch=True,
                      batch_size=len(batch["image"]))
        return losses["loss"]

    # ---- inference ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def multiscale_maps(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``contrast_infer.py``: the refined foreground maps at every scale and its flip, summed at the image size,
        label-masked and max-normalised: ``(N, K, H, W)`` in [0, 1], absent classes 0."""
        n, (height, width) = len(images), images.shape[-2:]
        total = images.new_zeros(n, self.hparams.num_classes, height, width, dtype=torch.float32)
        for scale in self.hparams.scales:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            x = images if size == (height, width) else F.interpolate(images, size, mode="bilinear",
                                                                     align_corners=False)
            x = torch.cat([x, x.flip(-1)]) if self.hparams.flip else x
            maps = F.interpolate(self.net(x).cam_rv[:, 1:].float(), (height, width), mode="bilinear",
                                 align_corners=False)
            total += maps[:n] + maps[n:].flip(-1) if self.hparams.flip else maps
        return max_norm(total * labels.float()[..., None, None])

    def panel_outputs(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.multiscale_maps(images, labels)
        return maps, masks_from_maps(maps, float(self.bg_threshold))

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        metric = self.pseudo_iou if dataloader_idx == 0 else self.val_iou
        metric.update(self.multiscale_maps(batch["image"], batch["labels"]), batch["mask"])

    def on_validation_epoch_end(self) -> None:
        if self.pseudo_iou.update_count == 0:
            return
        pseudo_curve = self.pseudo_iou.curve()
        best, threshold = self.pseudo_iou.best()
        if not self.trainer.sanity_checking:
            self.bg_threshold.fill_(threshold)
        self.log_dict({"val/pseudo_miou": best, "val/bg_threshold": threshold}, sync_dist=False)
        val_curve = self.val_iou.curve() if self.val_iou.update_count else None
        if val_curve is not None:
            # val is scored at the threshold chosen on the training images, never at its own best
            self.log("val/cam_miou", self.val_iou.at(threshold))
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            rows = [[t, float(pseudo_curve[i])] + ([float(val_curve[i])] if val_curve is not None else [])
                    for i, t in enumerate(self.pseudo_iou.thresholds)]
            log_table(self.trainer, "val/miou_vs_bg_threshold",
                      ["bg_threshold", "pseudo_miou"] + (["val_miou"] if val_curve is not None else []), rows)
        self.pseudo_iou.reset()
        self.val_iou.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.val_iou.update(self.multiscale_maps(batch["image"], batch["labels"]), batch["mask"])

    def on_test_epoch_end(self) -> None:
        best, threshold = self.val_iou.best()
        self.log_dict({"test/cam_miou": self.val_iou.at(float(self.bg_threshold)), "test/cam_miou_oracle": best,
                       "test/bg_threshold": float(self.bg_threshold)})
        self.val_iou.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        maps = self.multiscale_maps(batch["image"], batch["labels"])
        return {"name": list(batch["name"]), "mask": masks_from_maps(maps, float(self.bg_threshold)).to(torch.uint8)}

    def prediction_writer(self) -> PredictionWriter:
        return MaskWriter()

    # ---- optimisation ------------------------------------------------------------------------------------------

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The four groups of ``get_parameter_groups``: backbone weights (1×), backbone biases and norm parameters
        (2×, no decay), new weights (10×), new biases (20×, no decay)."""
        hp = self.hparams
        new = {id(p) for m in self.net.new_layers() for p in m.parameters()}
        groups: list[list[nn.Parameter]] = [[], [], [], []]
        for p in self.net.parameters():
            if p.requires_grad:
                groups[(2 if id(p) in new else 0) + (1 if p.ndim == 1 else 0)].append(p)
        names = ("backbone_weights", "backbone_biases", "new_weights", "new_biases")
        scales, decays = (1, 2, 10, 20), (hp.weight_decay, 0.0, hp.weight_decay, 0.0)
        return [{"name": name, "params": ps, "lr": hp.lr * s, "weight_decay": d}
                for name, ps, s, d in zip(names, groups, scales, decays) if ps]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self.parameter_groups()
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        else:
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {hp.optimizer!r}")
        max_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        if not math.isfinite(max_steps) or max_steps <= 0:
            raise ValueError("the poly schedule needs a finite number of steps: set trainer.max_epochs or max_steps")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: poly(step, int(max_steps), hp.poly_power))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

"""API-Net: Attentive Pairwise Interaction Network (Zhuang, Wang & Qiao, "Learning Attentive Pairwise Interaction
for Fine-Grained Classification", AAAI 2020, https://arxiv.org/abs/2002.10191).

Fine-grained classes differ in small parts; API-Net learns them by comparing images. In every training batch (a
``P`` classes × ``K`` images batch from ``datamodules.sampler.BalancedClassSampler``) each image is paired with its
nearest same-class and nearest other-class image (§3.2), an MLP summarises each pair in a *mutual vector* ``x_m``
(eq. 1), ``x_m`` gates each image's features (eq. 2), and every image is re-described twice: with its own gate
("self") and with its partner's ("other", eq. 3-6). All four attentive features go through the one classifier with
cross-entropy, and a score-ranking term asks the self feature to score the true class higher than the other
feature (eq. 7-8). At test time only the backbone and the classifier run, on single images.

Training follows the official code (PeiqinZhuang/API-Net): SGD for the backbone and the new layers, a cosine
schedule stepped every iteration, and a backbone that is not updated for the first ``freeze_epochs`` epochs (8 on
CUB) while its batch-norm statistics still update.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from zoo.classifier import ClassificationModule
from zoo.contracts import feature_channels
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["mine_pairs", "PairInteraction", "PairOutputs", "api_net_loss", "APINet"]


def mine_pairs(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs ``(first, second)`` of batch indices: every image with its nearest same-class image, then with its
    nearest other-class image, by squared Euclidean distance (§3.2); never an image with itself.

    An image whose class has no other member in the batch (or a batch of one class) has no partner of that kind,
    and that pair is left out, instead of taking ``argmin`` of an all-``inf`` row (index 0, a wrong pair).
    Distances are computed in fp32 on detached features (pairing is a selection, not a path for gradients).
    """
    x = features.detach().float()
    distances = torch.cdist(x, x)  # the nearest by distance is the nearest by squared distance
    same = labels[:, None] == labels[None, :]
    intra_distance, intra = distances.masked_fill(~same, math.inf).fill_diagonal_(math.inf).min(dim=1)
    inter_distance, inter = distances.masked_fill(same, math.inf).min(dim=1)
    has_pair = torch.cat([intra_distance, inter_distance]).isfinite()
    index = torch.arange(len(labels), device=labels.device)
    first = torch.cat([index, index])[has_pair]
    second = torch.cat([intra, inter])[has_pair]
    return first, second


class PairOutputs(NamedTuple):
    """The four attentive features of a batch of pairs (eq. 3-6) and the two gates (eq. 2)."""

    self1: torch.Tensor
    self2: torch.Tensor
    other1: torch.Tensor
    other2: torch.Tensor
    gate1: torch.Tensor
    gate2: torch.Tensor


class PairInteraction(nn.Module):
    """Mutual vector, gates and pairwise interaction (§3.1).

    ``x_m = map2(dropout(map1([x1; x2])))`` with no activation between the two linear maps, as in the official
    code; ``g_i = σ(x_m ⊙ x_i)``; ``x_i^self = x_i + x_i ⊙ g_i`` and ``x_i^other = x_i + x_i ⊙ g_j``.

    Args:
        dim: feature size ``D`` of the backbone's pooled output.
        hidden: width of the mutual-vector MLP (512 in the paper, for D = 2048).
        dropout: dropout inside the MLP.
    """

    def __init__(self, dim: int, hidden: int = 512, dropout: float = 0.5) -> None:
        super().__init__()
        self.map1 = nn.Linear(2 * dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.map2 = nn.Linear(hidden, dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> PairOutputs:
        mutual = self.map2(self.dropout(self.map1(torch.cat([x1, x2], dim=1))))
        gate1, gate2 = torch.sigmoid(mutual * x1), torch.sigmoid(mutual * x2)
        return PairOutputs(x1 + x1 * gate1, x2 + x2 * gate2, x1 + x1 * gate2, x2 + x2 * gate1, gate1, gate2)


def api_net_loss(
    logits_self: torch.Tensor,
    logits_other: torch.Tensor,
    targets: torch.Tensor,
    margin: float = 0.05,
    rank_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L = L_ce + λ L_rk`` for ``M`` pair members (eq. 7-8).

    Args:
        logits_self: ``(M, C)`` logits of ``[x1^self; x2^self]``.
        logits_other: ``(M, C)`` logits of ``[x1^other; x2^other]``, in the same member order.
        targets: ``(M,)`` true classes ``[y1; y2]``.
        margin: ``ε`` of the ranking hinge (0.05).
        rank_weight: ``λ`` (1).

    Returns:
        ``(loss, cross_entropy, rank_loss, p_self − p_other per member)``. Cross-entropy averages over all ``4P``
        rows ``[self1; self2; other1; other2]`` with targets ``[y1; y2; y1; y2]``; the ranking loss is
        ``mean(max(0, p_other(y) − p_self(y) + ε))`` on softmax probabilities of the true class.
    """
    cross_entropy = F.cross_entropy(torch.cat([logits_self, logits_other]), torch.cat([targets, targets]))
    p_self = logits_self.softmax(dim=1).gather(1, targets[:, None]).squeeze(1)
    p_other = logits_other.softmax(dim=1).gather(1, targets[:, None]).squeeze(1)
    rank_loss = F.margin_ranking_loss(p_self, p_other, torch.ones_like(p_self), margin=margin)
    return cross_entropy + rank_weight * rank_loss, cross_entropy, rank_loss, (p_self - p_other).detach()


class APINet(ClassificationModule):
    """API-Net on any backbone: pair mining, attentive interaction and the two losses in training; ``fc(x)`` at test.

    Args:
        backbone: maps images to a feature map ``(B, D, h, w)`` and exposes ``out_channels`` (every backbone in
            ``zoo.backbones``; ``TimmBackbone("resnet101", pretrained=True)`` is the paper's).
        num_classes: classes of the dataset (checked against the datamodule).
        hidden: mutual-vector MLP width.
        dropout: dropout of the MLP and before the classifier (0.5 in the official code).
        margin, rank_weight: the ranking loss's ``ε`` and ``λ``.
        lr, momentum, weight_decay: both SGD optimisers (0.01, 0.9, 5e-4).
        backbone_lr: the backbone optimiser's learning rate (default ``lr``).
        freeze_epochs: epochs during which the backbone optimiser does not step (8 in the official code; use 0 for a
            backbone trained from scratch).

    Batches are ``(images, labels)`` with at least two images per class (``BalancedClassSampler``); a batch in
    which no pair can be formed falls back to plain cross-entropy on ``fc(x)``. ``predict`` returns
    ``{"probs", "preds"}``. A config's ``optimizer:``/``lr_scheduler:`` sections replace the built-in SGD + cosine;
    the backbone freeze applies to any optimiser that skips parameters without gradients (all of torch.optim).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        num_classes: int,
        hidden: int = 512,
        dropout: float = 0.5,
        margin: float = 0.05,
        rank_weight: float = 1.0,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        backbone_lr: float | None = None,
        freeze_epochs: int = 8,
    ) -> None:
        super().__init__(num_classes=num_classes)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        self.backbone = backbone
        dim = feature_channels(backbone)
        self.interaction = PairInteraction(dim, hidden, dropout)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        # Adaptive pooling + flatten: the official AvgPool2d(14) + squeeze() only works at 448 px and batch > 1.
        return F.adaptive_avg_pool2d(self.backbone(images), 1).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Test-time logits: backbone and classifier on single images."""
        return self.fc(self.features(images))

    def pair_forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training forward: features, mined pairs, attentive features, their logits and the losses."""
        x = self.features(images)
        first, second = mine_pairs(x, labels)
        out = self.interaction(x[first], x[second])
        logits_self = self.fc(self.dropout(torch.cat([out.self1, out.self2])))
        logits_other = self.fc(self.dropout(torch.cat([out.other1, out.other2])))
        targets = torch.cat([labels[first], labels[second]])
        loss, cross_entropy, rank_loss, margin = api_net_loss(
            logits_self, logits_other, targets, self.hparams.margin, self.hparams.rank_weight
        )
        return dict(features=x, first=first, second=second, gate1=out.gate1, gate2=out.gate2, loss=loss,
                    cross_entropy=cross_entropy, rank_loss=rank_loss, p_self_minus_other=margin)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        out = self.pair_forward(images, labels)
        loss = out["loss"]
        if len(out["first"]) == 0:  # no pair in this batch: plain cross-entropy keeps the step meaningful
            loss = F.cross_entropy(self.fc(self.dropout(out["features"])), labels)
        with torch.no_grad():
            self.train_acc(self.fc(out["features"]), labels)
        log = dict(on_step=True, on_epoch=True, batch_size=len(labels))
        self.log("train/loss", loss, prog_bar=True, **log)
        self.log("train/ce", out["cross_entropy"], **log)
        self.log("train/rank_loss", out["rank_loss"], **log)
        if len(out["first"]):
            self.log("train/p_self_minus_other", out["p_self_minus_other"].mean(), **log)
            self.log("train/gate_mean", torch.cat([out["gate1"], out["gate2"]]).mean().detach(), **log)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The official code does not step the backbone's optimiser in the first epochs: no update, no weight decay,
        # no momentum, while BN statistics and the schedule advance. SGD skips parameters whose grad is None, so
        # dropping the backbone's gradients here (after backward and unscaling, before the step) does exactly that.
        if self.current_epoch < self.hparams.freeze_epochs:
            for parameter in self.backbone.parameters():
                parameter.grad = None

    def configure_optimizers(self) -> Any:
        # One SGD with two groups is the official pair of SGD optimisers (SGD treats parameters independently).
        hp = self.hparams
        backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        head_params = [p for name, p in self.named_parameters() if not name.startswith("backbone.") and p.requires_grad]
        groups = [{"params": head_params, "lr": hp.lr, "name": "head"}]
        if backbone_params:
            groups.append({"params": backbone_params, "lr": hp.backbone_lr or hp.lr, "name": "backbone"})
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        # Cosine annealing stepped every iteration over the whole run (official: T_max = epochs × iterations).
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

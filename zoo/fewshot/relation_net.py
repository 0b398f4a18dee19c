"""Learning to Compare: Relation Network for Few-Shot Learning (Sung et al., CVPR 2018, arXiv:1711.06025).

Instead of a fixed distance, a relation module ``g_φ`` scores the concatenated feature maps of a class and a query,
``r_{k,j} = g_φ(C(f(x_k), f(x_j)))`` ∈ (0, 1) (Eq. 1), regressed with MSE onto 1 for the matching class and 0
otherwise (Eq. 2, "more a regression than a classification problem"). K-shot classes are the mean of the shots'
feature maps (CloserLook; the paper sums them, which only rescales). The embedding keeps a spatial map: RelationNet's
Conv-4 pools only in its first two blocks (``[64, 19, 19]`` at 84×84, ``[64, 5, 5]`` at 28×28). The relation module
is two conv blocks (BN with momentum 1, as in floodsung/LearningToCompare_FSL, so statistics follow the last batch)
and a two-layer MLP; original training clips gradients at 0.5 (``trainer.gradient_clip_val``).
``loss="softmax"`` is CloserLook's ``relationnet_softmax`` variant: cross-entropy on the unsquashed scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.fewshot.episodic import EpisodicModule
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["RelationModule", "RelationNet"]


class RelationModule(nn.Module):
    """``g_φ``: [conv3×3-64, BN, ReLU, max-pool 2] × 2 → FC(·, hidden) → ReLU → FC(hidden, 1).

    Small maps (< 10 px, e.g. Omniglot's 5×5 or a ResNet's 7×7) use padding 1 so the two poolings still fit.
    """

    def __init__(self, channels: int, size: int, width: int = 64, hidden: int = 8) -> None:
        super().__init__()
        padding = 1 if size < 10 else 0
        blocks: list[nn.Module] = []
        in_channels = 2 * channels
        for _ in range(2):
            blocks += [nn.Conv2d(in_channels, width, 3, padding=padding), nn.BatchNorm2d(width, momentum=1.0),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            in_channels = width
            size = (size + 2 * padding - 2) // 2
        if size < 1:
            raise ValueError("feature map too small for the relation module's two poolings")
        self.convs = nn.Sequential(*blocks)
        self.fc = nn.Sequential(nn.Linear(width * size * size, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(pairs).flatten(1)).squeeze(1)


class RelationNet(EpisodicModule):
    """Relation Network: a learned comparison of class and query feature maps.

    Args:
        backbone: must return a feature map ``(B, C, H, W)`` with ``H = W = feature_size``.
        feature_channels, feature_size: ``C`` and ``H`` of the backbone's map (Conv-4 without late pooling:
            64 and 19 at 84×84, 64 and 5 at 28×28).
        loss: ``mse`` (the paper: sigmoid scores regressed onto one-hot) or ``softmax`` (cross-entropy on the raw
            scores, CloserLook's ``relationnet_softmax``).
        lr: see ``EpisodicModule``.
    """

    def __init__(self, *, backbone: nn.Module, feature_channels: int = 64, feature_size: int = 19, loss: str = "mse",
                 lr: float = 1e-3) -> None:
        super().__init__(backbone=backbone, feature_dim=feature_channels * feature_size * feature_size, lr=lr)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        if loss not in ("mse", "softmax"):
            raise ValueError(f"loss must be 'mse' or 'softmax', got {loss!r}")
        self.loss_type = loss
        self.scores_are_logits = loss == "softmax"  # MSE: independent relation scores in (0, 1)
        self.map_shape = (feature_channels, feature_size, feature_size)
        self.relation = RelationModule(feature_channels, feature_size)

    def episode_logits(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Relation scores ``(N·Q, N)``: in (0, 1) for ``loss="mse"``, raw for ``"softmax"``."""
        support_features, query_features = self.embed_episode(support, query)
        classes = support_features.mean(dim=1).view(-1, *self.map_shape)  # (N, C, H, W)
        queries = query_features.view(-1, *self.map_shape)  # (M, C, H, W)
        m, n = len(queries), len(classes)
        pairs = torch.cat([classes.unsqueeze(0).expand(m, -1, -1, -1, -1),
                           queries.unsqueeze(1).expand(-1, n, -1, -1, -1)], dim=2)  # (M, N, 2C, H, W)
        scores = self.relation(pairs.flatten(0, 1)).view(m, n)
        return torch.sigmoid(scores) if self.loss_type == "mse" else scores

    def episode_loss(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.loss_type == "softmax":
            return F.cross_entropy(scores, targets)
        return F.mse_loss(scores, F.one_hot(targets, scores.shape[1]).to(scores.dtype))

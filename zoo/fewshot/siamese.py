"""Siamese Neural Networks for One-shot Image Recognition (Koch, Zemel & Salakhutdinov, ICML DL Workshop 2015).

Twin networks with shared weights embed two images; their similarity is
``p(x1, x2) = σ(Σ_j α_j |h1_j − h2_j| + b)`` (Sec. 3.1: a weighted L1 distance with learned ``α``), trained as a
verification task with binary cross-entropy on same/different pairs (Eq. 1; the paper's layer-wise L2 penalty is the
optimiser's ``weight_decay``). One-shot classification picks the support image of highest similarity (Sec. 4.3);
with K shots the class score is the mean similarity to its shots.

Pairs come from the training episodes: every query against every support image, which has ``1/N`` same-class pairs,
so the two kinds are weighted to count equally, the expectation of the paper's 50/50 pair sampling. The zoo uses the
few-shot backbones (Conv-4) instead of the paper's large network with a 4096-d sigmoid layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.fewshot.episodic import EpisodicModule, episode_accuracy, query_targets
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["WeightedL1Similarity", "SiameseNet"]


class WeightedL1Similarity(nn.Module):
    """Pairwise ``logit(p) = Σ_j α_j |a_j − b_j| + bias`` between every row of ``a (M, D)`` and ``b (S, D)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weighted_sum = nn.Linear(dim, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.weighted_sum((a.unsqueeze(1) - b.unsqueeze(0)).abs()).squeeze(-1)  # (M, S)


class SiameseNet(EpisodicModule):
    """Siamese network: verification training, one-shot classification by maximum similarity.

    Args:
        backbone, feature_dim, lr: see ``EpisodicModule``.
    """

    scores_are_logits = False  # mean pair similarities in (0, 1), one per class, not a distribution

    def __init__(self, *, backbone: nn.Module, feature_dim: int, lr: float = 1e-3) -> None:
        super().__init__(backbone=backbone, feature_dim=feature_dim, lr=lr)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        self.similarity = WeightedL1Similarity(feature_dim)

    def pair_logits(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Verification logits ``(N·Q, N, K)`` of every query against every support image."""
        support_features, query_features = self.embed_episode(support, query)
        n_way, k_shot, _ = support_features.shape
        return self.similarity(query_features, support_features.flatten(0, 1)).view(-1, n_way, k_shot)

    def episode_logits(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Mean similarity ``p`` to each class's shots, ``(N·Q, N)``."""
        return torch.sigmoid(self.pair_logits(support, query)).mean(dim=2)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        support, query, _ = batch
        logits = self.pair_logits(support, query)  # (M, N, K)
        n_way = support.shape[0]
        same = torch.eye(n_way, device=logits.device).repeat_interleave(query.shape[1], dim=0)  # (M, N)
        same = same.unsqueeze(2).expand_as(logits)
        # weight same- and different-class pairs 1/2 each in total: the paper samples them 50/50
        weight = torch.where(same.bool(), 0.5 / same.sum(), 0.5 / (1 - same).sum())
        loss = F.binary_cross_entropy_with_logits(logits, same, weight=weight, reduction="sum")
        targets = query_targets(n_way, query.shape[1], logits.device)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", episode_accuracy(torch.sigmoid(logits).mean(dim=2), targets), prog_bar=True)
        return loss

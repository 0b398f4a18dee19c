"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

Each class is represented by the mean of its embedded support images, ``c_k = 1/K Σ_i f(x_i)`` (Eq. 1), and a query
is classified by a softmax over negative **squared** Euclidean distances, ``p(y=k|x) ∝ exp(−‖f(x) − c_k‖²)`` (Eq. 2;
the paper argues for squared distance as a Bregman divergence, Sec. 2.3). Reference code: jakesnell/prototypical-networks;
the CloserLook protocol trains it 5-way. easyfsl's ``PrototypicalNetworks`` uses the unsquared distance
(``-cdist``): same argmax, different loss.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.fewshot.episodic import EpisodicModule
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["prototypes", "squared_euclidean_logits", "ProtoNet"]


def prototypes(support_features: torch.Tensor) -> torch.Tensor:
    """Class means ``(N, D)`` of support features ``(N, K, D)`` (Eq. 1)."""
    return support_features.mean(dim=1)


def squared_euclidean_logits(query_features: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``−‖q − c‖²`` for every query ``(M, D)`` and centre ``(N, D)`` → ``(M, N)`` (Eq. 2).

    Written as an explicit difference rather than ``cdist(...)**2``: cdist's matrix-multiply path loses precision on
    near-identical vectors, and this is the quantity the loss differentiates.
    """
    return -(query_features.unsqueeze(1) - centres.unsqueeze(0)).pow(2).sum(-1)


class ProtoNet(EpisodicModule):
    """Prototypical Networks: nearest class mean in a learned embedding, trained episodically with cross-entropy.

    Args:
        backbone, feature_dim, lr: see ``EpisodicModule``.
    """

    unequal_shots = True  # a prototype is a mean over however many shots its class has

    def __init__(self, *, backbone: nn.Module, feature_dim: int, lr: float = 1e-3) -> None:
        super().__init__(backbone=backbone, feature_dim=feature_dim, lr=lr)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled

    def episode_logits(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        support_features, query_features = self.embed_episode(support, query)
        return squared_euclidean_logits(query_features, prototypes(support_features))

    def support_set_logits(self, support: torch.Tensor, support_labels: torch.Tensor, n_way: int,
                           query: torch.Tensor) -> torch.Tensor:
        """``−‖f(x) − c_k‖²`` with ``c_k`` the mean of class ``k``'s shots, however many each class has (Eq. 1)."""
        features = self.embed(torch.cat([support, query]))
        support_features, query_features = features[: len(support)], features[len(support) :]
        sums = support_features.new_zeros(n_way, support_features.shape[1]).index_add_(0, support_labels,
                                                                                      support_features)
        counts = torch.bincount(support_labels, minlength=n_way).clamp(min=1).to(sums.dtype)
        return squared_euclidean_logits(query_features, sums / counts[:, None])

"""Matching Networks for One Shot Learning (Vinyals et al., NeurIPS 2016, arXiv:1606.04080).

A query is labelled by attention over the support set, ``P(ŷ|x̂, S) = Σ_i a(x̂, x_i) y_i`` (Eq. 1), with
``a = softmax_i(c(f(x̂, S), g(x_i, S)))`` and ``c`` the cosine similarity (Eq. 2). Full Context Embeddings (Sec. 2.1.2,
Appendix A) make both embeddings depend on the whole support set:

- ``g``: a bidirectional LSTM over the support sequence, ``g(x_i) = g'(x_i) + h→_i + h←_i`` (Appendix A.2);
- ``f``: an LSTM that reads the support set ``K`` times with attention (Appendix A.1):
  ``r = Σ_i softmax(h·g(x_i)) g(x_i)``, ``h, c = LSTM([f'(x̂), r], (h, c))``, ``h ← h + f'(x̂)``.

As in CloserLook (Chen et al. 2019, ``methods/matchingnet.py``), the read vector enters the LSTM as input next to
``f'(x̂)`` (the paper's hidden-state concatenation grows with every step, an inconsistency several ports note),
``K`` is the support size, and scores are ``100·ReLU(cos)`` (a fixed scale where the paper mentions a learnable one).
FCE is on by default and can be switched off (``fce=False``: plain cosine attention, order-independent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.fewshot.episodic import EpisodicModule
from zoo.checkpoint import drop_module_hyperparameters

__all__ = ["SupportEncoder", "AttentionQueryEncoder", "matching_probabilities", "MatchingNet"]


class SupportEncoder(nn.Module):
    """``g``: bidirectional LSTM over the support set with a skip connection (Appendix A.2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, num_layers=1, batch_first=True, bidirectional=True)

    def forward(self, support: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(support.unsqueeze(0))  # one sequence: the support set in episode order
        out = out.squeeze(0)
        dim = support.shape[1]
        return support + out[:, :dim] + out[:, dim:]


class AttentionQueryEncoder(nn.Module):
    """``f``: an LSTM cell that reads the encoded support set ``steps`` times with attention (Appendix A.1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(2 * dim, dim)

    def forward(self, query: torch.Tensor, support: torch.Tensor, steps: int) -> torch.Tensor:
        h, c = query, torch.zeros_like(query)
        for _ in range(steps):  # processing steps of the read-attention LSTM, not a loop over samples
            read = (h @ support.T).softmax(dim=1) @ support
            h, c = self.cell(torch.cat([query, read], dim=1), (h, c))
            h = h + query
        return h


def matching_probabilities(query: torch.Tensor, support: torch.Tensor, support_onehot: torch.Tensor,
                           scale: float = 100.0) -> torch.Tensor:
    """``P(ŷ|x̂, S) = softmax(scale·ReLU(cos(f, g))) · Y_S``: ``(M, N)`` class probabilities (Eq. 1–2)."""
    cosine = F.normalize(query, dim=1, eps=1e-5) @ F.normalize(support, dim=1, eps=1e-5).T
    attention = (scale * F.relu(cosine)).softmax(dim=1)
    return attention @ support_onehot


class MatchingNet(EpisodicModule):
    """Matching Networks with optional Full Context Embeddings; loss = NLL of the attention-weighted label mix.

    Args:
        backbone, feature_dim, lr: see ``EpisodicModule``.
        fce: use Full Context Embeddings (a BiLSTM over the support set and an attention LSTM for the query).
        scale: multiplier of the ReLU'd cosine inside the attention softmax (CloserLook: 100).
    """

    def __init__(self, *, backbone: nn.Module, feature_dim: int, fce: bool = True, scale: float = 100.0,
                 lr: float = 1e-3) -> None:
        super().__init__(backbone=backbone, feature_dim=feature_dim, lr=lr)
        self.save_hyperparameters()
        drop_module_hyperparameters(self)  # networks are kept as their CLI config, never pickled
        self.fce, self.scale = fce, scale
        self.support_encoder = SupportEncoder(feature_dim) if fce else None
        self.query_encoder = AttentionQueryEncoder(feature_dim) if fce else None

    def episode_logits(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``(N·Q, N)``."""
        support_features, query_features = self.embed_episode(support, query)
        n_way, k_shot, _ = support_features.shape
        support_flat = support_features.flatten(0, 1)  # class-major order: the BiLSTM's sequence
        if self.fce:
            support_flat = self.support_encoder(support_flat)
            query_features = self.query_encoder(query_features, support_flat, steps=len(support_flat))
        onehot = F.one_hot(torch.arange(n_way, device=support.device).repeat_interleave(k_shot), n_way)
        probabilities = matching_probabilities(query_features, support_flat, onehot.to(support_flat.dtype),
                                               self.scale)
        return torch.log(probabilities + 1e-6)

    def episode_loss(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(scores, targets)

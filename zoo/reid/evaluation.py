"""Re-ID evaluation: CMC and mAP under the Market-1501 protocol, vectorised over queries and gallery.

Protocol (Zheng et al. 2015; ``reid/evaluation_metrics/ranking.py`` in ECN/open-reid, torchreid's
``eval_market1501``): the gallery is ranked by distance to each query; gallery images of the query's identity
*taken by the query's camera* are removed from that query's ranking (they are too easy), junk images (pid ``-1``)
are dropped when the data is loaded, distractors (pid ``0``) stay as negatives. A query with no remaining match is
skipped. CMC counts the first match; AP is the mean over a query's matches of the precision at each match.

Two AP conventions are in use and differ by 0.5-1.0 mAP (fast-reid #18, open-reid #50): the *non-interpolated* mean
of precisions (torchreid, scikit-learn's ``average_precision_score``, the default here) and the official Market-1501
MATLAB / layumi code's trapezoid, which averages each match's precision with the precision just before it.

Everything is batched over query chunks: one distance block, one ``argsort`` and a few cumulative sums per chunk,
no Python loop over queries or gallery items.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["ReIDMetrics", "pairwise_squared_distance", "evaluate_ranking", "reid_metrics", "rank_lists"]


class ReIDMetrics(NamedTuple):
    """``cmc[k]`` = fraction of valid queries whose first match is at rank ≤ ``k + 1``; ``mean_ap``; ``num_valid``."""

    cmc: torch.Tensor
    mean_ap: float
    num_valid_queries: int

    def as_dict(self, ranks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
        out = {f"rank{k}": float(self.cmc[k - 1]) for k in ranks if k <= len(self.cmc)}
        out["mAP"] = self.mean_ap
        return out


def pairwise_squared_distance(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """``‖q − g‖²`` for every pair, in fp32 (``‖q‖² + ‖g‖² − 2 q·g``, clamped at 0 against rounding)."""
    q, g = query.float(), gallery.float()
    return (q.pow(2).sum(1, keepdim=True) + g.pow(2).sum(1)[None] - 2 * q @ g.T).clamp_min_(0)


def evaluate_ranking(
    distance: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    query_cams: torch.Tensor,
    gallery_cams: torch.Tensor,
    max_rank: int = 50,
    ap: str = "noninterp",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query results for one block of queries.

    Args:
        distance: ``(Q, G)``, smaller is closer.
        query_pids, query_cams: ``(Q,)``; gallery_pids, gallery_cams: ``(G,)``.
        max_rank: length of the CMC curve.
        ap: ``"noninterp"`` (mean precision at each match) or ``"trapezoid"`` (official Market-1501 code).

    Returns:
        ``(hits, ap, valid)``: ``hits (Q, max_rank)`` bool, True from the first match's rank on; ``ap (Q,)``;
        ``valid (Q,)`` whether the query has any match left after removing same-identity same-camera images.
    """
    if ap not in ("noninterp", "trapezoid"):
        raise ValueError(f"ap must be 'noninterp' or 'trapezoid', got {ap!r}")
    num_queries, device = len(query_pids), distance.device
    order = distance.argsort(dim=1, stable=True)
    # Only a query's own identity matters past the sort, and it is sparse (tens of images in a gallery of
    # thousands): gather the (query, rank) entries of that identity once and work on them, not on the Q × G matrix.
    row, col = (gallery_pids[order] == query_pids[:, None]).nonzero(as_tuple=True)  # row-major: ranks ascend
    removed = (gallery_cams[order[row, col]] == query_cams[row]).long()  # same identity and camera
    kept = 1 - removed
    counts = torch.bincount(row, minlength=num_queries)
    first_entry = (torch.cumsum(counts, 0) - counts)[row]

    def before_in_row(flags: torch.Tensor) -> torch.Tensor:
        """How many earlier entries of the same query have the flag."""
        exclusive = torch.cumsum(flags, 0) - flags
        return exclusive - exclusive[first_entry]

    # Rank among kept gallery items = rank − removed items before it; i-th match of its query (0-based).
    kept_rank = col - before_in_row(removed)
    match_ordinal = before_in_row(kept)
    is_match = kept.bool()
    row, kept_rank, match_ordinal = row[is_match], kept_rank[is_match], match_ordinal[is_match].double()
    num_matches = torch.bincount(row, minlength=num_queries)
    valid = num_matches > 0

    big = torch.iinfo(torch.int64).max
    first_match = torch.full((num_queries,), big, dtype=torch.int64, device=device)
    first_match.scatter_reduce_(0, row, kept_rank, reduce="amin")
    hits = first_match[:, None] <= torch.arange(max_rank, device=device)[None]

    precision = (match_ordinal + 1) / (kept_rank + 1)
    if ap == "trapezoid":
        # Official Market-1501: each match contributes (precision before it + precision at it) / 2; the precision
        # "before" a match at rank 0 is 1.
        before = torch.where(kept_rank == 0, torch.ones_like(precision), match_ordinal / kept_rank.clamp_min(1))
        precision = (precision + before) / 2
    ap_sum = torch.zeros(num_queries, dtype=torch.float64, device=device).index_add_(0, row, precision)
    ap_per_query = ap_sum / num_matches.clamp_min(1)
    return hits, ap_per_query, valid


def reid_metrics(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    query_cams: torch.Tensor,
    gallery_cams: torch.Tensor,
    normalize: bool = True,
    max_rank: int = 50,
    ap: str = "noninterp",
    chunk_elements: int = 1 << 24,
) -> ReIDMetrics:
    """CMC and mAP of a query set against a gallery, ranked by squared Euclidean distance.

    ``normalize`` L2-normalises the features first, as ECN's evaluator does (ranking by cosine similarity). Queries
    are processed in chunks of ``chunk_elements / G`` rows, which bounds the peak memory of the distance, sort and
    mask blocks (about 20 bytes per element) whatever the query count.
    """
    if normalize:
        query_features, gallery_features = F.normalize(query_features.float()), F.normalize(gallery_features.float())
    max_rank = min(max_rank, len(gallery_pids))
    rows = max(1, chunk_elements // max(1, len(gallery_pids)))
    hits_sum = torch.zeros(max_rank, dtype=torch.float64, device=query_features.device)
    ap_sum, num_valid = 0.0, 0
    for start in range(0, len(query_pids), rows):
        block = slice(start, start + rows)
        distance = pairwise_squared_distance(query_features[block], gallery_features)
        hits, ap_block, valid = evaluate_ranking(distance, query_pids[block], gallery_pids, query_cams[block],
                                                 gallery_cams, max_rank=max_rank, ap=ap)
        hits_sum += hits[valid].sum(0)
        ap_sum += float(ap_block[valid].double().sum())
        num_valid += int(valid.sum())
    if num_valid == 0:
        raise ValueError("no query has a match in the gallery from another camera: check the query/gallery split")
    return ReIDMetrics(cmc=(hits_sum / num_valid).float().cpu(), mean_ap=ap_sum / num_valid, num_valid_queries=num_valid)


def rank_lists(
    query_features: torch.Tensor,
    gallery_features: torch.Tensor,
    query_pids: torch.Tensor,
    gallery_pids: torch.Tensor,
    query_cams: torch.Tensor,
    gallery_cams: torch.Tensor,
    queries: torch.Tensor,
    top_k: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For the query indices ``queries``: the ``top_k`` nearest gallery indices under the protocol (same identity
    and camera removed) and whether each is a correct match, both ``(len(queries), top_k)``; for rank-list figures."""
    q, g = F.normalize(query_features[queries].float()), F.normalize(gallery_features.float())
    distance = pairwise_squared_distance(q, g)
    removed = (gallery_pids[None] == query_pids[queries, None]) & (gallery_cams[None] == query_cams[queries, None])
    distance = distance.masked_fill(removed, float("inf"))
    top = distance.topk(min(top_k, distance.shape[1]), dim=1, largest=False).indices
    return top, gallery_pids[top] == query_pids[queries, None]

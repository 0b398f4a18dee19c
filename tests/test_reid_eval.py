"""CMC / mAP under the Market-1501 protocol: a hand-made ranking and a brute-force reference on random data."""

import numpy as np
import pytest
import torch

from zoo.reid.evaluation import evaluate_ranking, pairwise_squared_distance, reid_metrics


def _hand_case():
    # Query: pid 1, camera 0. Gallery sorted by distance: pid1/cam0 (same camera: removed), pid 2, pid1/cam1, pid 0
    # (distractor), pid1/cam2.
    distance = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    gallery_pids, gallery_cams = torch.tensor([1, 2, 1, 0, 1]), torch.tensor([0, 1, 1, 2, 2])
    return distance, torch.tensor([1]), gallery_pids, torch.tensor([0]), gallery_cams


def test_hand_made_ranking_excludes_same_camera_match():
    distance, qp, gp, qc, gc = _hand_case()
    hits, ap, valid = evaluate_ranking(distance, qp, gp, qc, gc, max_rank=4)
    # After removing the same-camera match the first match is at rank 2: R1 = 0, R2 = 1.
    assert hits.tolist() == [[False, True, True, True]]
    # Matches at kept ranks 2 and 4: precisions 1/2 and 2/4, non-interpolated AP 0.5.
    assert valid.tolist() == [True] and ap.item() == pytest.approx(0.5)
    # Official Market trapezoid: ((0 + 1/2)/2 + (1/3 + 2/4)/2) / 2 = 1/3.
    _, ap_trap, _ = evaluate_ranking(distance, qp, gp, qc, gc, max_rank=4, ap="trapezoid")
    assert ap_trap.item() == pytest.approx(1 / 3)


def test_query_without_cross_camera_match_is_skipped():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Query 0 (pid 5, cam 0) only has a same-camera match: skipped. Query 1 (pid 6, cam 1) matches at rank 1.
    metrics = reid_metrics(query, gallery, torch.tensor([5, 6]), torch.tensor([5, 6, 7]), torch.tensor([0, 1]),
                           torch.tensor([0, 0, 2]))
    assert metrics.num_valid_queries == 1
    assert metrics.cmc[0].item() == 1.0 and metrics.mean_ap == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no query"):
        reid_metrics(query[:1], gallery, torch.tensor([5]), torch.tensor([5, 6, 7]), torch.tensor([0]),
                     torch.tensor([0, 0, 2]))


def _brute_force(distance, qp, gp, qc, gc, max_rank):
    """One query at a time, as torchreid's eval_market1501 / the Market MATLAB code do."""
    cmc, aps, trap = np.zeros(max_rank), [], []
    for i in range(len(qp)):
        order = np.argsort(distance[i], kind="stable")
        keep = ~((gp[order] == qp[i]) & (gc[order] == qc[i]))
        matches = (gp[order] == qp[i])[keep]
        if not matches.any():
            continue
        first = np.flatnonzero(matches)[0]
        if first < max_rank:
            cmc[first:] += 1
        rows = np.flatnonzero(matches)
        aps.append(np.mean([(j + 1) / (r + 1) for j, r in enumerate(rows)]))
        trap.append(sum(((j / r if r else 1.0) + (j + 1) / (r + 1)) / 2 for j, r in enumerate(rows)) / len(rows))
    return cmc / len(aps), float(np.mean(aps)), float(np.mean(trap)), len(aps)


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_brute_force_reference_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    q_feat, g_feat = torch.randn(37, 16, generator=g), torch.randn(211, 16, generator=g)
    qp, gp = torch.randint(0, 12, (37,), generator=g), torch.randint(0, 12, (211,), generator=g)
    qc, gc = torch.randint(0, 4, (37,), generator=g), torch.randint(0, 4, (211,), generator=g)
    # Chunks of 3 queries exercise the blocking.
    metrics = reid_metrics(q_feat, g_feat, qp, gp, qc, gc, max_rank=20, chunk_elements=3 * 211)
    trap = reid_metrics(q_feat, g_feat, qp, gp, qc, gc, max_rank=20, ap="trapezoid")
    qn, gn = torch.nn.functional.normalize(q_feat), torch.nn.functional.normalize(g_feat)
    distance = torch.cdist(qn.double(), gn.double()).pow(2).numpy()
    cmc, m_ap, m_trap, n = _brute_force(distance, qp.numpy(), gp.numpy(), qc.numpy(), gc.numpy(), 20)
    assert metrics.num_valid_queries == n
    np.testing.assert_allclose(metrics.cmc.numpy(), cmc, atol=1e-6)
    assert metrics.mean_ap == pytest.approx(m_ap, abs=1e-6)
    assert trap.mean_ap == pytest.approx(m_trap, abs=1e-6)
    assert trap.mean_ap != pytest.approx(metrics.mean_ap, abs=1e-4)


def test_squared_distance_and_normalisation():
    a, b = torch.randn(5, 7), torch.randn(9, 7)
    torch.testing.assert_close(pairwise_squared_distance(a, b), torch.cdist(a, b).pow(2), atol=1e-4, rtol=1e-4)
    # Scaling a feature does not change its ranking when features are normalised, but does without.
    gp, gc = torch.arange(9), torch.ones(9, dtype=torch.long)
    qp, qc = torch.arange(5), torch.zeros(5, dtype=torch.long)
    g_scaled = b * torch.linspace(0.1, 10, 9)[:, None]
    assert reid_metrics(a, b, qp, gp, qc, gc).mean_ap == pytest.approx(reid_metrics(a, g_scaled, qp, gp, qc, gc).mean_ap)

"""Re-ID costs, measured in one run: ECN's exemplar memory and the CMC/mAP evaluation, each beside a plain-NumPy
reference of the same computation.

1. **Exemplar memory step** (ms per step and peak extra memory) for ``--slots`` (default 12,936 / 50,000 /
   100,000) slots × ``--dim`` 2048 and a target batch of ``--batch`` 128:
   * loss: memory logits ``f·Kᵀ/β``, ECN's neighbourhood targets (top-6 + own slot) and the weighted
     log-likelihood, forward and backward to the features (``zoo.reid.ecn.ExemplarMemory`` / ``invariance_loss``);
   * update: ``K[i] ← normalise(α K[i] + (1 − α) f)`` for the batch's slots (``ExemplarMemory.update``).
   The NumPy reference does the same arithmetic the way the official code does the update (a Python loop over the
   batch, one row at a time) and the loss with NumPy matmul / sort. The loss grows with the slot count (one row
   of logits per slot, unavoidable); the update must not (it touches only the batch's rows).
2. **Evaluation** of ``--queries`` 3,368 × ``--gallery`` 19,732 random ``--eval-dim``-d features (Market-1501's
   sizes, 751 identities, 6 cameras): ``zoo.reid.evaluation.reid_metrics`` (query chunks, one sort per chunk, no
   loop over queries) against torchreid's ``eval_market1501`` approach (full NumPy distance matrix and ``argsort``,
   then a Python loop over queries), re-implemented here; both must give the same CMC and mAP.

Peak memory is the growth of the process's resident set during the measured call (``/proc/self/clear_refs``
resets the high-water mark first), so it counts NumPy and torch allocations alike. Linux only.

    python bench/reid.py [--slots 12936 50000 100000] [--dim 2048] [--batch 128] [--queries 3368]
                         [--gallery 19732] [--eval-dim 2048] [--steps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo.reid.ecn import ExemplarMemory, invariance_loss  # noqa: E402
from zoo.reid.evaluation import reid_metrics  # noqa: E402


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """(median ms per call, peak extra MiB during the calls, last result)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times)), (_rss_kib("VmHWM") - before) / 1024, result


# ---- 1. exemplar memory -----------------------------------------------------------------------------------------

def zoo_memory_step(memory: ExemplarMemory, features: torch.Tensor, indices: torch.Tensor, k: int) -> float:
    f = features.clone().requires_grad_(True)
    loss = invariance_loss(memory(f) / 0.05, indices, k)
    loss.backward()
    memory.update(f.detach(), indices, alpha=0.3)
    return loss.item()


def numpy_memory_step(memory: np.ndarray, features: np.ndarray, indices: np.ndarray, k: int) -> float:
    logits = features @ memory.T / 0.05
    top = np.argpartition(-logits, k, axis=1)[:, :k]
    targets = np.zeros_like(logits)
    np.put_along_axis(targets, top, 1.0 / k, axis=1)
    targets[np.arange(len(indices)), indices] = 1.0
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    loss = -(targets * log_p).sum(1).mean()
    grad_logits = (np.exp(log_p) * targets.sum(1, keepdims=True) - targets) / len(indices) / 0.05
    _ = grad_logits @ memory  # gradient to the features, through the old memory
    for x, y in zip(features, indices):  # the official update: one row at a time
        memory[y] = 0.3 * memory[y] + 0.7 * x
        memory[y] /= np.linalg.norm(memory[y])
    return float(loss)


def bench_memory(slot_counts: list[int], dim: int, batch: int, steps: int) -> None:
    print(f"\n1. Exemplar memory, {dim}-d, batch {batch}, k = 6 (ms per step; peak extra MiB)")
    print(f"{'slots':>8} | {'zoo loss+bwd':>12} {'zoo update':>10} {'zoo MiB':>8} | {'numpy step':>10} "
          f"{'numpy update':>12} {'numpy MiB':>9} | {'numpy/zoo':>9}")
    g = torch.Generator().manual_seed(0)
    for n in slot_counts:
        memory = ExemplarMemory(n, dim)
        memory.slots.copy_(F.normalize(torch.randn(n, dim, generator=g)))
        features = F.normalize(torch.randn(batch, dim, generator=g))
        indices = torch.randperm(n, generator=g)[:batch]
        np_memory = memory.slots.numpy().copy()
        np_features, np_indices = features.numpy(), indices.numpy()
        # Same arithmetic: the first step's losses and updated memories agree before anything is timed.
        check = ExemplarMemory(n, dim)
        check.slots.copy_(memory.slots)
        zoo_loss = zoo_memory_step(check, features, indices, 6)
        np_loss = numpy_memory_step(np_memory, np_features, np_indices, 6)
        assert abs(zoo_loss - np_loss) < 1e-3 * abs(np_loss), (zoo_loss, np_loss)
        assert np.allclose(check.slots.numpy(), np_memory, atol=1e-5)
        del check
        zoo_step_ms, zoo_mib, _ = measure(lambda: zoo_memory_step(memory, features, indices, 6), steps)
        update_ms, _, _ = measure(lambda: memory.update(features, indices, 0.3), steps)
        np_step_ms, np_mib, _ = measure(lambda: numpy_memory_step(np_memory, np_features, np_indices, 6), steps)

        def np_update() -> None:
            for x, y in zip(np_features, np_indices):
                np_memory[y] = 0.3 * np_memory[y] + 0.7 * x
                np_memory[y] /= np.linalg.norm(np_memory[y])

        np_update_ms, _, _ = measure(np_update, steps)
        print(f"{n:>8} | {zoo_step_ms:>12.1f} {update_ms:>10.2f} {zoo_mib:>8.0f} | {np_step_ms:>10.1f} "
              f"{np_update_ms:>12.2f} {np_mib:>9.0f} | {np_step_ms / zoo_step_ms:>9.2f}")
        del memory, np_memory


# ---- 2. evaluation ----------------------------------------------------------------------------------------------

def torchreid_style_eval(distmat: np.ndarray, q_pids, g_pids, q_cams, g_cams, max_rank: int = 50):
    """torchreid ``eval_market1501``: full argsort, then a Python loop over queries (for timing and checking)."""
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    all_cmc, all_ap = [], []
    for q in range(len(q_pids)):
        order = indices[q]
        keep = np.invert((g_pids[order] == q_pids[q]) & (g_cams[order] == q_cams[q]))
        raw = matches[q][keep]
        if not raw.any():
            continue
        cmc = raw.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        precision = raw.cumsum() / (np.arange(len(raw)) + 1.0)
        all_ap.append((precision * raw).sum() / raw.sum())
    return np.asarray(all_cmc, dtype=np.float32).mean(0), float(np.mean(all_ap))


def bench_eval(queries: int, gallery: int, dim: int) -> None:
    print(f"\n2. Evaluation, {queries} queries × {gallery} gallery, {dim}-d (s; peak extra MiB)")
    g = torch.Generator().manual_seed(1)
    qf, gf = torch.randn(queries, dim, generator=g), torch.randn(gallery, dim, generator=g)
    qp, gp = torch.randint(1, 752, (queries,), generator=g), torch.randint(0, 752, (gallery,), generator=g)
    qc, gc = torch.randint(0, 6, (queries,), generator=g), torch.randint(0, 6, (gallery,), generator=g)
    zoo_ms, zoo_mib, metrics = measure(lambda: reid_metrics(qf, gf, qp, gp, qc, gc), 1)

    def reference():
        qn, gn = F.normalize(qf).numpy(), F.normalize(gf).numpy()
        distmat = (qn ** 2).sum(1)[:, None] + (gn ** 2).sum(1)[None] - 2 * qn @ gn.T
        return torchreid_style_eval(distmat, qp.numpy(), gp.numpy(), qc.numpy(), gc.numpy())

    ref_ms, ref_mib, (ref_cmc, ref_map) = measure(reference, 1)
    print(f"{'':>24} {'time s':>8} {'peak MiB':>9} {'R1':>7} {'mAP':>7}")
    print(f"{'zoo reid_metrics':>24} {zoo_ms / 1e3:>8.2f} {zoo_mib:>9.0f} {metrics.cmc[0]:>7.4f} {metrics.mean_ap:>7.4f}")
    print(f"{'torchreid-style NumPy':>24} {ref_ms / 1e3:>8.2f} {ref_mib:>9.0f} {ref_cmc[0]:>7.4f} {ref_map:>7.4f}")
    print(f"NumPy / zoo: time {ref_ms / zoo_ms:.2f}×, peak memory {ref_mib / max(zoo_mib, 1):.2f}×")
    assert np.allclose(metrics.cmc.numpy(), ref_cmc, atol=1e-4) and abs(metrics.mean_ap - ref_map) < 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, nargs="+", default=[12936, 50000, 100000])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--queries", type=int, default=3368)
    parser.add_argument("--gallery", type=int, default=19732)
    parser.add_argument("--eval-dim", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} threads, CPU")
    bench_memory(args.slots, args.dim, args.batch, args.steps)
    bench_eval(args.queries, args.gallery, args.eval_dim)


if __name__ == "__main__":
    main()

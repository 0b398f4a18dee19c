"""The continual-learning table of docs/models/continual.md: every digits config × seeds, through the CLI.

    OMP_NUM_THREADS=1 python bench/continual_results.py --seeds 0 1 2 [--methods finetune joint lwf a_lwf ewc a_ewc]

Each run is ``zoo fit -c configs/continual/<method>_digits.yaml --seed_everything <seed>`` (no logger); the accuracy
matrices are read back from the run's ``last.ckpt`` (buffers ``acc_taw``/``acc_tag``). Printed per method: final
average accuracy (TAw / TAg), mean forgetting after the last task, the just-learned-task accuracy ``mean_t acc[t, t]``
(plasticity) and the old-task accuracy after the last task (stability), mean ± sd over seeds. Rows are appended to
``--out`` (JSON lines) as they finish, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoo.continual.incremental import average_accuracy, backward_transfer, forgetting  # noqa: E402


def summarise(acc_taw: torch.Tensor, acc_tag: torch.Tensor) -> dict[str, float]:
    row: dict[str, float] = {}
    for kind, matrix in (("taw", acc_taw.double()), ("tag", acc_tag.double())):
        last = len(matrix) - 1
        row[f"avg_acc_{kind}"] = float(average_accuracy(matrix)[-1])
        row[f"forgetting_{kind}"] = float(forgetting(matrix)[last, :last].mean())
        row[f"bwt_{kind}"] = float(backward_transfer(matrix))
        row[f"new_task_acc_{kind}"] = float(matrix.diagonal().mean())
        row[f"old_tasks_acc_{kind}"] = float(matrix[last, :last].mean())
    return row


def run(method: str, seed: int, extra: list[str]) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix=f"cl_{method}_{seed}_"))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "zoo", "fit", "-c", str(ROOT / f"configs/continual/{method}_digits.yaml"),
                           f"--seed_everything={seed}", "--trainer.logger=false", "--test_after_fit=false",
                           "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{method} seed {seed} failed:\n{done.stderr[-3000:]}")
    state = torch.load(root / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    row = summarise(state["state_dict"]["acc_taw"], state["state_dict"]["acc_tag"])
    row.update(method=method, seed=seed, seconds=round(time.time() - start, 1),
               acc_tag=state["state_dict"]["acc_tag"].tolist(), acc_taw=state["state_dict"]["acc_taw"].tolist())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["finetune", "joint", "lwf", "a_lwf", "ewc", "a_ewc"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="continual_results.jsonl")
    parser.add_argument("--summary-only", action="store_true", help="only print the table of the rows in --out")
    parser.add_argument("extra", nargs="*", help="CLI overrides passed to every run (after --)")
    args = parser.parse_args()
    rows = []
    if args.summary_only:
        rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
        args.methods = [m for m in args.methods if any(r["method"] == m for r in rows)]
    for method in args.methods if not args.summary_only else []:
        for seed in args.seeds:
            row = run(method, seed, args.extra)
            rows.append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{method:9s} seed {seed}: TAg {row['avg_acc_tag']:.3f} TAw {row['avg_acc_taw']:.3f} "
                  f"new-task TAg {row['new_task_acc_tag']:.3f} ({row['seconds']} s)", flush=True)
    keys = ["avg_acc_taw", "avg_acc_tag", "forgetting_taw", "forgetting_tag", "new_task_acc_tag", "old_tasks_acc_tag",
            "bwt_tag"]
    print("\n| method | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        cells = []
        for key in keys:
            values = [100 * r[key] for r in mine]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {sd:.1f}")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""The zero-shot table of docs/models/zsl.md: the digits ablation and the skewed-prior study, through the CLI.

    python bench/zsl_results.py --seeds 0 1 --jobs 2 [--study ablation prior] [--out zsl_results.jsonl]

* ``ablation``: for each unseen split (2, 4, 7), (0, 5, 9), (1, 3, 8) and seed: attribute regression (``zoo test``),
  inductive f-VAEGAN, f-VAEGAN with the unseen critic only, and full Bi-VAEGAN (``zoo fit``, last epoch's test
  scores); the official best-epoch-on-test figure (``val/zsl_acc_oracle_best``) is read from ``last.ckpt`` beside it.
* ``prior``: Bi-VAEGAN on a test_unseen subsampled to a 60 / 30 / 10 % class prior, drawing the unseen attributes
  by the uniform, the CPE-estimated and the true prior.

Each run is a subprocess with ``OMP_NUM_THREADS=1``; ``--jobs`` run at once. Rows are appended to ``--out`` (JSON lines)
as they finish, so an interrupted sweep keeps what it measured; ``--summary-only`` prints the tables of ``--out``.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ([2, 4, 7], [0, 5, 9], [1, 3, 8])
VARIANTS = {"attribute_regression": "attribute_regression_digits", "f_vaegan": "f_vaegan_digits",
            "f_vaegan_unseen_critic": "f_vaegan_transductive_digits", "bi_vaegan": "bi_vaegan_digits"}
PRIORS = ("uniform", "cpe", "known")
SKEW = [0.6, 0.3, 0.1]


def _results(stdout: str) -> dict[str, float]:
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith("test/"):
            out[parts[0][5:]] = float(parts[1])
    return out


def run(study: str, variant: str, split: list[int], seed: int, prior: str | None) -> dict:
    config = ROOT / "configs" / "zsl" / f"{VARIANTS[variant]}.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        command = "test" if variant == "attribute_regression" else "fit"
        args = [sys.executable, "-m", "zoo", command, "-c", str(config), f"--seed_everything={seed}",
                f"--data.init_args.unseen_classes={json.dumps(split)}", f"--data.init_args.root={tmp}/data",
                "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp}/run"]
        if command == "fit":
            args.append(f"--model.init_args.seed={seed}")
        if prior is not None:
            args += [f"--data.init_args.unseen_prior={json.dumps(SKEW)}", f"--model.init_args.prior={prior}"]
        start = time.time()
        result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
        row = {"study": study, "variant": variant, "split": split, "seed": seed, "prior": prior,
               "seconds": round(time.time() - start, 1), **_results(result.stdout)}
        last = list(Path(tmp, "run").rglob("last.ckpt"))
        if last:
            checkpoint = torch.load(last[0], map_location="cpu", weights_only=False)
            row.update({f"oracle_best_{k}": v for k, v in checkpoint.get("zsl_oracle_best", {}).items()})
            if "zsl_unseen_prior" in checkpoint:
                row["prior_used"] = [round(float(p), 4) for p in checkpoint["zsl_unseen_prior"]]
    return row


def _mean_sd(values: list[float]) -> str:
    values = [100 * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"


def summary(rows: list[dict]) -> None:
    ablation = [r for r in rows if r["study"] == "ablation"]
    if ablation:
        print("\nablation (digits, mean ± sd over splits × seeds; per split: mean over seeds)")
        print("| method | ZSL acc | GZSL U | GZSL S | GZSL H | ZSL per split (2,4,7) / (0,5,9) / (1,3,8) | oracle-best ZSL | runs |")
        print("|---|---|---|---|---|---|---|---|")
        for variant in VARIANTS:
            mine = [r for r in ablation if r["variant"] == variant]
            if not mine:
                continue
            per_split = " / ".join(f"{100 * statistics.mean(r['zsl_acc'] for r in mine if r['split'] == s):.1f}"
                                   for s in SPLITS if any(r["split"] == s for r in mine))
            oracle = [r["oracle_best_zsl_acc"] for r in mine if "oracle_best_zsl_acc" in r]
            cells = [_mean_sd([r[k] for r in mine]) for k in ("zsl_acc", "gzsl_U", "gzsl_S", "gzsl_H")]
            print(f"| {variant} | {' | '.join(cells)} | {per_split} | {_mean_sd(oracle) if oracle else '—'} | {len(mine)} |")
    prior = [r for r in rows if r["study"] == "prior"]
    if prior:
        print(f"\nskewed unseen prior {SKEW} (Bi-VAEGAN, mean ± sd over splits × seeds)")
        print("| prior drawing a_u | ZSL acc | GZSL H | runs |")
        print("|---|---|---|---|")
        for name in PRIORS:
            mine = [r for r in prior if r["prior"] == name]
            if mine:
                print(f"| {name} | {_mean_sd([r['zsl_acc'] for r in mine])} | {_mean_sd([r['gzsl_H'] for r in mine])} "
                      f"| {len(mine)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", nargs="+", default=["ablation", "prior"], choices=["ablation", "prior"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="zsl_results.jsonl")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.summary_only:
        jobs = []
        if "ablation" in args.study:
            jobs += [("ablation", v, s, seed, None) for s in SPLITS for seed in args.seeds for v in args.variants]
        if "prior" in args.study:
            jobs += [("prior", "bi_vaegan", s, seed, p) for s in SPLITS for seed in args.seeds for p in PRIORS]

        def one(job: tuple) -> None:
            row = run(*job)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, jobs))
    summary([json.loads(line) for line in out.read_text().splitlines() if line.strip()])


if __name__ == "__main__":
    main()

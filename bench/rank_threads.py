"""CPU threads per training rank: torch's default (every core in every rank) vs each rank's share.

The same short AST run (bench/ast_ablation.py's AST with all parts, SmolLM2-135M
from the SparseGPT 2:4 init, 2 ranks) twice: with OMP_NUM_THREADS = all cores
(what each rank took before the trainer set its share: 4 threads on 2 cores) and
with no OMP_NUM_THREADS (the trainer's share, cores / local ranks). Prints the
mean training tokens/s of each (the first step, warm-up, left out) and the ratio;
writes bench/results/rank_threads-<name>.json.

    python bench/rank_threads.py [--steps 6 --seq-len 256]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ast_ablation import ast_config, one_shot_init, train  # noqa: E402
from machine import machine_info  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--ds-config", default=str(HERE.parent / "ds_configs" / "zero3_cpu.json"))
    ap.add_argument("--work", default="runs/bench_ast_ablation", help="shares the ablation's shards and init")
    ap.add_argument("--name", default="vm")
    args = ap.parse_args()
    args.lr, args.eval_every, args.windows, args.checkpoint_every = 1e-4, 0, 1, 0
    work = Path(args.work).resolve()
    a, shards, pruned = one_shot_init(work, 32)
    cores = len(os.sched_getaffinity(0))
    figures = {}
    for label, threads in ((f"all {cores} cores per rank (torch's default)", cores), ("the trainer's share", None)):
        run = work / f"threads-{threads or 'share'}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        summary, log = train(run, ast_config(a["model"], pruned, shards, run, args), args.ranks, threads)
        rates = [r["tokens_per_s"] for r in log[1:]]
        figures[label] = {"omp_num_threads": threads, "cpu_threads_per_rank": summary["cpu_threads_per_rank"],
                          "tokens_per_s_mean": statistics.mean(rates), "tokens_per_s": rates}
        print(f"{label}: {summary['cpu_threads_per_rank']} threads per rank, "
              f"{statistics.mean(rates):.1f} tokens/s", flush=True)
    before, after = (f["tokens_per_s_mean"] for f in figures.values())
    print(f"share / all cores: {after / before:.2f}x tokens/s")
    out = HERE / "results" / f"rank_threads-{args.name}.json"
    out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct (fp32)", "method": "ast", "ranks": args.ranks,
                               "seq_len": args.seq_len, "steps": args.steps, "runs": figures, "ratio": after / before,
                               "machine": machine_info(), "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""AST vs baselines at an equal token budget: how much of the gap to dense each closes.

SmolLM2-135M pruned to 2:4 by the trainer's Wanda init (the same masks for every
method: same calibration seed), then each method trains for the same number of
tokens with `megatron-ast train` under torch.distributed.run (ZeRO-3; 2 ranks on
CPU by default). Validation perplexity every --eval-every steps on the same
windows; the dense model's perplexity on those windows is the target. Prints the
curves and writes bench/results/ast_recovery-<host>.json after each method.

    python bench/ast_recovery.py [--tokens 65536 --seq-len 256 --eval-every 8 --methods ast naive]
    python bench/ast_recovery.py --ds-config ds_configs/zero3_bf16.json --ranks 1 --tokens 4000000  # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine_info  # noqa: E402
from reference import reference_shards  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _curve(run: Path, before: dict) -> list[dict]:
    points = [{"step": 0, "tokens": 0, "ppl": before}]
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val" in rec:
            points.append({"step": rec["step"], "tokens": rec["tokens"], "ppl": rec["val"]})
    return points


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536, help="training tokens per method (rounded to whole steps)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=8, help="steps")
    ap.add_argument("--windows", type=int, default=16, help="validation windows of --seq-len per domain")
    ap.add_argument("--methods", nargs="+", default=["ast", "naive"], choices=["ast", "naive", "gmp"])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--ds-config", default=str(HERE.parent / "ds_configs" / "zero3_cpu.json"))
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--work", default="runs/bench_ast_recovery")
    ap.add_argument("--out", help="results JSON (default bench/results/ast_recovery-<host>.json)")
    args = ap.parse_args()

    from megatron_ast.eval.perplexity import perplexity, token_windows
    from megatron_ast.modeling import load_causal_lm

    work = Path(args.work)
    a, _ = reference_shards(work)
    ds = json.loads(Path(args.ds_config).read_text())
    per_step = args.seq_len * ds["train_micro_batch_size_per_gpu"] * ds.get("gradient_accumulation_steps", 1) * args.ranks
    steps = max(1, args.tokens // per_step)
    windows = token_windows([str(work / "shards" / "validation")], a["tokenizer"], args.seq_len, args.windows)
    dense = perplexity(load_causal_lm(a["model"]), windows, desc="dense")
    out_path = Path(args.out) if args.out else HERE / "results" / f"ast_recovery-{platform.node() or 'host'}.json"
    results = {"model": "SmolLM2-135M-Instruct (fp32)", "pattern": "2:4",
               "init": "wanda (32 calibration sequences); masks recomputed with wanda's running input norms",
               "seq_len": args.seq_len, "steps": steps, "tokens_per_step": per_step, "deepspeed": ds,
               "ranks": args.ranks, "eval": f"{args.windows} windows x {args.seq_len} tokens per domain, validation split",
               "dense_ppl": dense, "machine": machine_info(), "date": time.strftime("%Y-%m-%d"), "methods": {}}
    print(f"dense ppl {dense['all']['ppl']:.2f}; {steps} steps x {per_step} tokens per method", flush=True)
    for method in args.methods:
        run = work / method
        run.mkdir(parents=True, exist_ok=True)
        (run / "log.jsonl").unlink(missing_ok=True)
        cfg = {"model": a["model"], "init": "magnitude" if method == "gmp" else "wanda", "deepspeed": args.ds_config,
               "output_dir": str(run), "method": method,
               "data": {"train": [str(work / "shards" / "train")], "validation": [str(work / "shards" / "validation")],
                        "seq_len": args.seq_len, "seed": 1234},
               "steps": steps, "mask_interval": 4, "mask_score": "magnitude" if method == "gmp" else "wanda",
               "lr": {"peak": args.lr, "min": args.lr / 10, "warmup": max(1, steps // 20)},
               "srste": {"lam": 6e-5, "t_inc": max(1, steps // 2)}, "eval": {"every": args.eval_every, "windows": args.windows}}
        (run / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
               f"--master_port={_free_port()}", "-m", "megatron_ast.cli", "train", "--config", str(run / "run.yaml")]
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu" if args.ranks > 1 else ""),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.ranks)))}
        if not env["DS_ACCELERATOR"]:
            env.pop("DS_ACCELERATOR")
        t0 = time.perf_counter()
        with open(run / "train.log", "w") as logf:
            subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, check=True)
        summary = json.loads((run / "summary.json").read_text())
        curve = _curve(run, summary["ppl_before"])
        if curve[-1]["step"] != steps:
            curve.append({"step": steps, "tokens": summary["tokens"], "ppl": summary["ppl_after"]})
        before, after, target = summary["ppl_before"]["all"]["ppl"], summary["ppl_after"]["all"]["ppl"], dense["all"]["ppl"]
        results["methods"][method] = {"curve": curve, "tokens": summary["tokens"], "train_seconds": summary["seconds"],
                                      "wall_seconds": round(time.perf_counter() - t0, 1),
                                      "gap_closed": (before - after) / (before - target)}
        out_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{method:6s} " + "  ".join(f"{p['tokens']:>7d}:{p['ppl']['all']['ppl']:.2f}" for p in curve)
              + f"   gap to dense closed {100 * results['methods'][method]['gap_closed']:.1f}%", flush=True)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

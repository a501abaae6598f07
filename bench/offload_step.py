"""ZeRO-Offload's optimizer step on the CPU: SR-STE AdamW vs DeepSpeed's fused CPU Adam, same partition.

Under ZeRO-Offload the fp32 master and Adam's moments live on the CPU and the step runs there, over each
rank's whole flat partition. This times, in one process on one flat fp32 tensor of `--numel` elements
(a rank's partition: 8B parameters on 64 ranks is 125M), with half the elements masked weights and
half of those pruned:
  - DeepSpeed's CPU Adam (deepspeed.ops.adam.DeepSpeedCPUAdam: one fused AVX kernel; JIT-built on
    first use), plain AdamW;
  - SRSTEAdamW (training/sr_ste.py), AST's update with the SR-STE decay, as the trainer runs it;
  - SRSTEAdamW with lambda 0 and AdamW's second moment: the baselines' plain AdamW on the same path.
Prints ms per step (median of --steps after one warm-up) and the ratios to CPU Adam; writes
bench/results/offload_step-<name>.json.

    DS_ACCELERATOR=cpu python bench/offload_step.py [--numel 16777216 --steps 5 --name vm]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from machine import machine_info  # noqa: E402
from megatron_ast.training.sr_ste import SRSTEAdamW  # noqa: E402


def _time(opt, p: torch.Tensor, steps: int) -> float:
    times = []
    for i in range(steps + 1):
        p.grad = torch.randn_like(p) * 1e-3
        t = time.perf_counter()
        opt.step()
        if i:  # the first step allocates the moments (and builds CPU Adam's op)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--name", default="vm")
    a = ap.parse_args()
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    torch.manual_seed(0)
    init = torch.randn(a.numel)
    ind = torch.full((a.numel,), -1, dtype=torch.int8)
    ind[: a.numel // 2] = (torch.rand(a.numel // 2) < 0.5).to(torch.int8)  # masked half: 1 pruned, 0 kept
    hp = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    rows = {}
    p = torch.nn.Parameter(init.clone())
    rows["deepspeed_cpu_adam"] = _time(DeepSpeedCPUAdam([p], adamw_mode=True, **hp), p, a.steps)
    for label, lam, second in (("srste_adamw", 6e-5, "update"), ("srste_adamw_lambda0_adamw_v", 0.0, "gradient")):
        p = torch.nn.Parameter(init.clone())
        opt = SRSTEAdamW([p], srste_lambda=lam, srste_t_inc=10, second_moment=second, **hp)
        opt.set_pruned(p, ind)
        rows[label] = _time(opt, p, a.steps)
    base = rows["deepspeed_cpu_adam"]
    for k, v in rows.items():
        print(f"{k:30s} {v:9.1f} ms/step  {v / base:5.2f}x CPU Adam  ({a.numel / v / 1e3:.0f} M elements/s)")
    out = HERE / "results" / f"offload_step-{a.name}.json"
    result = {"numel": a.numel, "steps": a.steps, "threads": torch.get_num_threads(), "ms_per_step": rows,
              "ratio_to_cpu_adam": {k: v / base for k, v in rows.items()}, "machine": machine_info(),
              "command": " ".join(["python", *sys.argv])}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"-> {out}")


if __name__ == "__main__":
    main()

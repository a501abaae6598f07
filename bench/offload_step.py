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
bench/results/offload_step-<name>.json and the bar chart docs/offload_step-<name>.png (with --before, a
result of an earlier version beside it).

    DS_ACCELERATOR=cpu python bench/offload_step.py [--numel 16777216 --steps 5 --name vm --before FILE]
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
    ap.add_argument("--before", help="an earlier offload_step JSON to plot beside this one")
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
    _plot(result, json.loads(Path(a.before).read_text()) if a.before else None,
          HERE.parent / "docs" / f"offload_step-{a.name}.png")


def _plot(result: dict, before: dict | None, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("DeepSpeed CPU Adam\n(fused, AdamW)", result["ms_per_step"]["deepspeed_cpu_adam"]),
            ("SR-STE AdamW\n(fused, AST)", result["ms_per_step"]["srste_adamw"]),
            ("SR-STE AdamW, lambda 0\n(the baselines)", result["ms_per_step"]["srste_adamw_lambda0_adamw_v"])]
    if before is not None:
        rows.insert(1, ("SR-STE AdamW before\n(64K-element blocks)", before["ms_per_step"]["srste_adamw"]))
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    bars = ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color="#4c72b0")
    ax.bar_label(bars, fmt="%.1f ms")
    ax.set_xlabel(f"ms per optimizer step, {result['numel'] / 2**20:.0f}M-element CPU partition, "
                  f"{result['threads']} threads")
    ax.set_title("ZeRO-Offload's CPU optimizer step")
    ax.set_xlim(0, max(r[1] for r in rows) * 1.18)
    fig.tight_layout()
    png.parent.mkdir(exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"-> {png}")


if __name__ == "__main__":
    main()

"""N:M mask computation: vectorised (megatron_ast.sparsity.nm_mask) vs a per-column-group Python loop.

The loop is what a straightforward implementation does: for each group of M
input columns, top-k that slice and scatter (timed). Both run on the same score, in the
same process, on every device present; our mask must equal the loop's with ties
sent to the lower index (a stable-sort loop, checked, not timed).

    python bench/masks.py [--rows 4096 --cols 11008 --pattern 2:4] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import machine_info  # noqa: E402

from megatron_ast.sparsity.masks import nm_mask  # noqa: E402


def loop_mask(score: torch.Tensor, n: int, m: int, stable: bool = False) -> torch.Tensor:
    mask = torch.zeros_like(score, dtype=torch.bool)
    for j in range(0, score.shape[1], m):
        block = score[:, j : j + m]
        if stable:  # ties go to the lower index, the rule nm_mask follows
            idx = block.sort(dim=1, descending=True, stable=True).indices[:, :n]
        else:
            idx = block.topk(n, dim=1).indices
        mask[:, j : j + m].scatter_(1, idx, True)
    return mask


def timed(fn, device: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=11008)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--out", help="results JSON (default bench/results/masks-<device>.json)")
    args = ap.parse_args()
    n, m = map(int, args.pattern.split(":"))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {"shape": [args.rows, args.cols], "pattern": args.pattern, "machine": machine_info(),
               "date": time.strftime("%Y-%m-%d"), "devices": {}}
    for dev in devices:
        score = torch.randn(args.rows, args.cols, device=dev).abs()
        assert torch.equal(nm_mask(score, n, m), loop_mask(score, n, m, stable=True)), "masks differ"
        t_loop = timed(lambda: loop_mask(score, n, m), dev, 3)
        t_vec = timed(lambda: nm_mask(score, n, m), dev, 20)
        results["devices"][dev] = {"loop_s": t_loop, "vectorised_s": t_vec, "speedup": t_loop / t_vec}
        print(f"{dev:5s} {args.rows}x{args.cols} {args.pattern}: loop {t_loop * 1e3:9.2f} ms   "
              f"vectorised {t_vec * 1e3:8.3f} ms   speedup {t_loop / t_vec:8.1f}x   (identical masks)")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"masks-{devices[-1]}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

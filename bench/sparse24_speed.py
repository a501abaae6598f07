"""2:4 semi-structured sparse matmul speed vs dense on a GPU (bf16), same process, same weights.

For Llama-7B-like and SmolLM2-like Linear shapes, y = x W^T with W dense vs W
converted by torch.sparse.to_sparse_semi_structured (cuSPARSELt/CUTLASS 2:4
kernels). Prints time per product and the speedup, checks the outputs agree;
writes bench/results/sparse24_speed-<gpu>.json. Needs a CUDA GPU with sparse
tensor cores (Ampere or newer).

    python bench/sparse24_speed.py [--tokens 2048 8192]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import machine_info  # noqa: E402

from megatron_ast.sparsity.masks import nm_mask  # noqa: E402

SHAPES = {  # (out_features, in_features)
    "llama7b q/k/v/o": (4096, 4096), "llama7b gate/up": (11008, 4096), "llama7b down": (4096, 11008),
    "smollm2 gate/up": (1536, 576), "smollm2 down": (576, 1536),
}


def graphed(fn):
    """Capture `fn` in a CUDA graph: replay skips per-call host work (cuSPARSELt plan set-up)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def cuda_time(fn, repeat: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat / 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--out", help="results JSON (default bench/results/sparse24_speed-<gpu>.json)")
    ap.add_argument("--backend", choices=["cutlass", "cusparselt"], default="cusparselt")
    ap.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (no per-call host work)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: 2:4 speed needs sparse tensor cores (run this on a GPU machine)")
        return
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = args.backend == "cutlass"

    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        w = w * nm_mask(w.float().abs(), 2, 4)
        ws = to_sparse_semi_structured(w)
        for t in args.tokens:
            x = torch.randn(t, in_f, device="cuda", dtype=torch.bfloat16)
            dense = torch.nn.functional.linear(x, w)
            sparse = torch.nn.functional.linear(x, ws)
            err = float((dense.float() - sparse.float()).abs().max() / dense.float().abs().max())
            dense_fn, sparse_fn = (lambda: torch.nn.functional.linear(x, w)), (lambda: torch.nn.functional.linear(x, ws))
            if args.cuda_graph:
                dense_fn, sparse_fn = graphed(dense_fn), graphed(sparse_fn)
            td, ts = cuda_time(dense_fn), cuda_time(sparse_fn)
            rows.append({"backend": args.backend, "cuda_graph": args.cuda_graph, "shape": name, "out": out_f, "in": in_f, "tokens": t, "dense_ms": td * 1e3,
                         "sparse_ms": ts * 1e3, "speedup": td / ts, "max_rel_err": err})
            print(f"{name:18s} {out_f:6d}x{in_f:<6d} tokens {t:5d}: dense {td * 1e3:7.3f} ms  2:4 {ts * 1e3:7.3f} ms  "
                  f"speedup {td / ts:5.2f}x  (max rel err {err:.1e})")
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"sparse24_speed-{gpu}.json"
    out.write_text(json.dumps({"rows": rows, "dtype": "bfloat16", "machine": machine_info(),
                               "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""2:4 semi-structured sparse speed vs dense on a GPU (bf16), same process, same weights.

1. Linear shapes (Llama-7B-like and SmolLM2's): y = x W^T with W dense vs W
   converted by torch.sparse.to_sparse_semi_structured (cuSPARSELt/CUTLASS 2:4
   kernels), for 1..4096 tokens.
2. A whole causal LM (default: the reference SmolLM2-135M) with 2:4 magnitude
   masks, dense vs every decoder Linear's weight converted: prefill of t tokens,
   and decode of one token over a KV cache of t.
Prints times and speedups, checks the outputs agree; writes
bench/results/sparse_speed-<gpu>.json. Needs a CUDA GPU with sparse tensor
cores (Ampere or newer); without one it says so and exits 0.

    python bench/sparse_speed.py [--tokens 1 16 128 1024 4096] [--model DIR]
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


def _whole_forward(model_dir: str | None, tokens: list[int], cuda_graph: bool) -> list[dict]:
    """A causal LM (batch 1) with dense 2:4-masked weights vs semi-structured ones: prefill of `t` tokens, and
    decode of one token over a KV cache of `t` (each timed call appends one entry to HF's DynamicCache, so
    decode runs eager: a growing cache is nothing a CUDA graph can replay)."""
    from torch.sparse import to_sparse_semi_structured

    from megatron_ast.modeling import load_causal_lm
    from megatron_ast.sparsity.sparse_weights import sparse_weights as decoder_sparse_weights

    if model_dir is None:
        from megatron_ast.assets import ensure_assets

        model_dir = ensure_assets()["model"]
    model = load_causal_lm(model_dir).to("cuda", torch.bfloat16).eval()
    linears = [model.get_submodule(w.module) for w in decoder_sparse_weights(model) if w.is_linear]
    with torch.no_grad():
        for m in linears:
            m.weight.mul_(nm_mask(m.weight.float().abs(), 2, 4))
    dense_weights = [m.weight for m in linears]
    sparse_weights = [torch.nn.Parameter(to_sparse_semi_structured(w), requires_grad=False) for w in dense_weights]

    def use(weights) -> None:
        for m, w in zip(linears, weights):
            m.weight = w

    rows = []
    for t in tokens:
        x = torch.randint(0, model.config.vocab_size, (1, t + 1), device="cuda")
        for phase in ("prefill", "decode"):
            times, outs = {}, {}
            for kind, weights in (("dense", dense_weights), ("sparse", sparse_weights)):
                use(weights)
                with torch.no_grad():
                    if phase == "prefill":
                        fn = lambda: model(input_ids=x[:, :t]).logits  # noqa: E731
                        outs[kind] = fn().float()
                        times[kind] = cuda_time(graphed(fn) if cuda_graph else fn, repeat=20)
                    else:
                        cache = model(input_ids=x[:, :t], use_cache=True).past_key_values
                        fn = lambda: model(input_ids=x[:, t:], past_key_values=cache, use_cache=True).logits  # noqa: E731
                        outs[kind] = fn().float()
                        times[kind] = cuda_time(fn, repeat=20)
            use(dense_weights)
            ref, got = outs["dense"], outs["sparse"]
            err = float((got - ref).abs().max() / ref.abs().max())
            td, ts = times["dense"], times["sparse"]
            graph = cuda_graph and phase == "prefill"
            rows.append({"model": str(model_dir), "phase": phase, "tokens": t, "cuda_graph": graph,
                         "dense_ms": td * 1e3, "sparse_ms": ts * 1e3, "speedup": td / ts, "max_rel_err": err})
            print(f"{phase:7s} {Path(model_dir).name} {'(graph) ' if graph else ''}tokens {t:5d}: dense {td * 1e3:8.3f} ms"
                  f"  2:4 {ts * 1e3:8.3f} ms  speedup {td / ts:5.2f}x  (max rel err {err:.1e})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 4096])
    ap.add_argument("--model", help="HF model dir for the whole-forward timing (default: the reference SmolLM2-135M)")
    ap.add_argument("--out", help="results JSON (default bench/results/sparse_speed-<gpu>.json)")
    ap.add_argument("--backend", choices=["cutlass", "cusparselt"], default="cusparselt")
    ap.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (no per-call host work)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: 2:4 speed needs sparse tensor cores (run this on a GPU machine); nothing measured")
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
    forward = _whole_forward(args.model, [t for t in args.tokens if t >= 16], args.cuda_graph)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"sparse_speed-{gpu}.json"
    out.write_text(json.dumps({"rows": rows, "forward": forward, "dtype": "bfloat16", "machine": machine_info(),
                               "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""What a trained SLoRB branch adds: the main job's exported AST model with its branch scaled, and its size.

For a run dir of `megatron-ast quickstart` (its `ast-2of4-hf` export with `slorb_adapter/`, its one-shot
init `pruned-sparsegpt-2of4` and its validation shards):
- validation perplexity with S scaled by each --alpha (0 = the 2:4 base alone, 1 = as trained): a branch
  that learned something useful is best near 1 or above, one that is noise is best at 0;
- per masked Linear, on validation inputs: ||S P x|| and ||(W - W_init) x|| against ||W x||, and the
  median |S| against the median change of the kept weights.
Writes bench/results/slorb_branch-<name>.json.

    python bench/slorb_branch.py [--run runs/quickstart] [--alpha 0 0.5 1 1.5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from machine import write_result  # noqa: E402


def main() -> None:
    import torch

    from megatron_ast.assets import ensure_assets
    from megatron_ast.eval.perplexity import perplexity, token_windows
    from megatron_ast.modeling import WeightReader, load_causal_lm
    from megatron_ast.sparsity.sparse_linear import sparse_linears

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/quickstart")
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    ap.add_argument("--windows", type=int, default=32, help="validation windows of 512 tokens per domain")
    ap.add_argument("--name", default="vm")
    args = ap.parse_args()
    run = Path(args.run)
    windows = token_windows([str(run / "shards" / "validation")], ensure_assets()["tokenizer"], 512, args.windows)
    model = load_causal_lm(run / "ast-2of4-hf").eval()
    linears = {n: m for n, m in sparse_linears(model).items() if m.slorb is not None}
    if not linears:
        sys.exit(f"{run / 'ast-2of4-hf'} has no SLoRB branch (no slorb_adapter/)")
    trained = {n: m.slorb.S.detach().clone() for n, m in linears.items()}
    ppl = {}
    for alpha in args.alpha:
        with torch.no_grad():
            for n, m in linears.items():
                m.slorb.S.copy_(trained[n] * alpha)
        ppl[alpha] = perplexity(model, windows, desc=f"S x {alpha}")["all"]["ppl"]
        print(f"S x {alpha}: ppl {ppl[alpha]:.3f}", flush=True)
    with torch.no_grad():
        for n, m in linears.items():
            m.slorb.S.copy_(trained[n])

    init, rows = WeightReader(run / "pruned-sparsegpt-2of4"), {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach()
            dw = module.weight - init.get(f"{name}.weight").to(x.dtype)
            base = float((x @ module.weight.T).norm())
            rows[name] = {"branch_over_output": float(module.slorb(x).norm()) / base,
                          "weight_change_over_output": float((x @ dw.T).norm()) / base,
                          "median_abs_S": float(module.slorb.S.abs().median()),
                          "median_abs_kept_weight_change": float(dw[module.weight != 0].abs().median())}
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(windows["book"][:2]))
    for h in handles:
        h.remove()
    med = {k: statistics.median(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
    print(f"{len(rows)} Linears, medians: " + ", ".join(f"{k} {v:.3g}" for k, v in med.items()))
    write_result("slorb_branch", args.name, {"run": str(run), "ppl_by_alpha": ppl, "medians": med, "linears": rows})


if __name__ == "__main__":
    main()

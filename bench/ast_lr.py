"""Final perplexity against the learning rate, from bench/ast_ablation.py runs at several --lr.

A method's margin at one lr can be its optimizer's step size rather than the method: AST's Adam rule for
masked weights (v of the update, as the reference has it) steps further than AdamW at the same lr. This
collects bench/results/ast_ablation-<name>.json and every ast_ablation-<name>-lr*.json (same steps and
windows), prints final perplexity per method and lr with the gap closed, and plots it (ast_ablation-<name>-lr.png).
Another budget gets its own name (`--name vm-s48-lr5e-5` ... then `--name vm-s48`).

    python bench/ast_ablation.py --lr 3e-4 --name vm-lr3e-4 --work runs/abl_lr3e-4 --methods ast naive
    python bench/ast_lr.py [--name vm]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ast_ablation import finish_ppl_plot  # noqa: E402


def collect(results_dir: Path, name: str) -> dict:
    """{"dense": ppl, "init": ppl, "points": {method: {lr: (label, final ppl, gap closed)}}} over the runs of
    `name` and `name`-lr*, which must share steps, sequence length and windows."""
    points: dict[str, dict[float, tuple[str, float, float]]] = {}
    out: dict = {"points": points}
    key = None
    files = [results_dir / f"ast_ablation-{name}.json", *sorted(results_dir.glob(f"ast_ablation-{name}-lr*.json"))]
    for f in (f for f in files if f.is_file()):
        r = json.loads(f.read_text())
        if "settings" not in r:
            continue
        s = r["settings"]
        k = (s["steps"], s["seq_len"], s["windows"], s["tokens_per_step"])
        if key is not None and k != key:
            raise SystemExit(f"{f.name}: other steps/seq_len/windows than the first file; give --name per budget")
        key = k
        out.update(dense=r["dense_ppl"]["all"]["ppl"], init=r["init_ppl"]["all"]["ppl"], tokens=s["steps"] * k[3])
        for m, v in r["methods"].items():
            points.setdefault(m, {})[s["lr"]] = (v["label"], v["final_ppl"]["all"]["ppl"], v["gap_closed"])
    if not points:
        raise SystemExit(f"no bench/results/ast_ablation-{name}*.json; run bench/ast_ablation.py first")
    return out


def table(c: dict) -> str:
    lrs = sorted({lr for p in c["points"].values() for lr in p})
    rows = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for m, p in c["points"].items():
        if len(p) < 2:
            continue
        label = next(iter(p.values()))[0]
        rows.append(f"| {label} | " + " | ".join(f"{p[lr][1]:.2f} ({100 * p[lr][2]:.1f}%)" if lr in p else "-"
                                                for lr in lrs) + " |")
    return "\n".join(rows)


def plot(c: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, p in c["points"].items():
        if len(p) < 2:
            continue
        lrs = sorted(p)
        ax.plot(lrs, [p[lr][1] for lr in lrs], marker="o", label=next(iter(p.values()))[0])
    ax.set_xscale("log")
    lrs = sorted({lr for p in c["points"].values() for lr in p})
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    finish_ppl_plot(fig, ax, out_png, c["dense"], c["init"], "peak learning rate", "final validation perplexity",
                    f"2:4 recovery at {c['tokens']:,} tokens: final perplexity vs lr")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="vm", help="results name of the runs (bench/ast_ablation.py --name): NAME and NAME-lr*")
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args()
    c = collect(Path(args.results), args.name)
    out = Path(args.results) / f"ast_ablation-{args.name}-lr.png"
    plot(c, out)
    print(table(c))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

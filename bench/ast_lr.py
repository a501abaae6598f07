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
    """{"dense": ppl, "init": ppl, "points": {method: {lr: (label, final ppl, gap closed)}}, "curves": {method:
    {lr: [(tokens, ppl)]}}} over the methods of the `name`-lr* runs (at those lr and at `name`'s), which must
    share steps, sequence length and windows."""
    points: dict[str, dict[float, tuple[str, float, float]]] = {}
    curves: dict[str, dict[float, list[tuple[int, float]]]] = {}
    swept: set[str] = set()
    out: dict = {"points": points, "curves": curves}
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
            curves.setdefault(m, {})[s["lr"]] = [(p["tokens"], p["ppl"]["all"]["ppl"]) for p in v["curve"]]
            if f != files[0]:
                swept.add(m)
    for m in set(points) - swept:  # the ablations of `name` at its one lr
        del points[m], curves[m]
    if not points:
        raise SystemExit(f"no bench/results/ast_ablation-{name}-lr*.json; run bench/ast_ablation.py --name {name}-lrLR")
    return out


def table(c: dict) -> str:
    lrs = sorted({lr for p in c["points"].values() for lr in p})
    rows = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for m, p in c["points"].items():
        label = next(iter(p.values()))[0]
        rows.append(f"| {label} | " + " | ".join(f"{p[lr][1]:.2f} ({100 * p[lr][2]:.1f}%)" if lr in p else "-"
                                                for lr in lrs) + " |")
    return "\n".join(rows)


def best_lr(p: dict[float, tuple[str, float, float]]) -> float:
    """The lr of a method's lowest final perplexity."""
    return min(p, key=lambda lr: p[lr][1])


def plot(c: dict, out_png: Path, best_png: Path) -> None:
    """Final perplexity vs lr per method; and validation perplexity vs tokens of each method at its best lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, p in c["points"].items():
        lrs = sorted(p)
        ax.plot(lrs, [p[lr][1] for lr in lrs], marker="o", label=next(iter(p.values()))[0])
    ax.set_xscale("log")
    lrs = sorted({lr for p in c["points"].values() for lr in p})
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    finish_ppl_plot(fig, ax, out_png, c["dense"], c["init"], "peak learning rate", "final validation perplexity",
                    f"2:4 recovery at {c['tokens']:,} tokens: final perplexity vs lr")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, p in c["points"].items():
        lr = best_lr(p)
        curve = c["curves"][m][lr]
        ax.plot([t for t, _ in curve], [v for _, v in curve], marker="o", markersize=3,
                label=f"{p[lr][0]}, lr {lr:g}: {p[lr][1]:.2f}")
    finish_ppl_plot(fig, ax, best_png, c["dense"], c["init"], "training tokens", "validation perplexity",
                    "2:4 recovery, each method at its best lr measured")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="vm", help="results name of the runs (bench/ast_ablation.py --name): NAME and NAME-lr*")
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args()
    c = collect(Path(args.results), args.name)
    out = Path(args.results) / f"ast_ablation-{args.name}-lr.png"
    best = out.with_name(f"ast_ablation-{args.name}-best.png")
    plot(c, out, best)
    print(table(c))
    print(f"wrote {out}, {best}")


if __name__ == "__main__":
    main()

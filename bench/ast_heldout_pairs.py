"""Paired differences among runs that bench/ast_heldout.py scored under several names (other inits, machines).

ast_heldout.py compares the runs of one NLL cache, all from one one-shot start. A second cache whose runs start
from another init (SparseGPT rebuilt on another machine is not bit-identical) still holds NLLs of the same
windows when its model, seq_len and window counts agree and the dense model's per-window NLLs match (to 1e-4
relative: rounding of another CPU, not other text). Then the runs of all caches are paired on those windows:
run-to-run spread, and any run against any other, with 95% intervals from the same bootstrap. Per set of windows
(held out; out of domain where every cache has it): perplexity and the difference to the baseline. Gap closed is
left out, since the runs do not share one start. Writes bench/results/ast_heldout_pairs-<names>.json.

    python bench/ast_heldout_pairs.py --names vm-s96 vm-s96b --baseline runs/bench_s96b_lr1e-4/ast
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ast_heldout import bootstrap  # noqa: E402
from machine import machine_info  # noqa: E402


def merge(caches: dict[str, dict]) -> tuple[dict[str, dict], dict[str, str]]:
    """name -> NLL cache  =>  (key -> domain -> per-window NLL sums, key -> label). "dense" and "init" come from
    the first cache, each other cache's start is "init (NAME)", every run is its path."""
    (name0, c0), *_ = caches.items()
    nll = {"dense": c0["scored"]["dense"]["nll"], "init": c0["scored"]["init"]["nll"]}
    labels = {"dense": "dense (untrained)", "init": f"one-shot start of {name0}"}
    for name, c in caches.items():
        s, s0 = c["settings"], c0["settings"]
        if any(s[k] != s0[k] for k in ("model", "seq_len", "windows", "training_windows")):
            raise SystemExit(f"{name}: another model, seq_len or window count than {name0}; score both with the same "
                             f"bench/ast_heldout.py settings")
        dense, dense0 = c["scored"]["dense"]["nll"], c0["scored"]["dense"]["nll"]
        for d in set(dense) & set(dense0):
            if not np.allclose(dense[d], dense0[d], rtol=1e-4, atol=0):
                raise SystemExit(f"{name}: the dense model's NLLs on domain {d!r} differ from {name0}'s: other "
                                 f"windows (other validation or --ood text), not comparable")
        if name != name0:
            nll[f"init ({name})"] = c["scored"]["init"]["nll"]
            labels[f"init ({name})"] = f"one-shot start of {name}"
        for k, v in c["scored"].items():
            if k not in ("dense", "init") and k not in nll:
                nll[k], labels[k] = v["nll"], v["label"]
    return nll, labels


def pairs(nll: dict[str, dict], seq_len: int, baseline: str, boot: int, ood: set[str]) -> dict[str, dict]:
    """Per window set ("held out": the domains every model has, but `ood`; "out of domain": those of `ood` every
    model has): each model's perplexity and ln(ppl / ppl_baseline) with its interval."""
    shared = set.intersection(*(set(m) for m in nll.values()))
    sets = {"held out": sorted(shared - ood), "out of domain": sorted(shared & ood)}
    return {w: {k: {f: v[f] for f in ("ppl", "log_ratio", "log_ratio_ci")} for k, v in
                bootstrap({k: {d: m[d] for d in doms} for k, m in nll.items()}, seq_len, baseline, boot).items()}
            for w, doms in sets.items() if doms}


def table(stats: dict[str, dict], labels: dict[str, str], baseline: str) -> str:
    pct = lambda x: 100 * (math.exp(x) - 1)  # noqa: E731
    sets = list(stats)
    rows = ["| run | " + " | ".join(f"{w} ppl | vs baseline (95% CI)" for w in sets) + " |",
            "|---|" + "---|---|" * len(sets)]
    for k in stats[sets[0]]:
        cells = []
        for w in sets:
            s = stats[w][k]
            lo, hi = (pct(v) for v in s["log_ratio_ci"])
            cells += [f"{s['ppl']:.2f}", "-" if k == baseline else f"{pct(s['log_ratio']):+.1f}% ({lo:+.1f}%, {hi:+.1f}%)"]
        name = labels[k] + ("" if k in ("dense", "init") or k.startswith("init (") else f" ({os.path.relpath(k)})")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", nargs="+", required=True, help="bench/ast_heldout.py --name of each cache (2 or more)")
    ap.add_argument("--baseline", required=True, help="a run dir scored in one of the caches")
    ap.add_argument("--boot", type=int, default=4000, help="bootstrap resamples")
    args = ap.parse_args()
    from megatron_ast.fsutil import atomic_write_json

    files = {n: HERE / "results" / f"ast_heldout-{n}-nll.json" for n in args.names}
    if missing := [str(f) for f in files.values() if not f.is_file()]:
        raise SystemExit(f"no NLL cache {missing}: run bench/ast_heldout.py --name NAME first")
    nll, labels = merge({n: json.loads(f.read_text()) for n, f in files.items()})
    baseline = str(Path(args.baseline).resolve())
    if baseline not in nll:
        raise SystemExit(f"--baseline {args.baseline} is scored in none of {args.names}")
    first = json.loads(files[args.names[0]].read_text())["settings"]
    ood = {Path(f).parent.name for f in first.get("ood", [])}  # a --ood file's domain is its dir's name
    stats = pairs(nll, first["seq_len"], baseline, args.boot, ood)
    out = HERE / "results" / f"ast_heldout_pairs-{'+'.join(args.names)}.json"
    atomic_write_json(out, {"names": args.names, "baseline": baseline, "boot": args.boot, "labels": labels,
                            "stats": stats, "machine": machine_info(), "date": time.strftime("%Y-%m-%d")})
    print(table(stats, labels, baseline))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

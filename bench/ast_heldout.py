"""Finished recovery runs scored again on held-out validation windows, with paired bootstrap intervals.

bench/ast_ablation.py picks learning rates and reads margins of about 1% off 8 windows per domain, the same
windows every run evaluated during training. This takes the final checkpoint of each given run, exports it
(`megatron-ast export`: the 2:4 base plus its SLoRB adapter, as users measure it), and scores it on --windows
other windows per domain: evenly spaced over the validation stream, none of the training-time ones. The dense
model and the one-shot init are scored on the same windows. Per-window NLL sums are kept, so every comparison
is paired: a 95% interval of ln(ppl_run / ppl_baseline) and of the gap closed comes from resampling windows
(within each domain) with the same draw for all models. --targets adds the gap to the dense model trained on
the same tokens (bench/ast_ablation.py's dense_ce, dense_kd): what each loss reaches on this text without masks.
With --ood, text none of the runs trained on is scored too, with its own intervals: what the training text costs
the model elsewhere (`lm-eval-docs`: the task READMEs lm-eval ships, English prose about datasets, neither plays
nor Python). Resumable: per-window NLLs are kept in bench/results/ast_heldout-<name>-nll.json, and a run
scored there needs no run dir any more (its checkpoint may be deleted); writes
bench/results/ast_heldout-<name>.json and a PNG of each run's difference to the baseline with its interval.

    python bench/ast_heldout.py --runs runs/bench_ast_ablation/ast runs/bench_ast_ablation_lr3e-4/naive ...
        [--baseline runs/bench_ast_ablation_lr3e-4/naive --windows 64 --name vm --ood lm-eval-docs --targets RUN ...]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ast_ablation import METHODS  # noqa: E402
from machine import machine_info  # noqa: E402


def heldout_windows(validation: list[str], tokenizer_dir: str, seq_len: int, used: int, n: int) -> dict[str, np.ndarray]:
    """domain -> (n, seq_len) windows evenly spaced over the ones the training-time evaluation (`used` evenly
    spaced windows, as `token_windows` picks them) did not score."""
    from megatron_ast.data.streams import token_streams
    from megatron_ast.data.tokenizer import Tokenizer
    from megatron_ast.eval.perplexity import pick_windows

    out = {}
    for dom, stream in token_streams(validation, Tokenizer.load(tokenizer_dir), seq_len).items():
        rest = np.setdiff1d(np.arange(stream.num_windows), pick_windows(stream, seq_len, used))
        if len(rest) < n:
            raise SystemExit(f"domain {dom!r} has {len(rest)} held-out windows of {seq_len}, fewer than --windows {n}")
        take = rest[pick_windows(len(rest), 1, n)]
        out[dom] = np.stack([stream.window(int(k)) for k in take]).astype(np.int64)
    return out


def lm_eval_docs(out: Path) -> Path:
    """Every task README.md of the installed lm-eval, one document each, as jsonl (domain: out's dir name)."""
    import lm_eval

    from megatron_ast.fsutil import atomic_write_bytes

    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        readmes = sorted((Path(lm_eval.__file__).parent / "tasks").rglob("README.md"))
        atomic_write_bytes(out, "".join(json.dumps({"text": f.read_text(encoding="utf-8")}) + "\n"
                                        for f in readmes).encode())
    return out


def log_ppl(nll: dict[str, np.ndarray], idx: dict[str, np.ndarray], seq_len: int) -> np.ndarray:
    """ln(perplexity) over all domains for each row of resampled window indices (idx[dom]: (B, n))."""
    total = sum(nll[d][idx[d]].sum(axis=1) for d in idx)
    return total / sum(idx[d].shape[1] * (seq_len - 1) for d in idx)


def bootstrap(nll: dict[str, dict[str, list]], seq_len: int, baseline: str, boot: int, seed: int = 0) -> dict[str, dict]:
    """Per model of `nll` (name -> domain -> per-window NLL sums; "dense" and "init" among them): held-out
    perplexity, gap closed and ln(ppl / ppl_baseline), each with a 95% interval from one shared stratified
    resampling of the windows (every model sees the same draws, so the differences are paired)."""
    rng = np.random.default_rng(seed)
    arr = {k: {d: np.asarray(v) for d, v in m.items()} for k, m in nll.items()}
    sizes = {d: len(v) for d, v in arr["dense"].items()}
    point = {d: np.arange(n)[None] for d, n in sizes.items()}
    draws = {d: rng.integers(0, n, (boot, n)) for d, n in sizes.items()}
    lp = {k: log_ppl(v, point, seq_len)[0] for k, v in arr.items()}
    lp_boot = {k: log_ppl(v, draws, seq_len) for k, v in arr.items()}

    def ci(x: np.ndarray) -> list[float]:
        return [float(q) for q in np.quantile(x, [0.025, 0.975])]

    def gap(lp_init, lp_dense, lp_run):
        return (lp_init - lp_run) / (lp_init - lp_dense)

    return {k: {"ppl": math.exp(lp[k]), "gap_closed": float(gap(lp["init"], lp["dense"], lp[k])),
                "gap_closed_ci": ci(gap(lp_boot["init"], lp_boot["dense"], lp_boot[k])),
                "log_ratio": float(lp[k] - lp[baseline]), "log_ratio_ci": ci(lp_boot[k] - lp_boot[baseline])}
            for k in arr}


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def one_shot_start(cfgs: list[dict], cached: str | None = None) -> str:
    """The one-shot dir the first run that has one starts from: the gap's start (gmp and dense_* start dense).
    Without one among the run dirs given, the start of the runs scored before (`cached`)."""
    from megatron_ast.training.config import INIT_METRICS

    for c in cfgs:
        if c["init"] not in INIT_METRICS:
            return str(Path(c["init"]).resolve())
    if cached:
        return cached
    raise SystemExit("no --runs run starts from a one-shot pruned dir (`init:`): add one (ast, naive) as the gap's start")


def runs_to_score(runs: list[Path], scored: dict, nll_json: Path) -> list[Path]:
    """The runs not scored yet. A run scored before needs no dir: its 1.8 GB checkpoint may be gone (disk)."""
    lost = [str(r) for r in runs if str(r) not in scored and not (r / "run.yaml").is_file()]
    if lost:
        raise SystemExit(f"{lost}: no run.yaml and not scored before in {nll_json}; give run dirs of "
                         "bench/ast_ablation.py (it resumes a run that did not finish)")
    return [r for r in runs if str(r) not in scored]


def score(run: Path, windows: dict[str, np.ndarray]) -> dict:
    """The run's final checkpoint exported (base + SLoRB adapter) and scored per window."""
    from megatron_ast.eval.perplexity import window_nll
    from megatron_ast.export.hf import export_checkpoint
    from megatron_ast.modeling import load_causal_lm

    cfg = yaml.safe_load((run / "run.yaml").read_text())
    ckpt = run / "checkpoints" / f"step{cfg['steps']}"
    if not ckpt.is_dir():
        raise SystemExit(f"{run}: no final checkpoint {ckpt.name}; finish the run (bench/ast_ablation.py resumes it)")
    summary = json.loads((run / "summary.json").read_text())
    with tempfile.TemporaryDirectory(dir=run) as tmp:
        export_checkpoint(ckpt, Path(tmp) / "export")
        nll = window_nll(load_causal_lm(Path(tmp) / "export").to(device()), windows, desc=run.name)
    return {"run": str(run), "method": run.name, "label": METHODS[run.name][0] if run.name in METHODS else run.name,
            "lr": cfg["lr"]["peak"], "steps": cfg["steps"], "tokens": summary["tokens"],
            "nll": {d: v.tolist() for d, v in nll.items()}}


def plot(results: dict, out_png: Path) -> None:
    """Each run's held-out perplexity relative to the baseline, with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, results["stats"][k]) for k in results["order"] if k not in ("dense", "init")]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.5))
    for y, (k, s) in enumerate(rows):
        lo, hi = (100 * (math.exp(v) - 1) for v in s["log_ratio_ci"])
        mid = 100 * (math.exp(s["log_ratio"]) - 1)
        ax.errorbar(mid, y, xerr=[[mid - lo], [hi - mid]], fmt="o", capsize=3, color="C0" if k != results["baseline"] else "C3")
        ax.text(hi, y, f"  {s['ppl']:.2f}", va="center", fontsize=7)
        if "ood_stats" in results:
            o = results["ood_stats"][k]
            lo, hi = (100 * (math.exp(v) - 1) for v in o["log_ratio_ci"])
            mid = 100 * (math.exp(o["log_ratio"]) - 1)
            ax.errorbar(mid, y + 0.3, xerr=[[mid - lo], [hi - mid]], fmt="s", ms=4, capsize=2, color="C2",
                        label="out of domain" if y == 0 else None)
            ax.text(hi, y + 0.3, f"  {o['ppl']:.2f}", va="center", fontsize=6, color="C2")
    ax.set_yticks(range(len(rows)), [f"{results['runs'][k]['label']}, lr {results['runs'][k]['lr']:g}, "
                                     f"{results['runs'][k]['tokens']:,} tok" for k, _ in rows], fontsize=7)
    ax.axvline(0, color="gray", lw=1)
    ax.invert_yaxis()
    base = results["runs"][results["baseline"]]
    ax.set_xlabel("held-out perplexity vs the baseline (%), 95% paired bootstrap interval")
    ax.set_title(f"baseline (red): {base['label']}, lr {base['lr']:g}\n{results['settings']['windows']} held-out "
                 f"windows x {results['settings']['seq_len']} tokens per domain", fontsize=9)
    ax.margins(x=0.12)
    ax.grid(alpha=0.3, axis="x")
    if "ood_stats" in results:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    ood = "ood_stats" in results
    targets = results.get("target_gaps", {})
    head = ["run", "lr", "tokens", "held-out ppl", "gap closed (95% CI)", "vs baseline (95% CI)",
            *(f"gap closed to {results['runs'][t]['label']} (95% CI)" for t in targets),
            *(["out-of-domain ppl", "vs baseline (95% CI)"] if ood else [])]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def rel(s: dict) -> str:
        lo, hi = (100 * (math.exp(v) - 1) for v in s["log_ratio_ci"])
        return f"{100 * (math.exp(s['log_ratio']) - 1):+.1f}% ({lo:+.1f}%, {hi:+.1f}%)"

    def gap(s: dict) -> str:
        return f"{100 * s['gap_closed']:.1f}% ({100 * s['gap_closed_ci'][0]:.1f}, {100 * s['gap_closed_ci'][1]:.1f})"

    for k in results["order"]:
        s, r = results["stats"][k], results["runs"][k]
        lr = f"{r['lr']:g}" if r["lr"] is not None else "-"
        tokens = f"{r['tokens']:,}" if r["tokens"] is not None else "-"
        cells = [r["label"], lr, tokens, f"{s['ppl']:.2f}", gap(s), rel(s), *(gap(g[k]) for g in targets.values()),
                 *([f"{results['ood_stats'][k]['ppl']:.2f}", rel(results["ood_stats"][k])] if ood else [])]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", required=True, help="run dirs of bench/ast_ablation.py (megatron-ast train)")
    ap.add_argument("--baseline", help="the run the others are compared with (default: the first)")
    ap.add_argument("--windows", type=int, default=64, help="held-out windows per domain")
    ap.add_argument("--boot", type=int, default=4000, help="bootstrap resamples")
    ap.add_argument("--name", default="vm", help="results file suffix: the machine kind")
    ap.add_argument("--targets", nargs="+", default=[], help="runs among --runs (the dense model trained on the same "
                    "tokens: bench/ast_ablation.py's dense_ce, dense_kd) that also serve as the gap's dense end")
    ap.add_argument("--ood", nargs="+", default=[], help="jsonl/text files of text no run trained on (domain: the "
                    "file's dir name), or lm-eval-docs; scored on up to --windows windows per domain")
    args = ap.parse_args()

    from megatron_ast.eval.perplexity import token_windows, window_nll
    from megatron_ast.fsutil import atomic_write_bytes, atomic_write_json
    from megatron_ast.modeling import load_causal_lm

    runs = [Path(r).resolve() for r in args.runs]
    baseline = str(Path(args.baseline).resolve()) if args.baseline else str(runs[0])
    if baseline not in map(str, runs):
        raise SystemExit(f"--baseline {args.baseline} is not one of --runs")
    targets = [str(Path(t).resolve()) for t in args.targets]
    if not set(targets) <= set(map(str, runs)):
        raise SystemExit(f"--targets {sorted(set(targets) - set(map(str, runs)))} are not among --runs")
    cfgs = {r: yaml.safe_load((r / "run.yaml").read_text()) for r in runs if (r / "run.yaml").is_file()}
    if not cfgs:
        raise SystemExit("no --runs dir has a run.yaml: give at least one run of bench/ast_ablation.py")
    first_run, first = next(iter(cfgs.items()))
    shared = lambda c: (c["model"], [str(Path(v).resolve()) for v in c["data"]["validation"]],  # noqa: E731
                        c["data"]["seq_len"], c["eval"]["windows"])  # runs of several work dirs share linked shards
    for r, c in cfgs.items():
        if shared(c) != shared(first):
            raise SystemExit(f"{r}: other model, validation data, seq_len or eval windows than {first_run}")
    seq_len = first["data"]["seq_len"]
    ood = [str(lm_eval_docs(Path(first["output_dir"]).resolve().parent / "ood" / "docs" / "lm_eval_readmes.jsonl"))
           if f == "lm-eval-docs" else str(Path(f).resolve()) for f in args.ood]
    out_json = HERE / "results" / f"ast_heldout-{args.name}.json"
    nll_json = out_json.with_name(out_json.stem + "-nll.json")  # per-window NLL sums of every model scored
    cache = json.loads(nll_json.read_text()) if nll_json.is_file() else {}
    settings = {"model": first["model"], "validation": shared(first)[1], "seq_len": seq_len,
                "training_windows": first["eval"]["windows"], "windows": args.windows,
                "init": one_shot_start(list(cfgs.values()), cache.get("settings", {}).get("init")),
                **({"ood": ood} if ood else {})}
    if cache.get("settings") != settings:
        cache = {"settings": settings, "scored": {}}
    windows = heldout_windows(settings["validation"], first["model"], seq_len, first["eval"]["windows"], args.windows)
    ood_windows = token_windows(ood, first["model"], seq_len, args.windows) if ood else {}
    if set(ood_windows) & set(windows):
        raise SystemExit(f"--ood domain(s) {sorted(set(ood_windows) & set(windows))} are training domains: "
                         f"put the files in a dir named for another domain")
    windows = {**windows, **ood_windows}
    scored = cache["scored"]
    to_score = runs_to_score(runs, scored, nll_json)
    for key, path in (("dense", settings["model"]), ("init", settings["init"])):
        if key not in scored:
            nll = window_nll(load_causal_lm(path).to(device()), windows, desc=key)
            scored[key] = {"nll": {d: v.tolist() for d, v in nll.items()}}
    for r in to_score:
        t0 = time.perf_counter()
        scored[str(r)] = {**score(r, windows), "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_bytes(nll_json, json.dumps(cache).encode())  # a killed pass keeps what it scored
    keys = ["dense", "init", *map(str, runs)]
    results = {"settings": settings, "baseline": baseline, "order": keys, "boot": args.boot, "machine": machine_info(),
               "date": time.strftime("%Y-%m-%d"),
               "runs": {"dense": {"label": "dense (target)", "lr": None, "tokens": None},
                        "init": {"label": "one-shot SparseGPT 2:4 (start)", "lr": None, "tokens": None},
                        **{str(r): {k: v for k, v in scored[str(r)].items() if k != "nll"} for r in runs}},
               "stats": bootstrap(held := {k: {d: v for d, v in scored[k]["nll"].items() if d not in ood_windows}
                                           for k in keys}, seq_len, baseline, args.boot)}
    if targets:  # the same draws, the target's NLL in the dense model's place
        results["target_gaps"] = {t: {k: {g: v[g] for g in ("gap_closed", "gap_closed_ci")} for k, v in
                                      bootstrap({**held, "dense": held[t]}, seq_len, baseline, args.boot).items()}
                                  for t in targets}
    if ood_windows:
        results["ood_stats"] = bootstrap({k: {d: scored[k]["nll"][d] for d in ood_windows} for k in keys},
                                         seq_len, baseline, args.boot)
    atomic_write_json(out_json, results)
    plot(results, out_json.with_suffix(".png"))
    print(table(results))
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()

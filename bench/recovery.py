"""Recovery of a one-shot 2:4 model by training: one experiment, four subcommands, the runs' JSON in bench/results/.

`run`: the AST paper's ablations in miniature, what each part of AST buys at an equal token budget.
SmolLM2-135M pruned once to 2:4 by SparseGPT (the main job's init); every method then trains `megatron-ast
train` (ZeRO-3, 2 CPU ranks by default, each with its share of the cores) for the same tokens on the same data
order, and is evaluated on the same validation windows every --eval-every steps. The dense model's perplexity
on those windows is the target, the one-shot model's the start:

    gap closed = ln(ppl_init / ppl_final) / ln(ppl_init / ppl_dense)

Methods (METHODS): AST with all parts and AST with one part changed (no SR-STE, AdamW's second moment, no
distillation, no SLoRB, masks frozen, dense values under the masks with SLoRB from their means or from 0, KL at
T = 2, SquareHead, SLoRB fitted at the pruner); `naive` (fixed mask, task loss, plain AdamW); `gmp` (gradual
magnitude pruning from the dense model); `dense` distillation without masks from the one-shot weights; the dense
model trained on the same tokens with the task loss (`dense_ce`) and with AST's loss (`dense_kd`). Resumable: a
finished method is kept (same settings), an interrupted one resumes from its last checkpoint. Writes
ast_ablation-<name>.json, a perplexity-vs-tokens PNG and a flip-rate PNG after each method.

`lr`: final perplexity against the learning rate, from `run`s at several --lr (ast_ablation-<name>.json and
every ast_ablation-<name>-lr*.json of one budget): a method's margin at one lr can be its optimizer's step size
(AST's Adam rule for masked weights steps further than AdamW at the same lr). Table and two PNGs
(ast_ablation-<name>-lr.png, -best.png: each method at its best lr).

`heldout`: finished runs scored again on held-out validation windows (none of the training-time ones), each
final checkpoint exported as users measure it (2:4 base + SLoRB adapter), with paired bootstrap intervals of
ln(ppl_run / ppl_baseline) and of the gap closed (windows resampled within each domain, the same draws for all
models). --targets adds the gap to the dense model trained on the same tokens; --ood scores text none of the
runs trained on (`lm-eval-docs`: the task READMEs lm-eval ships). Per-window NLLs are kept in
ast_heldout-<name>-nll.json, so a run scored there needs no run dir any more; writes ast_heldout-<name>.json
and a PNG.

`pairs`: runs that `heldout` scored under several names (other inits, other machines) paired on the same
windows, once their settings agree and the dense model's per-window NLLs match (to 1e-4 relative): run-to-run
spread, and any run against any other. Writes ast_heldout_pairs-<names>.json.

    python bench/recovery.py run [--steps 40 --seq-len 256 --eval-every 8 --lr 1e-4 --methods ast naive ...]
    python bench/recovery.py lr [--name vm]
    python bench/recovery.py heldout --runs RUN... [--baseline RUN --windows 64 --name vm --ood lm-eval-docs --targets RUN ...]
    python bench/recovery.py pairs --names vm-s96 vm-s96b --baseline RUN
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine_info  # noqa: E402
from reference import reference_shards  # noqa: E402


# --- run: the methods at an equal token budget ------------------------------------------------------------------
SLORB = {"group": 16}
# name -> (label, run.yaml overrides on top of AST with all parts)
METHODS: dict[str, tuple[str, dict]] = {
    "ast": ("AST (all parts)", {}),
    "ast_no_srste": ("AST without SR-STE", {"srste": {"lam": 0.0, "t_inc": 1}}),
    # the reference's Adam keeps v of the update m + decay (not of the gradient), which the row above keeps too
    "ast_adamw_moment": ("AST with AdamW's second moment", {"optimizer": {"second_moment": "gradient"}}),
    "ast_no_distill": ("AST without distillation", {"distill": {"w_task": 1.0, "w_kl": 0.0, "w_sq": 0.0}}),
    "ast_no_slorb": ("AST without SLoRB", {"slorb": None}),
    "ast_frozen_masks": ("AST, masks frozen at init", {"mask_interval": 10**9}),
    "ast_pruned_dense": ("AST, pruned weights at dense values", {"pruned_values": "dense"}),
    "ast_dense_slorb_zero": ("AST, dense values, SLoRB from 0",
                             {"pruned_values": "dense", "slorb": {**SLORB, "init": "zero"}}),
    "ast_kl_t2": ("AST, KL at temperature 2 (the reference's)", {"distill": {"temperature": 2.0}}),
    "ast_squarehead": ("AST + SquareHead", {"distill": {"w_sq": 1.0}}),
    # from the same SparseGPT run with its SLoRB branch fitted on the calibration inputs (prune --slorb-group)
    "ast_slorb_fitted": ("AST, SLoRB fitted at the pruner", {"slorb": {**SLORB, "init": "fitted"}}),
    "naive": ("naive (fixed mask, CE)", {"method": "naive", "slorb": None}),
    "gmp": ("gmp (from dense, CE)", {"method": "gmp", "init": "magnitude", "slorb": None}),
    "dense": ("dense distillation, no masks", {"method": "dense", "slorb": None}),
    # the dense model itself trained on the same tokens, no masks: each loss's own target on this text
    "dense_ce": ("dense model, CE fine-tune, no masks", {"method": "dense", "init": "magnitude", "slorb": None,
                                                        "distill": {"w_task": 1.0, "w_kl": 0.0, "w_sq": 0.0}}),
    "dense_kd": ("dense model, AST's loss, no masks", {"method": "dense", "init": "magnitude", "slorb": None}),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] if (run / "log.jsonl").is_file() else []


def ast_config(model: str, pruned: Path, shards: dict, run: Path, args) -> dict:
    """run.yaml of AST with all parts from the one-shot init (`args`: steps, seq_len, lr, eval and checkpoint
    intervals, windows, ds_config)."""
    return {"model": model, "init": str(pruned), "deepspeed": args.ds_config, "output_dir": str(run), "method": "ast",
            "data": {"train": [str(shards["train"])], "validation": [str(shards["validation"])],
                     "seq_len": args.seq_len, "seed": 1234},
            "steps": args.steps, "mask_interval": 4, "mask_score": "magnitude", "slorb": SLORB,
            "lr": {"peak": args.lr, "min": args.lr / 10, "warmup": max(1, args.steps // 20)},
            "srste": {"lam": 6e-5, "t_inc": max(1, args.steps // 4)}, "gmp": {"start": 0, "end": max(1, args.steps // 2)},
            "eval": {"every": args.eval_every, "windows": args.windows},
            "checkpoint": {"every": args.checkpoint_every, "keep": 1}}


def method_config(name: str, model: str, init: Path, shards: dict, run: Path, args) -> dict:
    """run.yaml of one METHODS row: AST with all parts with the row's overrides (gmp's schedule only for gmp)."""
    cfg = {**ast_config(model, init, shards, run, args), **METHODS[name][1]}
    if cfg["method"] != "gmp":
        cfg.pop("gmp")
    return cfg


def one_shot_init(work: Path, calib: int, slorb_group: int | None = None) -> tuple[dict, dict, Path]:
    """(assets, shard dirs, the SparseGPT 2:4 dir every method starts from), made once under `work`;
    with `slorb_group`, the dir with a fitted SLoRB adapter (`slorb.init: fitted` starts from it)."""
    from megatron_ast.pruning.api import REPORT_FILE, prune_to_dir
    from megatron_ast.pruning.pipeline import PruneConfig
    from megatron_ast.sparsity import SparsityPattern

    a, shards = reference_shards(work)
    pruned = work / ("pruned-sparsegpt-2of4" + (f"-slorb{slorb_group}" if slorb_group else ""))
    if not (pruned / REPORT_FILE).is_file():
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        prune_to_dir(a["model"], pruned, PruneConfig("sparsegpt", SparsityPattern.parse("2:4"), device=device,
                                                     slorb_group=slorb_group), [str(shards["train"])], calib, 512)
    return a, shards, pruned


def train(run: Path, cfg: dict, ranks: int, threads: int | None = None) -> tuple[dict, list[dict]]:
    """`megatron-ast train` on `cfg` under torch.distributed.run (resuming a killed run), its progress lines
    relayed; (summary, log records). `threads`: OMP_NUM_THREADS per rank, default the trainer's own share."""
    (run / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={_free_port()}",
           "-m", "megatron_ast.cli", "train", "--config", str(run / "run.yaml"), "--resume", "auto"]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    env.pop("OMP_NUM_THREADS", None)  # torchrun would set 1; the trainer gives each rank its share of the cores
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    from megatron_ast.quickstart import run_relayed

    code = run_relayed(cmd, env, run / "train.log", "[train] step", "  ")
    if code != 0:
        raise SystemExit(f"training failed (exit {code}); see {run / 'train.log'}")
    return json.loads((run / "summary.json").read_text()), _log(run)


def gap_closed(start: float, final: float, dense: float) -> float:
    """Fraction of the log-perplexity gap between the one-shot init and the dense model that was closed."""
    return math.log(start / final) / math.log(start / dense)


def finish_ppl_plot(fig, ax, out_png: Path, dense: float, init: float, xlabel: str, ylabel: str, title: str) -> None:
    """The dense target and the one-shot start as lines, log perplexity axis, legend; saved and closed."""
    import matplotlib.pyplot as plt

    ax.axhline(dense, color="black", ls="--", lw=1, label=f"dense: {dense:.2f}")
    ax.axhline(init, color="gray", ls=":", lw=1, label=f"one-shot SparseGPT 2:4: {init:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def run_plot(results: dict, out_png: Path, flips_png: Path) -> None:
    """Validation perplexity vs tokens for every method; flip rate vs step for the AST runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results["methods"].items():
        ax.plot([p["tokens"] for p in r["curve"]], [p["ppl"]["all"]["ppl"] for p in r["curve"]], marker="o",
                markersize=3, label=f"{r['label']}: {r['final_ppl']['all']['ppl']:.2f}")
    finish_ppl_plot(fig, ax, out_png, results["dense_ppl"]["all"]["ppl"], results["init_ppl"]["all"]["ppl"],
                    "training tokens", f"validation perplexity (seq {results['seq_len']})",
                    f"{results['model']}: 2:4 recovery at equal tokens")

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, r in results["methods"].items():
        if r["flips"]:
            steps = [f["step"] for f in r["flips"]]
            ax.plot(steps, [f["flip_rate_init"] for f in r["flips"]], marker="o", markersize=3,
                    label=f"{r['label']}: vs init")
            ax.plot(steps, [f["flip_rate_prev"] for f in r["flips"]], ls="--", label=f"{r['label']}: vs previous")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of mask entries changed")
    ax.set_title("AST mask flip rate")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(flips_png, dpi=120)
    plt.close(fig)


def run_table(results: dict) -> str:
    rows = ["| method | book | github | all | gap closed | flip vs init | tokens | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in [{"label": "one-shot SparseGPT 2:4 (start)", "final_ppl": results["init_ppl"]},
              *results["methods"].values(), {"label": "dense (target)", "final_ppl": results["dense_ppl"]}]:
        p = r["final_ppl"]
        flip = f"{r['final_flip_rate_init']:.4f}" if r.get("final_flip_rate_init") is not None else "-"
        rows.append(f"| {r['label']} | {p['book']['ppl']:.2f} | {p['github']['ppl']:.2f} | {p['all']['ppl']:.2f} | "
                    + (f"{100 * r['gap_closed']:.1f}% | {flip} | {r['tokens']:,} | {r['train_seconds']:.0f} |"
                       if "gap_closed" in r else "- | - | - | - |"))
    return "\n".join(rows)


def cmd_run(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="bench/recovery.py run")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per method")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=8, help="steps")
    ap.add_argument("--checkpoint-every", type=int, default=20, help="steps (what a killed run resumes from)")
    ap.add_argument("--windows", type=int, default=16, help="validation windows of --seq-len per domain")
    ap.add_argument("--calib", type=int, default=32, help="SparseGPT calibration sequences of 512 tokens")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--ds-config", default=str(HERE.parent / "ds_configs" / "zero3_cpu.json"))
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--work", default="runs/bench_ast_ablation")
    ap.add_argument("--name", default="vm", help="results file suffix: the machine kind")
    args = ap.parse_args(argv)

    from megatron_ast.eval.perplexity import perplexity, token_windows
    from megatron_ast.modeling import load_causal_lm

    a, shards, pruned = one_shot_init(Path(args.work).resolve(), args.calib)
    work = Path(args.work).resolve()
    ds = json.loads(Path(args.ds_config).read_text())
    per_step = args.seq_len * ds["train_micro_batch_size_per_gpu"] * ds.get("gradient_accumulation_steps", 1) * args.ranks
    windows = token_windows([str(shards["validation"])], a["tokenizer"], args.seq_len, args.windows)
    out_json = HERE / "results" / f"ast_ablation-{args.name}.json"
    settings = {"steps": args.steps, "seq_len": args.seq_len, "tokens_per_step": per_step, "ranks": args.ranks,
                "lr": args.lr, "eval_every": args.eval_every, "windows": args.windows, "calib": args.calib,
                "deepspeed": ds}
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if results.get("settings") != settings:  # other settings: start the table afresh
        results = {"settings": settings, "methods": {}}
    if "dense_ppl" not in results:
        results["dense_ppl"] = perplexity(load_causal_lm(a["model"]), windows, desc="dense")
        results["init_ppl"] = perplexity(load_causal_lm(pruned), windows, desc="one-shot")
    results.update({"model": "SmolLM2-135M-Instruct (fp32)", "pattern": "2:4", "seq_len": args.seq_len,
                    "init": f"SparseGPT 2:4, {args.calib} x 512 calibration tokens of the train split",
                    "eval": f"{args.windows} windows x {args.seq_len} tokens per domain, validation split",
                    "machine": machine_info()})
    start, dense = results["init_ppl"]["all"]["ppl"], results["dense_ppl"]["all"]["ppl"]
    print(f"dense {dense:.2f}, one-shot {start:.2f}; {args.steps} steps x {per_step} tokens per method", flush=True)
    for name in args.methods:
        if name in results["methods"]:
            print(f"{name}: done before, kept", flush=True)
            continue
        label, over = METHODS[name]
        run = work / name
        run.mkdir(parents=True, exist_ok=True)
        fitted = (over.get("slorb") or {}).get("init") == "fitted"
        init = one_shot_init(work, args.calib, SLORB["group"])[2] if fitted else pruned
        cfg = method_config(name, a["model"], init, shards, run, args)
        t0 = time.perf_counter()
        print(f"{name}: {label}", flush=True)
        summary, log = train(run, cfg, args.ranks)
        curve = [{"step": 0, "tokens": 0, "ppl": summary["ppl_before"]}]
        curve += [{"step": r["step"], "tokens": r["tokens"], "ppl": r["val"]} for r in log if "val" in r]
        if curve[-1]["step"] != args.steps:
            curve.append({"step": args.steps, "tokens": summary["tokens"], "ppl": summary["ppl_after"]})
        flips = [{k: r[k] for k in ("step", "flip_rate_prev", "flip_rate_init", "sparsity")} for r in log
                 if "flip_rate_init" in r]
        final = summary["ppl_after"]
        results["methods"][name] = {
            "label": label, "overrides": over, "curve": curve, "final_ppl": final, "tokens": summary["tokens"],
            "gap_closed": gap_closed(start, final["all"]["ppl"], dense), "flips": flips if name.startswith("ast") else [],
            "final_flip_rate_init": flips[-1]["flip_rate_init"] if flips and cfg["method"] == "ast" else None,
            "train_seconds": sum(r["tokens_per_s"] ** -1 * per_step for r in log),  # steps only, evaluations excluded
            "wall_seconds": round(time.perf_counter() - t0, 1), "cpu_threads_per_rank": summary.get("cpu_threads_per_rank")}
        results["methods"] = {k: results["methods"][k] for k in METHODS if k in results["methods"]}  # table order
        results["date"] = time.strftime("%Y-%m-%d")
        out_json.write_text(json.dumps(results, indent=2) + "\n")
        run_plot(results, out_json.with_suffix(".png"), out_json.with_name(out_json.stem + "-flips.png"))
        r = results["methods"][name]
        print(f"{name}: ppl {summary['ppl_before']['all']['ppl']:.2f} -> {final['all']['ppl']:.2f}, "
              f"gap closed {100 * r['gap_closed']:.1f}%", flush=True)
    print(run_table(results))
    print(f"wrote {out_json}")


# --- lr: final perplexity against the learning rate --------------------------------------------------------------
def lr_collect(results_dir: Path, name: str) -> dict:
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
        raise SystemExit(f"no bench/results/ast_ablation-{name}-lr*.json; run bench/recovery.py run --name {name}-lrLR")
    return out


def lr_table(c: dict) -> str:
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


def lr_plot(c: dict, out_png: Path, best_png: Path) -> None:
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


def cmd_lr(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="bench/recovery.py lr")
    ap.add_argument("--name", default="vm", help="results name of the runs (bench/recovery.py run --name): NAME and NAME-lr*")
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    c = lr_collect(Path(args.results), args.name)
    out = Path(args.results) / f"ast_ablation-{args.name}-lr.png"
    best = out.with_name(f"ast_ablation-{args.name}-best.png")
    lr_plot(c, out, best)
    print(lr_table(c))
    print(f"wrote {out}, {best}")


# --- heldout: scored again on held-out windows, paired intervals -------------------------------------------------
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
                         "bench/recovery.py run (it resumes a run that did not finish)")
    return [r for r in runs if str(r) not in scored]


def score(run: Path, windows: dict[str, np.ndarray]) -> dict:
    """The run's final checkpoint exported (base + SLoRB adapter) and scored per window."""
    from megatron_ast.eval.perplexity import window_nll
    from megatron_ast.export.hf import export_checkpoint
    from megatron_ast.modeling import load_causal_lm

    cfg = yaml.safe_load((run / "run.yaml").read_text())
    ckpt = run / "checkpoints" / f"step{cfg['steps']}"
    if not ckpt.is_dir():
        raise SystemExit(f"{run}: no final checkpoint {ckpt.name}; finish the run (bench/recovery.py run resumes it)")
    summary = json.loads((run / "summary.json").read_text())
    with tempfile.TemporaryDirectory(dir=run) as tmp:
        export_checkpoint(ckpt, Path(tmp) / "export")
        nll = window_nll(load_causal_lm(Path(tmp) / "export").to(device()), windows, desc=run.name)
    return {"run": str(run), "method": run.name, "label": METHODS[run.name][0] if run.name in METHODS else run.name,
            "lr": cfg["lr"]["peak"], "steps": cfg["steps"], "tokens": summary["tokens"],
            "nll": {d: v.tolist() for d, v in nll.items()}}


def heldout_plot(results: dict, out_png: Path) -> None:
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


def heldout_table(results: dict) -> str:
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


def cmd_heldout(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="bench/recovery.py heldout")
    ap.add_argument("--runs", nargs="+", required=True, help="run dirs of bench/recovery.py run (megatron-ast train)")
    ap.add_argument("--baseline", help="the run the others are compared with (default: the first)")
    ap.add_argument("--windows", type=int, default=64, help="held-out windows per domain")
    ap.add_argument("--boot", type=int, default=4000, help="bootstrap resamples")
    ap.add_argument("--name", default="vm", help="results file suffix: the machine kind")
    ap.add_argument("--targets", nargs="+", default=[], help="runs among --runs (the dense model trained on the same "
                    "tokens: bench/recovery.py run's dense_ce, dense_kd) that also serve as the gap's dense end")
    ap.add_argument("--ood", nargs="+", default=[], help="jsonl/text files of text no run trained on (domain: the "
                    "file's dir name), or lm-eval-docs; scored on up to --windows windows per domain")
    args = ap.parse_args(argv)

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
        raise SystemExit("no --runs dir has a run.yaml: give at least one run of bench/recovery.py run")
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
    heldout_plot(results, out_json.with_suffix(".png"))
    print(heldout_table(results))
    print(f"wrote {out_json}")


# --- pairs: runs of several held-out caches on the same windows -------------------------------------------------
def pairs_merge(caches: dict[str, dict]) -> tuple[dict[str, dict], dict[str, str]]:
    """name -> NLL cache  =>  (key -> domain -> per-window NLL sums, key -> label). "dense" and "init" come from
    the first cache, each other cache's start is "init (NAME)", every run is its path."""
    (name0, c0), *_ = caches.items()
    nll = {"dense": c0["scored"]["dense"]["nll"], "init": c0["scored"]["init"]["nll"]}
    labels = {"dense": "dense (untrained)", "init": f"one-shot start of {name0}"}
    for name, c in caches.items():
        s, s0 = c["settings"], c0["settings"]
        if any(s[k] != s0[k] for k in ("model", "seq_len", "windows", "training_windows")):
            raise SystemExit(f"{name}: another model, seq_len or window count than {name0}; score both with the same "
                             f"bench/recovery.py heldout settings")
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


def pairs_stats(nll: dict[str, dict], seq_len: int, baseline: str, boot: int, ood: set[str]) -> dict[str, dict]:
    """Per window set ("held out": the domains every model has, but `ood`; "out of domain": those of `ood` every
    model has): each model's perplexity and ln(ppl / ppl_baseline) with its interval."""
    shared = set.intersection(*(set(m) for m in nll.values()))
    sets = {"held out": sorted(shared - ood), "out of domain": sorted(shared & ood)}
    return {w: {k: {f: v[f] for f in ("ppl", "log_ratio", "log_ratio_ci")} for k, v in
                bootstrap({k: {d: m[d] for d in doms} for k, m in nll.items()}, seq_len, baseline, boot).items()}
            for w, doms in sets.items() if doms}


def pairs_table(stats: dict[str, dict], labels: dict[str, str], baseline: str) -> str:
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


def cmd_pairs(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="bench/recovery.py pairs")
    ap.add_argument("--names", nargs="+", required=True, help="bench/recovery.py heldout --name of each cache (2 or more)")
    ap.add_argument("--baseline", required=True, help="a run dir scored in one of the caches")
    ap.add_argument("--boot", type=int, default=4000, help="bootstrap resamples")
    args = ap.parse_args(argv)
    from megatron_ast.fsutil import atomic_write_json

    files = {n: HERE / "results" / f"ast_heldout-{n}-nll.json" for n in args.names}
    if missing := [str(f) for f in files.values() if not f.is_file()]:
        raise SystemExit(f"no NLL cache {missing}: run bench/recovery.py heldout --name NAME first")
    nll, labels = pairs_merge({n: json.loads(f.read_text()) for n, f in files.items()})
    baseline = str(Path(args.baseline).resolve())
    if baseline not in nll:
        raise SystemExit(f"--baseline {args.baseline} is scored in none of {args.names}")
    first = json.loads(files[args.names[0]].read_text())["settings"]
    ood = {Path(f).parent.name for f in first.get("ood", [])}  # a --ood file's domain is its dir's name
    stats = pairs_stats(nll, first["seq_len"], baseline, args.boot, ood)
    out = HERE / "results" / f"ast_heldout_pairs-{'+'.join(args.names)}.json"
    atomic_write_json(out, {"names": args.names, "baseline": baseline, "boot": args.boot, "labels": labels,
                            "stats": stats, "machine": machine_info(), "date": time.strftime("%Y-%m-%d")})
    print(pairs_table(stats, labels, baseline))
    print(f"wrote {out}")


COMMANDS = {"run": cmd_run, "lr": cmd_lr, "heldout": cmd_heldout, "pairs": cmd_pairs}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: bench/recovery.py {{{','.join(COMMANDS)}}} ... (see the module docstring)")
    COMMANDS[sys.argv[1]](sys.argv[2:])

"""The AST paper's ablations in miniature: what each part of AST buys at an equal token budget.

SmolLM2-135M pruned once to 2:4 by SparseGPT (the main job's init); every method
then trains `megatron-ast train` (ZeRO-3, 2 CPU ranks by default, each with its
share of the cores) for the same tokens on the same data order, and is evaluated
on the same validation windows every --eval-every steps. The dense model's
perplexity on those windows is the target, the one-shot model's the start:

    gap closed = ln(ppl_init / ppl_final) / ln(ppl_init / ppl_dense)

Methods: AST with all parts (the trainer's defaults: the master holds the one-shot
model's zeros where it prunes, so SLoRB's mean init is 0 too); AST without SR-STE
(no decay); with AdamW's second moment (v of g^2, not of the update);
without distillation (task loss only); without SLoRB; with the masks frozen at the
init; AST whose master holds the dense values under the pruned positions
(`pruned_values: dense`: SLoRB then starts from their group means), and the same
with SLoRB from 0; `naive` (fixed
mask, task loss, plain AdamW); `gmp` (gradual magnitude pruning from the dense
model: it cannot start from the one-shot init); `dense` distillation without
masks from the same one-shot weights (no 2:4 constraint: recovery's ceiling at
these tokens); the dense model itself trained on the same tokens with the task
loss (`dense_ce`) and with AST's loss (`dense_kd`): how far the training text
moves each loss's target. Resumable: a finished method is kept (same settings), an
interrupted one resumes from its last checkpoint. Writes
bench/results/ast_ablation-<name>.json, a perplexity-vs-tokens PNG of every
method and a flip-rate PNG of the AST runs, after each method.

    python bench/ast_ablation.py [--steps 40 --seq-len 256 --eval-every 8 --methods ast naive ...]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine_info  # noqa: E402
from reference import reference_shards  # noqa: E402

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


def plot(results: dict, out_png: Path, flips_png: Path) -> None:
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


def table(results: dict) -> str:
    rows = ["| method | book | github | all | gap closed | flip vs init | tokens | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in [{"label": "one-shot SparseGPT 2:4 (start)", "final_ppl": results["init_ppl"]},
              *results["methods"].values(), {"label": "dense (target)", "final_ppl": results["dense_ppl"]}]:
        p = r["final_ppl"]
        flip = f"{r['final_flip_rate_init']:.4f}" if r.get("final_flip_rate_init") is not None else "-"
        rows.append(f"| {r['label']} | {p['book']['ppl']:.2f} | {p['github']['ppl']:.2f} | {p['all']['ppl']:.2f} | "
                    + (f"{100 * r['gap_closed']:.1f}% | {flip} | {r['tokens']:,} | {r['train_seconds']:.0f} |"
                       if "gap_closed" in r else "- | - | - | - |"))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
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
    args = ap.parse_args()

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
        plot(results, out_json.with_suffix(".png"), out_json.with_name(out_json.stem + "-flips.png"))
        r = results["methods"][name]
        print(f"{name}: ppl {summary['ppl_before']['all']['ppl']:.2f} -> {final['all']['ppl']:.2f}, "
              f"gap closed {100 * r['gap_closed']:.1f}%", flush=True)
    print(table(results))
    print(f"wrote {out_json}")


if __name__ == "__main__":
    main()

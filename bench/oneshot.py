"""One-shot pruning on the real SmolLM2-135M: validation perplexity, wall time and peak RSS per method.

Dense and every method (magnitude, Wanda, SparseGPT, SparseLLM) at 2:4, 70% and 50%
unstructured, calibrated on `--nsamples` sequences of `--seqlen` tokens from the
train split, evaluated on the same evenly spaced validation windows. Each pruning
run is its own child process (so its peak RSS is its own). Results are appended
to bench/results/oneshot-<host>.json after every run, so a partial run still records.

    python bench/oneshot.py [--nsamples 128 --seqlen 512 --windows 32 --device cpu] [--methods ...] [--patterns ...]

A run with the same settings as the recorded file replaces only the rows it re-measures;
each row names the CPU and date it was measured on (the file's `machine` is the latest run's).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, peak_rss_of  # noqa: E402
from reference import reference_shards  # noqa: E402

PATTERNS = ["2:4", "unstructured:0.7", "unstructured:0.5"]
METHODS = ["magnitude", "wanda", "sparsegpt", "sparsellm"]
# also measurable: "<method>/block", SparseGPT's unstructured threshold per 128-column block instead of per row


def _prune(model: str, out: str, method: str, pattern: str, train: str, nsamples: int, seqlen: int, device: str) -> dict:
    from megatron_ast.pruning.api import prune_to_dir
    from megatron_ast.pruning.pipeline import PruneConfig
    from megatron_ast.sparsity import SparsityPattern

    if pattern.startswith("unstructured:"):
        parsed = SparsityPattern.parse("unstructured", float(pattern.split(":")[1]))
    else:
        parsed = SparsityPattern.parse(pattern)
    method, _, scope = method.partition("/")
    cfg = PruneConfig(method, parsed, device=device, scope=scope or "row")
    t0 = time.perf_counter()
    r = prune_to_dir(model, out, cfg, [train], nsamples, seqlen)
    return {"wall_s": round(time.perf_counter() - t0, 1), "mean_reconstruction_error": r["mean_reconstruction_error"],
            "sparsity": r["sparsity"], "all_valid": r["all_valid"],
            "sparsellm_fallback_layers": len({row["name"].rsplit(".", 2)[0] for row in r["layers"]
                                              if row.get("sparsellm", {}).get("fallback_to_sparsegpt")})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=32, help="validation windows of 512 tokens per domain")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--patterns", nargs="+", default=PATTERNS)
    ap.add_argument("--work", default="runs/bench_oneshot")
    args = ap.parse_args()

    from megatron_ast.eval.perplexity import perplexity, token_windows
    from megatron_ast.modeling import load_causal_lm

    work = Path(args.work)
    a, _ = reference_shards(work)
    windows = token_windows([str(work / "shards" / "validation")], a["tokenizer"], 512, args.windows)
    out_path = Path(__file__).resolve().parent / "results" / f"oneshot-{platform.node() or 'host'}.json"
    results = {"model": "SmolLM2-135M-Instruct (fp32, dequantised from the Q4_1 GGUF)", "nsamples": args.nsamples,
               "seqlen": args.seqlen, "eval": f"{args.windows} windows x 512 tokens per domain (book, github), validation split",
               "device": args.device, "machine": machine_info(), "date": time.strftime("%Y-%m-%d"), "runs": []}
    if out_path.exists():  # same settings: a run of some methods replaces only their rows
        old = json.loads(out_path.read_text())
        if all(old.get(k) == results[k] for k in ("nsamples", "seqlen", "eval", "device")):
            # rows measured earlier keep the machine and date they were measured on
            results["runs"] = [{"cpu": old["machine"]["cpu"], "date": old["date"], **r} for r in old["runs"]]

    def record(row: dict) -> None:
        row.update({"cpu": results["machine"]["cpu"], "date": results["date"]})
        results["runs"] = [r for r in results["runs"] if (r["method"], r["pattern"]) != (row["method"], row["pattern"])]
        results["runs"].append(row)
        out_path.write_text(json.dumps(results, indent=2) + "\n")
        ppl = row["ppl"]
        extra = f"  prune {row['wall_s']:7.1f} s  peak RSS {row['peak_rss_gib']:.2f} GiB" if "wall_s" in row else ""
        print(f"{row['method']:10s} {row['pattern']:17s} ppl book {ppl['book']['ppl']:8.2f} github {ppl['github']['ppl']:7.2f} "
              f"all {ppl['all']['ppl']:8.2f}{extra}", flush=True)

    record({"method": "dense", "pattern": "-", "ppl": perplexity(load_causal_lm(a["model"]), windows, desc="dense")})
    for pattern in args.patterns:
        for method in args.methods:
            out = work / f"{method.replace('/', '-')}-{pattern.replace(':', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            row, rss, _ = peak_rss_of((a["model"], str(out), method, pattern, str(work / "shards" / "train"),
                                       args.nsamples, args.seqlen, args.device), _prune)
            row.update({"method": method, "pattern": pattern, "peak_rss_gib": round(rss, 2),
                        "ppl": perplexity(load_causal_lm(out), windows, desc=f"{method} {pattern}")})
            record(row)
            shutil.rmtree(out, ignore_errors=True)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

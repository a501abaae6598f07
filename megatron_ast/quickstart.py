"""The main job on the embedded default: real model, real text, every stage that has landed.

Stages so far: fetch/convert the reference assets, tokenize the reference corpus
into token shards, report the dense model's validation perplexity, prune it to
2:4 with SparseGPT (calibrated on the train shards), report the pruned
model's perplexity on the same windows, then continue training the 2:4
student with AST (distilled from the dense teacher, 2 ranks, DeepSpeed ZeRO-3
on CPU) and report perplexity before and after, then export its checkpoint to a
Hugging Face dir and report that model's perplexity on the dense model's
windows. Each stage's figures and
output paths go to `<out>/report.json`, rewritten after each stage.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megatron_ast import assets
from megatron_ast.fsutil import atomic_write_json

SEQ_LEN = 512
CALIB_SAMPLES = 32
AST_STEPS, AST_SEQ, AST_RANKS = 12, 256, 2
CPU_DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "zero3_cpu.json"  # the checkout's (pip install -e .)


def _train_ast(out: Path, dense: str, pruned: Path) -> dict:
    """A short AST run under the deepspeed launcher, as a user would start it."""
    import shutil
    import socket
    import subprocess
    import sys

    import yaml

    run = out / "ast"
    run.mkdir(exist_ok=True)
    ds = json.loads(CPU_DS_CONFIG.read_text())
    (run / "ds_config.json").write_text(json.dumps(ds, indent=2))
    cfg = {"model": dense, "init": str(pruned), "deepspeed": str(run / "ds_config.json"), "output_dir": str(run),
           "data": {"train": [str(out / "shards" / "train")], "validation": [str(out / "shards" / "validation")],
                    "seq_len": AST_SEQ, "seed": 1234},
           "steps": AST_STEPS, "mask_interval": 4, "lr": {"peak": 1e-4, "min": 1e-5, "warmup": 2},
           "srste": {"lam": 6e-5, "t_inc": AST_STEPS // 2}, "slorb": {"group": 16},
           "eval": {"every": 0, "windows": 8}}
    (run / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cli = shutil.which("megatron-ast", path=str(Path(sys.executable).parent)) or "megatron-ast"
    cmd = [launcher, "--num_gpus", str(AST_RANKS), "--master_port", str(port), cli, "train", "--config", str(run / "run.yaml")]
    print(f"      $ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    with open(run / "train.log", "w") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"AST training failed (exit {proc.returncode}); see {run / 'train.log'}")
    summary = json.loads((run / "summary.json").read_text())
    return {**summary, "run_dir": str(run), "config": str(run / "run.yaml"), "log": str(run / "log.jsonl")}


class Report:
    def __init__(self, out: Path, n_stages: int):
        self.path, self.n, self.i = out / "report.json", n_stages, 0
        self.data = {"out": str(out), "complete": False, "stages": {}}

    def stage(self, name: str, what: str):
        self.i += 1
        print(f"[{self.i}/{self.n}] {name}: {what}", flush=True)
        return _Stage(self, name)


class _Stage:
    def __init__(self, report: Report, name: str):
        self.report, self.name = report, name

    def __enter__(self) -> dict:
        self.t0, self.fig = time.perf_counter(), {}
        return self.fig

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.fig["seconds"] = round(time.perf_counter() - self.t0, 1)
            self.report.data["stages"][self.name] = self.fig
            atomic_write_json(self.report.path, self.report.data)
            print(f"      done in {self.fig['seconds']} s", flush=True)


def run(out: str | Path = "runs/quickstart", max_windows: int = 32, workers: int | None = None) -> Path:
    from data_tools.preprocess import preprocess
    from megatron_ast.eval.perplexity import perplexity, token_windows
    from megatron_ast.export.hf import export_checkpoint
    from megatron_ast.modeling import load_causal_lm
    from megatron_ast.pruning.api import REPORT_FILE, prune_to_dir
    from megatron_ast.pruning.pipeline import PruneConfig
    from megatron_ast.sparsity import SparsityPattern

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    report = Report(out, 7)

    with report.stage("assets", "reference model (SmolLM2-135M) and corpus (Shakespeare + CPython stdlib)") as fig:
        fig.update(assets.ensure_assets())

    with report.stage("preprocess", f"tokenize the corpus into Megatron token shards ({workers} workers)") as fig:
        a = report.data["stages"]["assets"]
        for split in assets.SPLITS:
            shard_dir = out / "shards" / split
            m = preprocess([a["corpus"][d][split] for d in assets.DOMAINS], shard_dir, a["tokenizer"], workers=workers)
            fig[split] = {"dir": str(shard_dir), "documents": m["documents"], "tokens": m["tokens"]}
            print(f"      {split}: {m['documents']} documents, {m['tokens']:,} tokens -> {shard_dir}", flush=True)

    a = report.data["stages"]["assets"]
    windows = token_windows([str(out / "shards" / "validation")], a["tokenizer"], SEQ_LEN, max_windows)

    def evaluate(fig: dict, model_dir: str, label: str) -> None:
        fig.update({"model": model_dir, "seq_len": SEQ_LEN,
                    "perplexity": perplexity(load_causal_lm(model_dir), windows, desc=f"{label} ppl")})
        for dom, r in fig["perplexity"].items():
            print(f"      {dom}: ppl {r['ppl']:.2f} over {r['tokens']:,} tokens", flush=True)

    with report.stage("eval_dense", f"dense validation perplexity ({max_windows} windows of {SEQ_LEN} per domain)") as fig:
        evaluate(fig, a["model"], "dense")

    pruned = out / "pruned-sparsegpt-2of4"
    with report.stage("prune", f"SparseGPT 2:4, {CALIB_SAMPLES} calibration sequences of {SEQ_LEN} -> {pruned}") as fig:
        if not (pruned / REPORT_FILE).is_file():  # a finished stage is not redone when the job is run again
            prune_to_dir(a["model"], pruned, PruneConfig("sparsegpt", SparsityPattern.parse("2:4")),
                         [str(out / "shards" / "train")], CALIB_SAMPLES, SEQ_LEN)
        r = json.loads((pruned / REPORT_FILE).read_text())
        fig.update({"model_dir": str(pruned), "method": r["method"], "pattern": r["pattern"], "sparsity": r["sparsity"],
                    "all_valid": r["all_valid"], "mean_reconstruction_error": r["mean_reconstruction_error"],
                    "prune_seconds": r["seconds"]})
        print(f"      {r['linears']} Linears, sparsity {r['sparsity']:.3f}, all 2:4: {r['all_valid']}", flush=True)

    with report.stage("eval_pruned", "2:4 model's validation perplexity on the same windows") as fig:
        evaluate(fig, str(pruned), "pruned")

    with report.stage("train_ast", f"AST from the SparseGPT 2:4 init, {AST_STEPS} steps, 2 ranks, ZeRO-3 on CPU") as fig:
        fig.update(_train_ast(out, a["model"], pruned))
        b, f = fig["ppl_before"]["all"]["ppl"], fig["ppl_after"]["all"]["ppl"]
        print(f"      {fig['tokens']:,} tokens in {fig['seconds']} s; validation ppl (seq {AST_SEQ}) {b:.2f} -> {f:.2f}",
              flush=True)

    exported = out / "ast-2of4-hf"
    with report.stage("export_ast", f"AST checkpoint -> Hugging Face dir {exported}; its perplexity as above") as fig:
        if not (exported / "export_report.json").is_file():
            export_checkpoint(report.data["stages"]["train_ast"]["checkpoint"], exported)
        evaluate(fig, str(exported), "AST 2:4")

    report.data["complete"] = True
    atomic_write_json(report.path, report.data)
    print(f"report: {report.path}", flush=True)
    return report.path

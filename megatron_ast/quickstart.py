"""The main job on the embedded default: real model, real text, every stage that has landed.

Stages so far: fetch/convert the reference assets, tokenize the reference corpus
into token shards, report the dense model's validation perplexity, prune it to
2:4 with SparseGPT (calibrated on the train shards) with a SLoRB branch fitted
on the same calibration inputs, report the pruned model's perplexity on the same
windows (with its branch, and without it), then continue training the 2:4
student with AST (distilled from the dense teacher, SLoRB starting from the
fitted branch, 2 ranks, DeepSpeed ZeRO-3 on CPU) and report perplexity before
and after, then export its checkpoint to a Hugging Face dir and report that
model's perplexity on the dense model's windows (with its SLoRB adapter, and
without it), quantize it to int4 (GPTQ, on top of the 2:4 masks, the adapter
carried along) and report its perplexity and stored size, run the offline
lm-eval tasks on all six, and print the final table (dense vs one-shot, with
and without its branch, vs AST, with and without, vs AST+int4 + SLoRB). Each
stage's figures and output paths go to `<out>/report.json`, rewritten after
each stage; the table is its `final` entry.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megatron_ast import assets
from megatron_ast.errors import UsageError
from megatron_ast.examples import example
from megatron_ast.fsutil import atomic_write_json

SEQ_LEN = 512
CALIB_SAMPLES = 32
AST_STEPS, AST_SEQ, AST_RANKS = 12, 256, 2
SLORB_GROUP = 16  # the pruner fits the branch on its calibration inputs; AST starts from it (slorb.init: fitted)
LM_EVAL_N = 100  # examples per local lm-eval task
CPU_DS_CONFIG = example("ds_configs/zero3_cpu.json")  # shipped with the package (megatron_ast/examples/)


def run_relayed(cmd: list[str], env: dict, log: Path, keep: str, indent: str) -> int:
    """Run `cmd` with all its output appended to `log`, echoing the lines that start with `keep` (the training
    ranks' progress); returns the exit code."""
    import subprocess

    with open(log, "a") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1)
        for line in proc.stdout:
            logf.write(line)
            if line.startswith(keep):
                print(f"{indent}{line.rstrip()}", flush=True)
        return proc.wait()


def _train_ast(out: Path, dense: str, pruned: Path) -> dict:
    """A short AST run under the deepspeed launcher, as a user would start it."""
    import shutil
    import socket
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
           "srste": {"lam": 6e-5, "t_inc": AST_STEPS // 2}, "slorb": {"group": SLORB_GROUP, "init": "fitted"},
           "eval": {"every": 0, "windows": 8}}
    (run / "run.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    cli = shutil.which("megatron-ast", path=str(Path(sys.executable).parent)) or "megatron-ast"
    cmd = [launcher, "--num_gpus", str(AST_RANKS), "--master_port", str(port), cli, "train", "--config", str(run / "run.yaml"),
           "--resume", "auto"]  # the job run again continues (or, finished, just reports) its run
    print(f"      $ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    code = run_relayed(cmd, env, run / "train.log", "[train]", "      ")
    if code != 0:
        raise RuntimeError(f"AST training failed (exit {code}); see {run / 'train.log'}")
    summary = json.loads((run / "summary.json").read_text())
    return {**summary, "run_dir": str(run), "config": str(run / "run.yaml"), "log": str(run / "log.jsonl")}


STAGES = ("assets", "preprocess", "eval_dense", "prune", "eval_pruned", "eval_pruned_base", "train_ast", "export_ast",
          "eval_ast_base", "quantize_ast", "lm_eval")


class _Stopped(Exception):
    """--stop-after's stage finished: the job ends there, its report written."""


class Report:
    def __init__(self, out: Path, n_stages: int, stop_after: str | None = None):
        self.path, self.n, self.i, self.stop_after = out / "report.json", n_stages, 0, stop_after
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
            if self.name == self.report.stop_after:
                raise _Stopped


def _size_bytes(model_dir: Path, adapter: bool) -> int:
    """What the dir stores for the model: its weight files, and its SLoRB adapter's when measured with it (a
    quantized dir: the packed 2:4 int codes and float16 rest its report counts, adapter included)."""
    from megatron_ast.quantization.api import REPORT_FILE as QUANT_REPORT
    from megatron_ast.sparsity.slorb_adapter import ADAPTER_DIR, WEIGHTS

    if (model_dir / QUANT_REPORT).is_file():
        return json.loads((model_dir / QUANT_REPORT).read_text())["whole_model"]["stored_bytes"]
    extra = (model_dir / ADAPTER_DIR / WEIGHTS).stat().st_size if adapter else 0
    return sum(f.stat().st_size for f in model_dir.glob("model*.safetensors")) + extra


def _group_size(model_dir: Path) -> int:
    """128 when every decoder Linear's in_features allows it, else their largest common divisor >= 128 that
    is a multiple of 32 (SmolLM2: 576 and 1536 inputs -> 192), so the int4 scales stay as sparse as the paper's."""
    import math

    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    g = math.gcd(c.hidden_size, c.intermediate_size)
    if g % 128 == 0:
        return 128
    return next((d for d in range(128, g + 1, 32) if g % d == 0), g)


def _final_table(report: "Report") -> list[dict]:
    st = report.data["stages"]
    lm = st["lm_eval"]["results"]
    rows = []
    for label, stage in (("dense", "eval_dense"), ("one-shot SparseGPT 2:4 + SLoRB", "eval_pruned"),
                         ("one-shot 2:4, no adapter", "eval_pruned_base"), ("AST 2:4 + SLoRB", "export_ast"),
                         ("AST 2:4, no adapter", "eval_ast_base"), ("AST 2:4 + int4 + SLoRB", "quantize_ast")):
        model = st[stage]["model"]
        r = lm[f"{model} (no adapter)" if stage.endswith("_base") else model]
        rows.append({"model": label, "dir": model, "slorb_adapter": st[stage]["slorb_adapter"],
                     "ppl": st[stage]["perplexity"]["all"]["ppl"],
                     "shakespeare_cloze_acc": r["shakespeare_cloze"]["acc"], "code_next_line_acc": r["code_next_line"]["acc"],
                     "size_mib": _size_bytes(Path(model), bool(st[stage]["slorb_adapter"])) / 2**20})
    w = max(len(r["model"]) for r in rows)
    head = f"{'model':{w}s} {'ppl':>8s} {'cloze acc':>10s} {'code acc':>9s} {'size MiB':>9s}"
    print("      " + head, flush=True)
    for r in rows:
        print(f"      {r['model']:{w}s} {r['ppl']:8.2f} {r['shakespeare_cloze_acc']:10.3f} {r['code_next_line_acc']:9.3f} "
              f"{r['size_mib']:9.1f}", flush=True)
    return rows


def run(out: str | Path = "runs/quickstart", max_windows: int = 32, workers: int | None = None,
        lm_eval_n: int = LM_EVAL_N, stop_after: str | None = None) -> Path:
    """The main job; `stop_after` ends it after that stage (one of STAGES), its figures in the report."""
    if stop_after is not None and stop_after not in STAGES:
        raise UsageError(f"--stop-after {stop_after!r} is not a stage; the stages are {', '.join(STAGES)}")
    try:
        return _run(Path(out), max_windows, workers, lm_eval_n, stop_after)
    except _Stopped:
        print(f"stopped after {stop_after}: {Path(out) / 'report.json'}", flush=True)
        return Path(out) / "report.json"


def _run(out: Path, max_windows: int, workers: int | None, lm_eval_n: int, stop_after: str | None) -> Path:
    from data_tools.preprocess import preprocess
    from megatron_ast.eval.perplexity import perplexity, token_windows
    from megatron_ast.export.hf import export_checkpoint
    from megatron_ast.modeling import load_causal_lm
    from megatron_ast.pruning.api import REPORT_FILE, prune_to_dir
    from megatron_ast.pruning.pipeline import PruneConfig
    from megatron_ast.sparsity import SparsityPattern

    out.mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    report = Report(out, len(STAGES), stop_after)

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

    def evaluate(fig: dict, model_dir: str, label: str, adapter: bool = True) -> None:
        from megatron_ast.sparsity.slorb_adapter import used

        fig.update({"model": model_dir, "seq_len": SEQ_LEN, "slorb_adapter": used(model_dir, adapter),
                    "perplexity": perplexity(load_causal_lm(model_dir, adapter=adapter), windows, desc=f"{label} ppl")})
        for dom, r in fig["perplexity"].items():
            print(f"      {dom}: ppl {r['ppl']:.2f} over {r['tokens']:,} tokens", flush=True)

    with report.stage("eval_dense", f"dense validation perplexity ({max_windows} windows of {SEQ_LEN} per domain)") as fig:
        evaluate(fig, a["model"], "dense")

    pruned = out / "pruned-sparsegpt-2of4"
    with report.stage("prune", f"SparseGPT 2:4 + SLoRB branch fitted (group {SLORB_GROUP}), {CALIB_SAMPLES} calibration "
                                f"sequences of {SEQ_LEN} -> {pruned}") as fig:
        if not (pruned / REPORT_FILE).is_file():  # a finished stage is not redone when the job is run again
            prune_to_dir(a["model"], pruned, PruneConfig("sparsegpt", SparsityPattern.parse("2:4"),
                                                         slorb_group=SLORB_GROUP),
                         [str(out / "shards" / "train")], CALIB_SAMPLES, SEQ_LEN)
        r = json.loads((pruned / REPORT_FILE).read_text())
        fig.update({"model_dir": str(pruned), "method": r["method"], "pattern": r["pattern"], "sparsity": r["sparsity"],
                    "all_valid": r["all_valid"], "mean_reconstruction_error": r["mean_reconstruction_error"],
                    "prune_seconds": r["seconds"]})
        print(f"      {r['linears']} Linears, sparsity {r['sparsity']:.3f}, all 2:4: {r['all_valid']}", flush=True)

    with report.stage("eval_pruned", "2:4 model + fitted SLoRB adapter: validation perplexity on the same windows") as fig:
        evaluate(fig, str(pruned), "pruned")

    with report.stage("eval_pruned_base", "the same 2:4 model without its adapter: what the fitted branch adds") as fig:
        evaluate(fig, str(pruned), "pruned base", adapter=False)

    with report.stage("train_ast", f"AST from the SparseGPT 2:4 init, {AST_STEPS} steps, 2 ranks, ZeRO-3 on CPU") as fig:
        fig.update(_train_ast(out, a["model"], pruned))
        b, f = fig["ppl_before"]["all"]["ppl"], fig["ppl_after"]["all"]["ppl"]
        print(f"      {fig['tokens']:,} tokens in {fig['seconds']} s; validation ppl (seq {AST_SEQ}) {b:.2f} -> {f:.2f}",
              flush=True)

    exported = out / "ast-2of4-hf"
    with report.stage("export_ast", f"AST checkpoint -> Hugging Face dir {exported}; its perplexity (2:4 base + "
                                    "SLoRB adapter) as above") as fig:
        if not (exported / "export_report.json").is_file():
            export_checkpoint(report.data["stages"]["train_ast"]["checkpoint"], exported)
        evaluate(fig, str(exported), "AST 2:4")

    with report.stage("eval_ast_base", "the same AST model without its SLoRB adapter: what the branch adds") as fig:
        evaluate(fig, str(exported), "AST 2:4 base", adapter=False)

    quantized = out / "ast-2of4-int4"
    group = _group_size(exported)
    with report.stage("quantize_ast", f"int4 GPTQ (group {group}) on top of the AST 2:4 model -> {quantized}") as fig:
        from megatron_ast.quantization.api import REPORT_FILE as QUANT_REPORT, quantize_dir
        from megatron_ast.quantization.groupwise import QuantSpec

        if not (quantized / QUANT_REPORT).is_file():
            quantize_dir(exported, quantized, QuantSpec(4, group), "gptq", [str(out / "shards" / "train")],
                         CALIB_SAMPLES, SEQ_LEN)
        q = json.loads((quantized / QUANT_REPORT).read_text())
        fig["group_size"] = q["group_size"]
        fig["compression_vs_fp32"] = {"decoder_linears": q["decoder_linears"]["compression_vs_fp32"],
                                      "whole_model": q["whole_model"]["compression_vs_fp32"]}
        print(f"      decoder Linears {fig['compression_vs_fp32']['decoder_linears']:.2f}x, whole model "
              f"{fig['compression_vs_fp32']['whole_model']:.2f}x smaller than fp32", flush=True)
        evaluate(fig, str(quantized), "AST 2:4 int4")

    models = [a["model"], str(pruned), str(exported), str(quantized)]
    with report.stage("lm_eval", f"offline lm-eval tasks ({lm_eval_n} examples each) on the six models") as fig:
        from megatron_ast.assets import cache_root
        from megatron_ast.eval.harness import evaluate as lm_evaluate
        from megatron_ast.eval.local_tasks import TASKS, build_local_tasks

        tasks_dir = build_local_tasks(cache_root() / "lm_eval_tasks" / f"n{lm_eval_n}", a["corpus"]["book"]["validation"],
                                      a["corpus"]["github"]["validation"], lm_eval_n)
        results = lm_evaluate(models, list(TASKS), tasks_dir)
        for d in (pruned, exported):
            results[f"{d} (no adapter)"] = lm_evaluate([d], list(TASKS), tasks_dir, adapter=False)[str(d)]
        fig.update({"tasks": list(TASKS), "n": lm_eval_n, "results": results})

    report.data["final"] = _final_table(report)
    report.data["complete"] = True
    atomic_write_json(report.path, report.data)
    print(f"report: {report.path}", flush=True)
    return report.path

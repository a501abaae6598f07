"""`megatron-ast init`: a run dir to start from, for a model and a world: run.yaml, a DeepSpeed JSON, the launchers.

The choices are the measured ones (docs/results.md, "What each part of AST buys"): a SparseGPT 2:4 init with its SLoRB
branch fitted by the pruner (`prune --slorb-group 16`, `slorb.init: fitted`: 41.93 against 44.31 at the start,
the main job's best), pruned weights at 0 (dense values under the masks cost 44.31 -> 69.22), distillation at
temperature 1 (30.13 against 31.87 at T=2), lr 1e-4 (the best on held-out windows). Distillation at 0.67 KL
is for text beyond the training corpus (11-14% better there at 98k tokens, 6% worse in domain): in-domain only,
set `distill.w_kl: 0`.

The batch arithmetic: the micro-batch fills `MICRO_TOKENS` per GPU (8 x 1024, bf16 with activation
checkpointing at 8B; docs/memory_at_scale.md), the accumulation makes the global batch the nearest multiple of
one micro step of the whole world to `global_batch_tokens`, and the steps cover `tokens`.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import yaml

from megatron_ast.errors import UsageError
from megatron_ast.examples import ROOT, example
from megatron_ast.fsutil import atomic_dir, read_config_file
from megatron_ast.modeling import check_model_dir

MICRO_TOKENS = 8 * 1024  # tokens per GPU per micro step
SLORB_GROUP = 16


def batch(world: int, seq_len: int, global_batch_tokens: int, tokens: int) -> dict:
    """micro, accumulation, global batch and steps for `world` GPUs."""
    micro = max(1, MICRO_TOKENS // seq_len)
    per_step = micro * seq_len * world  # one micro step of every rank
    gas = max(1, round(global_batch_tokens / per_step))
    step_tokens = per_step * gas
    return {"micro": micro, "grad_accum": gas, "global_batch": micro * gas * world, "tokens_per_step": step_tokens,
            "steps": max(1, math.ceil(tokens / step_tokens))}


def write_run_dir(model: str | Path, pruned: str | Path, out: str | Path, gpus_per_node: int = 8, nodes: int = 1,
                  seq_len: int = 1024, tokens: int = 10**9, global_batch_tokens: int = 2**19,
                  train: list[str] | None = None, validation: list[str] | None = None) -> dict:
    """Write `out/` (must not exist): run.yaml, ds_config.json and the launch scripts; returns the arithmetic."""
    out = Path(out)
    if out.exists():
        raise UsageError(f"{out} already exists: pass a new --out")
    check_model_dir(model)
    report = Path(pruned) / "sparsity_report.json"
    if not (Path(pruned) / "masks.safetensors").is_file() or not report.is_file():
        raise UsageError(f"--pruned {pruned} is not a `megatron-ast prune` output: run `megatron-ast prune --model "
                         f"{model} --method sparsegpt --calib SHARDS --slorb-group {SLORB_GROUP} --out DIR` first")
    pr = read_config_file(report, "pruning report")
    if pr.get("pattern") != "2:4":
        raise UsageError(f"--pruned {pruned} is {pr.get('pattern')}: AST's recipe starts from a 2:4 prune")
    group = (pr.get("slorb") or {}).get("group")
    world = gpus_per_node * nodes
    b = batch(world, seq_len, global_batch_tokens, tokens)
    ds = json.loads(example("ds_configs/zero3_bf16.json").read_text())
    ds.update({"train_micro_batch_size_per_gpu": b["micro"], "gradient_accumulation_steps": b["grad_accum"]})
    warmup = min(2000, max(1, b["steps"] // 20))
    cfg = yaml.safe_load(example("launch/run_ast.yaml").read_text())
    cfg.update({
        "model": str(Path(model).resolve()), "init": str(Path(pruned).resolve()), "pruned_values": "zero",
        "deepspeed": str(out.resolve() / "ds_config.json"), "output_dir": str(out.resolve() / "run"),
        "steps": b["steps"],
        "data": {**cfg["data"], "train": train or cfg["data"]["train"], "validation": validation or [],
                 "seq_len": seq_len},
        "lr": {"peak": 1.0e-4, "min": 1.0e-5, "warmup": warmup},
        "srste": {**cfg["srste"], "t_inc": max(1, b["steps"] // 4)},
        "gmp": {"start": 0, "end": max(1, b["steps"] // 2)},
        "distill": {**cfg["distill"], "temperature": 1.0},
        "slorb": {"group": group, "init": "fitted", "trainable_projection": False} if group else None,
        "eval": {"every": max(1, b["steps"] // 20), "windows": 64},
    })
    with atomic_dir(out) as tmp:
        (tmp / "ds_config.json").write_text(json.dumps(ds, indent=2) + "\n")
        head = (f"# megatron-ast init: {world} GPUs ({nodes} x {gpus_per_node}), {b['global_batch']} x {seq_len} tokens "
                f"per step ({b['micro']} per GPU x {b['grad_accum']} accumulation), {b['steps']} steps for "
                f"{tokens:,} tokens.\n# Start it with the launchers beside it, e.g.\n"
                f"#   ./train_deepspeed.sh run.yaml      (or: sbatch -N {nodes} train_slurm.sbatch run.yaml)\n")
        (tmp / "run.yaml").write_text(head + yaml.safe_dump(cfg, sort_keys=False))
        for script in sorted((ROOT / "launch").glob("*")):
            if script.suffix in (".sh", ".sbatch") or script.name == "hostfile.example":
                shutil.copy2(script, tmp / script.name)
    return {"out": str(out), "world_size": world, "nodes": nodes, "seq_len": seq_len, **b,
            "slorb": f"fitted (group {group})" if group else "none (the pruned dir has no fitted branch)"}

"""Peak host memory of one-shot pruning and of export, on random-init Llamas in bf16 with Llama-3's
vocabulary, for this checkout and (--before) an earlier one, run one after the other.

The models: hidden 2048, intermediate 8192, 16 heads (8 KV), vocabulary 128,256, untied, saved in 1 GB
shards; 16 layers (1.53B parameters, 2.85 GiB in bf16) for pruning, 8 layers (1.03B) for export: making
the 1.5B model's ZeRO-3 checkpoint on one rank (bf16 working copy, fp32 master, gradient buffers, masks)
did not fit this machine's 23 GB. Stages, each a whole CLI process
(bench/machine.py's run_process: RSS and RssAnon sampled every 20 ms; RssAnon leaves out the file
pages a process maps, which the kernel may drop):
  - prune: `megatron-ast prune --method magnitude --pattern 2:4` (no calibration: the model's loading and
    writing is what is measured; SparseGPT adds one layer's Hessians and the calibration activations);
  - export: `megatron-ast export` of a ZeRO-3 checkpoint of that model (1 rank, bf16, masks by magnitude,
    saved before any optimizer step, so it holds the fp32 master but no Adam moments).
Writes bench/results/stage_memory-<name>.json with both checkouts' figures and the model's size.

    git worktree add /tmp/before <commit>
    python bench/stage_memory.py --before /tmp/before [--layers 16 --name vm]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from machine import run_process, write_result  # noqa: E402


def _model(args, layers: int, out: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                         tie_word_embeddings=False, dtype="bfloat16")
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(out, max_shard_size="1GB")
        del model
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def _checkpoint_worker(model_dir: str, root: str) -> None:
    """Under torchrun (1 rank): a complete checkpoint of the model as a bf16 ZeRO-3 student."""
    import deepspeed

    from megatron_ast.training import checkpoint
    from megatron_ast.training.config import DataConfig, TrainConfig
    from megatron_ast.training.engines import load_zero3, sparsify_zero3_
    from megatron_ast.training.mask_partitions import PartitionedMasks
    from megatron_ast.training.sr_ste import SRSTEAdamW
    from megatron_ast.training.trainer import param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 3, "sub_group_size": 10**8}, "zero_allow_untested_optimizer": True,
          "steps_per_print": 10**9}
    import torch

    student = load_zero3(model_dir, ds, torch.bfloat16)
    local, _ = sparsify_zero3_(student, 2, 4)
    opt = SRSTEAdamW(param_groups(student, 0.1), lr=0.0)
    engine, *_ = deepspeed.initialize(model=student, optimizer=opt, config=ds)
    masks = PartitionedMasks(engine, local)
    checkpoint.install_checkpoint_engine(engine)
    cfg = TrainConfig(model=model_dir, deepspeed="unused", data=DataConfig(train=["unused"]), method="naive")
    state = {"step": 1, "config": json.loads(json.dumps(cfg, default=lambda o: o.__dict__))}
    checkpoint.save(engine, Path(root), 1, state, masks.state_dict(), keep=0)


def _cli(repo: Path, args: list[str], log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    return run_process([sys.executable, "-m", "megatron_ast.cli", *args], log, env, cwd=repo)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16, help="the pruned model's")
    ap.add_argument("--export-layers", type=int, default=8, help="the exported model's")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--before", help="an earlier checkout to measure beside this one")
    ap.add_argument("--work", default="runs/bench_stage_memory")
    ap.add_argument("--name", default="vm")
    ap.add_argument("--checkpoint-worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.checkpoint_worker:
        return _checkpoint_worker(*a.checkpoint_worker)
    work = Path(a.work).resolve()
    models, params = {}, {}
    for stage, layers in (("prune", a.layers), ("export", a.export_layers)):
        models[stage] = work / f"model-{layers}layers"
        params[stage] = _model(a, layers, models[stage])
        print(f"{stage} model: {params[stage] / 1e9:.2f}B parameters, {params[stage] * 2 / 2**30:.2f} GiB in bf16")
    ckpts = work / f"run-{a.export_layers}layers" / "checkpoints"
    if not (ckpts / "step1" / "complete.json").is_file():
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29641",
                        __file__, "--checkpoint-worker", str(models["export"]), str(ckpts)], check=True,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2"})
    repos = {"after": HERE.parent, **({"before": Path(a.before).resolve()} if a.before else {})}
    results = {}
    for label, repo in repos.items():
        results[label] = {}
        for stage, cmd in (("prune", ["prune", "--model", str(models["prune"]), "--method", "magnitude", "--pattern", "2:4",
                                      "--device", "cpu"]),
                           ("export", ["export", str(ckpts / "step1")])):
            out = work / f"{stage}-{label}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            r = _cli(repo, [*cmd, "--out", str(out)], work / f"{stage}-{label}.log")
            r["output_gib"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30
            r["files"] = sorted(f.name for f in out.glob("model*.safetensors"))
            results[label][stage] = r
            print(f"{label:6s} {stage:6s}: peak RssAnon {r['peak_anon_gib_max_process']:.2f} GiB, peak RSS "
                  f"{r['peak_rss_gib_max_process']:.2f} GiB, {r['seconds']:.0f} s, writes {r['output_gib']:.2f} GiB "
                  f"in {len(r['files'])} file(s)")
            subprocess.run(["rm", "-rf", str(out)], check=True)
    write_result("stage_memory", a.name, {
        "command": " ".join(["python", "bench/stage_memory.py", *sys.argv[1:]]),
        "models": {stage: {"params": params[stage], "bf16_gib": params[stage] * 2 / 2**30, "hidden": a.hidden,
                           "layers": a.layers if stage == "prune" else a.export_layers,
                           "intermediate": a.intermediate, "vocab": a.vocab} for stage in params},
        "before_commit": subprocess.run(["git", "-C", a.before, "rev-parse", "HEAD"], capture_output=True,
                                        text=True).stdout.strip() if a.before else None,
        "results": results})


if __name__ == "__main__":
    main()

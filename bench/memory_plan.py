"""`megatron-ast train --dry-run`'s memory plan against what the ranks really hold, on 1 and 2 CPU ranks.

A random-init Llama of ~0.46B parameters (built partitioned under ZeRO-3: no rank ever holds all of
it), bf16 ZeRO-3 as on a GPU, with everything AST adds: a frozen teacher engine, 2:4 masks on every
decoder Linear, SR-STE AdamW, the partition-local masks. After one AST step each rank reports
- the bytes of every model-state tensor it holds, found by walking them (working and gradient
  partitions, fp32 master, Adam moments, SR-STE indicator, masks, teacher), against
  `plan.memory_per_rank` part by part;
- its resident memory (RSS) above the baseline before the first model was built, after the step
  and at its peak.
Per-rank model states must shrink as 1/world: the 2-rank figure over the 1-rank one is printed
beside 0.5. Writes bench/results/memory_plan-<name>.json.

    python bench/memory_plan.py [--hidden 1152 --layers 24 --seq-len 32 --name vm]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from machine import write_result  # noqa: E402


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _engine(config, ds: dict, trainable: bool):
    """A partitioned random-init causal LM as a ZeRO-3 engine (the teacher: frozen, no optimizer)."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if trainable:
        return model
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    return engine


def worker(args) -> None:
    import deepspeed
    import torch

    from megatron_ast.training.engines import sparsify_zero3_
    from megatron_ast.training.mask_partitions import PartitionedMasks
    from megatron_ast.training.sr_ste import SRSTEAdamW
    from megatron_ast.training.trainer import param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    config = model_config(args)
    base = _rss()
    teacher = _engine(config, ds, trainable=False)
    after_teacher = _rss()
    student = _engine(config, ds, trainable=True)
    local, _ = sparsify_zero3_(student, 2, 4)
    opt = SRSTEAdamW(param_groups(student, 0.1), lr=1e-4, srste_lambda=6e-5)
    engine, *_ = deepspeed.initialize(model=student, optimizer=opt, config=ds)
    masks = PartitionedMasks(engine, local)
    x = torch.randint(0, config.vocab_size, (1, args.seq_len))
    with torch.no_grad():
        teacher(input_ids=x)
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    after_step = _rss()

    zero = engine.optimizer
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    held = {
        "student_working_params": nbytes(p.ds_tensor for p in engine.module.parameters()),
        "student_grad_partition": nbytes([zero.grad_partitions_flat_buffer]),
        "student_fp32_master": nbytes(zero.fp32_partitioned_groups_flat),
        "student_adam_moments": nbytes(t for st in opt.state.values() for k, t in st.items() if k.startswith("exp_avg")),
        "srste_indicator_int8": nbytes(opt._pruned.values()),
        "masks_current_and_initial": nbytes([*masks.local.values(), *masks.initial.values()]),
        "teacher_params": nbytes(p.ds_tensor for p in teacher.module.parameters()),
    }
    if rank == 0:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        Path(args.worker_out).write_text(json.dumps({
            "world": world, "held_bytes": held, "rss_base": base, "rss_teacher": after_teacher - base,
            "rss_after_step": after_step - base, "rss_peak": peak - base, "loss": float(loss.detach())}))


def model_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1152)
    ap.add_argument("--intermediate", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--name", default="vm", help="results file suffix: the machine kind")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out:
        worker(args)
        return
    from megatron_ast.training.plan import memory_per_rank, param_counts

    total, largest, masked = param_counts(model_config(args))
    print(f"random Llama: {total / 1e9:.3f}B params ({masked / 1e9:.3f}B masked), bf16 ZeRO-3 + teacher, 1 AST step")
    runs = {}
    for world in args.worlds:
        out = Path(f"/tmp/memory_plan_{world}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_port=29533",
               __file__, "--worker-out", str(out), *sys.argv[1:]]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        got = json.loads(out.read_text())
        plan = memory_per_rank(total, largest, masked, world)
        got["plan_bytes"] = {k: v["bytes"] for k, v in plan["parts"].items()}
        got["seconds"] = round(time.perf_counter() - t0, 1)
        runs[world] = got
        gib = lambda b: b / 2**30  # noqa: E731
        print(f"\n{world} rank(s), rank 0, GiB:        held    plan")
        for k, b in got["held_bytes"].items():
            print(f"  {k:28s} {gib(b):7.3f} {gib(got['plan_bytes'][k]):7.3f}")
        held, planned = sum(got["held_bytes"].values()), sum(got["plan_bytes"][k] for k in got["held_bytes"])
        print(f"  {'persistent model states':28s} {gib(held):7.3f} {gib(planned):7.3f}  (held/plan {held / planned:.4f})")
        print(f"  RSS above baseline: after the step {gib(got['rss_after_step']):.2f}, peak {gib(got['rss_peak']):.2f} "
              f"(plan with the transient fp32 gradient and the gathered layer: {gib(plan['gpu']):.2f})")
    if 1 in runs and 2 in runs:
        h1, h2 = (sum(runs[w]["held_bytes"].values()) for w in (1, 2))
        r1, r2 = runs[1]["rss_after_step"], runs[2]["rss_after_step"]
        print(f"\n2 ranks / 1 rank, per rank: model states held {h2 / h1:.4f} (1/world = 0.5), RSS after the step {r2 / r1:.3f}")
    write_result("memory_plan", args.name, {
        "model": {"params": total, "largest_layer_params": largest, "masked_params": masked, "hidden": args.hidden,
                  "intermediate": args.intermediate, "layers": args.layers},
        "seq_len": args.seq_len, "precision": "bf16 working, fp32 master", "runs": runs})

if __name__ == "__main__":
    main()

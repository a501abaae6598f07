"""Checkpoint cost on SmolLM2-135M under ZeRO-3 (2 ranks by default): save, verify, load, resume.

In one run: a Trainer (AST, ZeRO-3 student + teacher) takes one step and saves a
sharded checkpoint (DeepSpeed's partitions, our rank files, the sha256 manifest),
then a second Trainer resumes from it and takes its first step. The baseline, in
the same processes: rank 0 `torch.save`s the same state consolidated on one rank
(fp32 weights, Adam's two moments, the masks) and loads it back. Prints seconds
and bytes; writes bench/results/checkpoint-<host>.json.

    python bench/checkpoint.py [--ranks 2 --seq-len 128]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _worker(args) -> None:
    import torch
    import torch.distributed as dist

    from megatron_ast.training import checkpoint
    from megatron_ast.training.config import CheckpointConfig, DataConfig, EvalConfig, LRConfig, TrainConfig
    from megatron_ast.training.trainer import Trainer

    work = Path(args.work)

    def config(resume: str) -> TrainConfig:
        return TrainConfig(model=os.environ["BENCH_MODEL"], deepspeed=str(work / "ds.json"), output_dir=str(work / "run"),
                           data=DataConfig(train=[os.environ["BENCH_SHARDS"]], seq_len=args.seq_len), steps=4,
                           lr=LRConfig(1e-4, 1e-5, 0), eval=EvalConfig(0, 0), checkpoint=CheckpointConfig(0, 2),
                           resume=resume).validate()

    t0 = time.perf_counter()
    trainer = Trainer(config("none"))
    trainer.train_step()
    fresh_to_first_step = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    tag = trainer.save()
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    problem = checkpoint.verify(tag) if dist.get_rank() == 0 else None
    verify_s = time.perf_counter() - t0
    # the baseline: the same state consolidated on one rank, torch.save / torch.load
    params = [p for p in trainer.student.module.parameters()]
    baseline = {}
    with torch.no_grad():
        import deepspeed

        for i, p in enumerate(params):
            with deepspeed.zero.GatheredParameters([p]):
                if dist.get_rank() == 0:
                    baseline[f"p{i}"] = p.detach().clone()
                    if p.requires_grad:  # Adam's two moments: their bytes, not their values, cost here
                        baseline[f"m{i}"] = torch.zeros_like(baseline[f"p{i}"])
                        baseline[f"v{i}"] = torch.zeros_like(baseline[f"p{i}"])
    base = {}
    if dist.get_rank() == 0:
        path = work / "baseline.pt"
        t0 = time.perf_counter()
        torch.save(baseline, path)
        base["save_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.load(path, weights_only=True)
        base["load_s"] = time.perf_counter() - t0
        base["bytes"] = path.stat().st_size
        path.unlink()
    del trainer
    dist.barrier()
    t0 = time.perf_counter()
    resumed = Trainer(config(str(tag)))
    resumed.train_step()
    resume_to_first_step = time.perf_counter() - t0
    dist.barrier()
    if dist.get_rank() == 0:
        from machine import machine_info

        res = {"model": os.environ["BENCH_MODEL"], "ranks": dist.get_world_size(), "seq_len": args.seq_len,
               "checkpoint_bytes": _size(tag), "save_s": save_s, "verify_s_one_process": verify_s,
               "verified": problem is None, "fresh_start_to_first_step_s": fresh_to_first_step,
               "resume_to_first_step_s": resume_to_first_step, "torch_save_one_rank": base,
               "machine": machine_info(), "date": time.strftime("%Y-%m-%d")}
        print(f"sharded checkpoint ({dist.get_world_size()} ranks): {res['checkpoint_bytes'] / 2**20:.0f} MiB, "
              f"save {save_s:.2f} s (incl. sha256 manifest), verify {verify_s:.2f} s")
        print(f"torch.save on one rank: {base['bytes'] / 2**20:.0f} MiB, save {base['save_s']:.2f} s, "
              f"load {base['load_s']:.2f} s")
        print(f"start to first step: fresh {fresh_to_first_step:.1f} s, resumed {resume_to_first_step:.1f} s")
        out = Path(args.out) if args.out else HERE / "results" / f"checkpoint-{platform.node() or 'host'}.json"
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--work", default="runs/bench_checkpoint")
    ap.add_argument("--out", help="results JSON (default bench/results/checkpoint-<host>.json)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args)
    from reference import reference_shards

    work = Path(args.work)
    a, dirs = reference_shards(work, ("train",))
    (work / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                                              "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BENCH_MODEL": a["model"], "BENCH_SHARDS": str(dirs["train"]),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
                    f"--master_port={port}", __file__, "--worker", "--seq-len", str(args.seq_len), "--work", str(work)]
                   + (["--out", args.out] if args.out else []), check=True, env=env)


if __name__ == "__main__":
    main()

"""AST step overhead: the full AST step vs plain dense distillation, same setup, one run, 2 ranks; and the
teacher held whole on every rank (`teacher.zero: false`) against the ZeRO-3 teacher (phase `ast_replica`).

Both phases run on SmolLM2-135M (ZeRO-3 student and teacher, CPU/gloo or
GPU/NCCL, whatever DeepSpeed finds): `method: dense` (distillation, no masks,
plain AdamW) and `method: ast` (2:4 masks with STE, SR-STE decay in the optimizer
step, mask recompute every --mask-interval steps, distillation). Each phase runs
in fresh processes, one after the other, and the parent compares them: run in
the same processes, the second phase inherited the first one's memory (peak RSS
+2.5 GiB) and ran ~1.2 s/step slower whichever it was (measured: AST second
+20.0%, AST first -11.6%). Prints the mean step time of each phase, the overhead
ratio and peak RSS per rank; writes bench/results/ast_overhead-<host>.json. With `ast_replica` in --order it
also prints the replica's step time and memory against `ast`'s, and the ZeRO-3 teacher's all-gather volume
per step by arithmetic at Llama-3-8B (every parameter gathered for every micro-batch's forward).

    python bench/ast_overhead.py [--steps 10 --seq-len 128 --ranks 2 --mask-interval 10 --order dense ast]
    python bench/ast_overhead.py --order ast ast_replica --out bench/results/teacher_replica-vm.json
    python bench/ast_overhead.py --model DIR --shards DIR --ds-config ds_configs/zero3_bf16.json --ranks 1  # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _launch(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model is None:  # the reference assets, tokenized here
        from reference import reference_shards

        a, dirs = reference_shards(work, ("train",))
        args.model, args.shards = a["model"], str(dirs["train"])
    ds = json.loads(Path(args.ds_config).read_text()) if args.ds_config else {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    (work / "ds.json").write_text(json.dumps(ds))
    env = {**os.environ, "BENCH_MODEL": args.model, "BENCH_SHARDS": args.shards}
    phases = {}
    for method in args.order:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}", f"--master_port={port}",
               __file__, "--worker", "--phase", method, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
               "--mask-interval", str(args.mask_interval), "--work", str(work)]
        subprocess.run(cmd, check=True, env=env)
        phases[method] = json.loads((work / f"phase-{method}.json").read_text())
    from machine import machine_info

    for m, p in phases.items():
        print(f"{m:11s} mean step {p['mean_step_s']:.3f} s over {args.steps} steps   peak RSS per rank "
              f"{p['peak_rss_gib_per_rank']} GiB")
    result = {}
    if "dense" in phases:
        result["ratio"] = ratio = phases["ast"]["mean_step_s"] / phases["dense"]["mean_step_s"]
        print(f"AST overhead vs dense distillation: {100 * (ratio - 1):+.1f}% (ratio {ratio:.3f})")
    if "ast_replica" in phases:
        result["replica_over_zero3_step"] = r = phases["ast_replica"]["mean_step_s"] / phases["ast"]["mean_step_s"]
        gb = 2 * 8.03e9 * (64 - 1) / 64 / 1e9  # bf16 bytes a rank receives per micro-batch, 64 ranks
        result["all_gather_gb_per_micro_batch_llama3_8b_64_ranks"] = {"zero3": round(gb, 2), "replica": 0}
        print(f"replica teacher vs ZeRO-3 teacher: step time x{r:.3f}; at Llama-3-8B on 64 ranks the ZeRO-3 teacher "
              f"all-gathers {gb:.1f} GB per rank per micro-batch (2 bytes x 8.03e9 x 63/64), the replica none")
    out = Path(args.out) if args.out else HERE / "results" / f"ast_overhead-{platform.node() or 'host'}.json"
    out.write_text(json.dumps({"model": args.model, "seq_len": args.seq_len, "deepspeed": ds, "ranks": args.ranks,
                               "mask_interval": args.mask_interval, "order": args.order, "phases": phases,
                               **result, "machine": machine_info(), "date": time.strftime("%Y-%m-%d")},
                              indent=2) + "\n")
    print(f"wrote {out}")


def _worker(args) -> None:
    import torch

    from megatron_ast.training.config import DataConfig, EvalConfig, LRConfig, TeacherConfig, TrainConfig
    from megatron_ast.training.trainer import Trainer

    work = Path(args.work)
    method = args.phase.removesuffix("_replica")
    cfg = TrainConfig(model=os.environ["BENCH_MODEL"], deepspeed=str(work / "ds.json"), output_dir=str(work / args.phase),
                      data=DataConfig(train=[os.environ["BENCH_SHARDS"]], seq_len=args.seq_len), method=method,
                      teacher=TeacherConfig(zero=not args.phase.endswith("_replica")),
                      steps=args.steps + 1, mask_interval=args.mask_interval, lr=LRConfig(1e-4, 1e-5, 0),
                      eval=EvalConfig(0, 0)).validate()
    trainer = Trainer(cfg)
    trainer.train_step()  # warm-up
    times = []
    for _ in range(args.steps):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        trainer.train_step()
        torch.distributed.barrier()
        times.append(time.perf_counter() - t0)
    dev = trainer.student.device
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], device=dev)
    all_rss = [torch.zeros(1, device=dev) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(all_rss, rss)
    phase = {"mean_step_s": statistics.mean(times), "steps": times,
             "peak_rss_gib_per_rank": [round(float(r), 2) for r in all_rss]}
    if torch.cuda.is_available():
        phase["max_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if torch.distributed.get_rank() == 0:
        (work / f"phase-{args.phase}.json").write_text(json.dumps(phase, indent=2))


def main() -> None:
    from megatron_ast.training.config import TrainConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--mask-interval", type=int, default=TrainConfig.mask_interval,
                    help="steps between mask recomputes (default: the trainer's)")
    ap.add_argument("--ranks", type=int, default=2)
    phases = ["dense", "ast", "ast_replica"]
    ap.add_argument("--order", nargs="+", default=["dense", "ast"], choices=phases, help="phases, in this order")
    ap.add_argument("--phase", choices=phases, help=argparse.SUPPRESS)
    ap.add_argument("--work", default="runs/bench_ast_overhead")
    ap.add_argument("--model", help="HF model dir (default: the reference SmolLM2-135M)")
    ap.add_argument("--shards", help="token-shard dir made with the model's tokenizer (with --model)")
    ap.add_argument("--ds-config", help="DeepSpeed JSON (default: ZeRO-3 fp32, micro batch 1)")
    ap.add_argument("--out", help="results JSON (default bench/results/ast_overhead-<host>.json)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    _worker(args) if args.worker else _launch(args)


if __name__ == "__main__":
    main()

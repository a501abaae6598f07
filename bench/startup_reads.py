"""Bytes each rank reads at the trainer's start-up from a one-shot pruned dir, on 2 CPU ranks: SmolLM2-135M
pruned 2:4 by magnitude, `pruned_values: dense` (the masks and the dense values under them), with and without
SLoRB (which all-gathers the ranks' mask slices to start S).

The trainer counts what it reads (`summary.json: startup_read_bytes_per_rank`). Before (f1113f1) every rank
read every decoder Linear's whole mask and whole dense weight: that figure is the sum of those tensors'
bytes in the two files, the same on every rank. Writes bench/results/startup_reads-<name>.json.

    python bench/startup_reads.py [--name vm]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from machine import write_result  # noqa: E402


def main() -> None:
    import yaml
    from safetensors import safe_open

    from reference import reference_shards

    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="vm")
    ap.add_argument("--work", default="runs/bench_startup_reads")
    ap.add_argument("--ranks", type=int, default=2)
    a = ap.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    assets, dirs = reference_shards(work, ("train",))
    pruned = work / "pruned"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    if not pruned.is_dir():
        subprocess.run([sys.executable, "-m", "megatron_ast.cli", "prune", "--model", assets["model"], "--method",
                        "magnitude", "--pattern", "2:4", "--out", str(pruned), "--device", "cpu"], check=True, env=env)
    with safe_open(str(pruned / "masks.safetensors"), framework="pt") as h:
        names = list(h.keys())
        mask_bytes = sum(h.get_tensor(k).numel() for k in names)  # bool: 1 byte per element
    with safe_open(str(Path(assets["model"]) / "model.safetensors"), framework="pt") as h:
        dense_bytes = sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in names)
    before = mask_bytes + dense_bytes
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
          "steps_per_print": 10**9}
    (work / "ds.json").write_text(json.dumps(ds))
    rows = {}
    for label, slorb in (("no_slorb", None), ("slorb", {"group": 16, "init": "mean"})):
        cfg = {"model": assets["model"], "init": str(pruned), "pruned_values": "dense", "deepspeed": str(work / "ds.json"),
               "output_dir": str(work / label), "data": {"train": [str(dirs["train"])], "seq_len": 64}, "steps": 1,
               "lr": {"peak": 0.0, "min": 0.0, "warmup": 0}, "eval": {"every": 0, "windows": 1}, "slorb": slorb,
               "method": "naive"}
        path = work / f"{label}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        subprocess.run(["rm", "-rf", str(work / label)], check=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.ranks}",
                        f"--master_port={port}", "-m", "megatron_ast.cli", "train", "--config", str(path)],
                       check=True, env=env, capture_output=True)
        reads = json.loads((work / label / "summary.json").read_text())["startup_read_bytes_per_rank"]
        rows[label] = {"after_per_rank": reads, "before_per_rank": before, "after_over_before": max(reads) / before}
        print(f"{label}: each rank read {[f'{r / 2**20:.1f}' for r in reads]} MiB, before {before / 2**20:.1f} MiB "
              f"each ({max(reads) / before:.3f} of it)")
    write_result("startup_reads", a.name, {"command": " ".join(["python", "bench/startup_reads.py", *sys.argv[1:]]),
                                           "ranks": a.ranks, "masks_bytes": mask_bytes, "dense_linear_bytes": dense_bytes,
                                           "results": rows})


if __name__ == "__main__":
    main()

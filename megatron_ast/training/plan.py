"""`megatron-ast train --dry-run`: what a run would be, without starting it.

The world as the launcher gave it (torchrun/deepspeed, Slurm, or MPI environment
variables; `--world-size`/`--nodes` to plan for another), the batch arithmetic from
the user's DeepSpeed JSON, and DeepSpeed's ZeRO-3 estimate of model-state memory
for the student (params counted on the meta device: nothing is loaded), plus what
AST adds beside it: the frozen teacher and the masks, each partitioned like the
student's parameters.
"""
from __future__ import annotations

import os

import torch

from megatron_ast.errors import UsageError
from megatron_ast.training.config import TrainConfig, load_ds_config

# (world size, rank, local world size, nodes) environment variables, by launcher
_LAUNCHERS = {
    "torchrun/deepspeed": ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"),
    "slurm": ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES"),
    "openmpi": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", None),
    "mpich/hydra": ("PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS", None),
}


def resolve_world(world_size: int | None = None, nodes: int | None = None) -> dict:
    """World size, nodes and processes per node: from the arguments, else from the launcher's environment."""
    found = {"launcher": "none (a single process)", "world_size": 1, "rank": 0, "per_node": 1, "nodes": 1}
    for name, (size, rank, local, n) in _LAUNCHERS.items():
        if size in os.environ:
            w = int(os.environ[size])
            per_node = int(os.environ[local].split("(")[0]) if local and local in os.environ else w
            found = {"launcher": name, "world_size": w, "rank": int(os.environ.get(rank, 0)), "per_node": per_node,
                     "nodes": int(os.environ[n]) if n and n in os.environ else max(1, w // per_node)}
            break
    if world_size is not None:
        nodes = nodes or 1
        if world_size % nodes:
            raise UsageError(f"--world-size {world_size} is not divisible by --nodes {nodes}")
        found = {"launcher": "--world-size", "world_size": world_size, "rank": 0, "per_node": world_size // nodes,
                 "nodes": nodes}
    return found


def _param_counts(model_dir: str) -> tuple[int, int, int]:
    """(total params, largest module's own params, params of the decoder Linears AST masks), on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_ast.training.engines import decoder_linears

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    masked = sum(m.weight.numel() for m in decoder_linears(model).values())
    return total, largest, masked


def plan(cfg: TrainConfig, world_size: int | None = None, nodes: int | None = None) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    world = resolve_world(world_size, nodes)
    ds = load_ds_config(cfg.deepspeed, world["world_size"])
    micro, gas = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    global_batch = micro * gas * world["world_size"]
    total, largest, masked = _param_counts(cfg.student_dir)
    zero = ds.get("zero_optimization", {})
    offload_opt = zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    offload_param = zero.get("offload_param", {}).get("device") in ("cpu", "nvme")
    cpu_mem, gpu_mem, _ = estimate_zero3_model_states_mem_needs(
        total, largest, world["per_node"], world["nodes"], cpu_offload=offload_opt, cpu_offload_params=offload_param)
    bytes_per = 2 if ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled") else 4
    gib = lambda b: float(f"{b / 2**30:.4g}")  # noqa: E731
    per_rank = lambda n: gib(n * bytes_per / world["world_size"])  # noqa: E731
    return {
        "world": world,
        "batch": {"micro_batch_per_rank": micro, "grad_accum": gas, "global_batch": global_batch,
                  "tokens_per_step": global_batch * cfg.data.seq_len, "steps": cfg.steps,
                  "tokens_total": global_batch * cfg.data.seq_len * cfg.steps},
        "model": {"dir": cfg.student_dir, "params": total, "largest_layer_params": largest, "masked_params": masked},
        "memory_gib": {
            "student_model_states_per_gpu (DeepSpeed estimate)": gib(gpu_mem),
            "student_model_states_cpu_per_node (DeepSpeed estimate)": gib(cpu_mem),
            "teacher_params_per_rank": per_rank(total) if cfg.method in ("ast", "dense")
            and (cfg.distill.w_kl > 0 or cfg.distill.w_sq > 0) else 0.0,
            # current + initial mask slices (bool) beside the partitions; the optimizer's SR-STE indicator
            # (fp32 decay factor + bool) where the fp32 master lives
            "masks_per_rank": gib(2 * masked / world["world_size"]) if cfg.method != "dense" else 0.0,
            "srste_indicator_per_rank": gib(5 * masked / world["world_size"]) if cfg.method != "dense" else 0.0,
        },
        "offload": {"optimizer": offload_opt, "params": offload_param},
    }

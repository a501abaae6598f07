"""`megatron-ast train --dry-run`: what a run would be, without starting it.

The world as the launcher gave it (torchrun/deepspeed, Slurm, or MPI environment
variables; `--world-size`/`--nodes` to plan for another), the batch arithmetic from
the user's DeepSpeed JSON, and the memory each rank holds for the run's model states,
part by part (params counted on the meta device: nothing is loaded): the student's
ZeRO-3 partitions, what AST adds beside them (SR-STE indicator, masks) and the frozen
teacher, each partitioned like the student; DeepSpeed's own estimate beside it.
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


def param_counts(config, ignore: tuple[str, ...] = ()) -> tuple[int, int, int]:
    """(total params, largest module's own params, params of the sparse weights AST masks but those `ignore`
    names) of a transformers config, counted on the meta device: nothing is allocated, so a 70B config costs
    nothing. An MoE's experts are counted whole; its largest module is a layer's fused experts, which ZeRO-3
    gathers whole."""
    from transformers import AutoModelForCausalLM

    from megatron_ast.sparsity.sparse_weights import sparse_weights

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    masked = sum(w.numel for w in sparse_weights(model, ignore))
    return total, largest, masked


def memory_per_rank(total: int, largest: int, masked: int, world: int, bf16: bool = True, offload_optimizer: bool = False,
                    offload_params: bool = False, teacher: bool = True, sparse: bool = True,
                    sub_group_size: int = 10**9) -> dict:
    """Bytes one rank holds for the run's model states, by part and by where it lives (what DeepSpeed ZeRO-3
    stage 3 and our hooks allocate; activations and the CUDA context are not counted):

    student: 16-bit (or fp32) working partition; gradient partition in the same dtype (DeepSpeed's
    grad_partitions_flat_buffer); fp32 master and Adam's two moments; the fp32 gradient of one optimizer
    sub-group while it steps (at most `sub_group_size` elements); the largest layer gathered with its
    gradient. AST: the SR-STE indicator (int8, one per element of the master) and the current + initial
    mask slices (bool) live beside the master. Teacher: its own partition, no optimizer."""
    bw = 2 if bf16 else 4
    part, part_masked = -(-total // world), -(-masked // world)
    master_on = "cpu" if offload_optimizer else "gpu"
    params_on = "cpu" if offload_params else "gpu"
    parts = {  # name: (bytes, where)
        "student_working_params": (bw * part, params_on),
        "student_grad_partition": (bw * part, master_on),
        "student_fp32_master": (4 * part, master_on),
        "student_adam_moments": (8 * part, master_on),
        "student_fp32_grad_of_one_subgroup": (4 * min(part, sub_group_size), master_on),
        "gathered_largest_layer_and_grad": (2 * bw * largest, "gpu"),
        "srste_indicator_int8": (part if sparse else 0, master_on),
        "masks_current_and_initial": (2 * part_masked if sparse else 0, master_on),
        "teacher_params": (bw * part if teacher else 0, params_on),
    }
    states = [k for k in parts if k.startswith(("student_", "gathered_"))]
    return {"parts": {k: {"bytes": b, "on": on} for k, (b, on) in parts.items()},
            "student_model_states_gpu": sum(parts[k][0] for k in states if parts[k][1] == "gpu"),
            "gpu": sum(b for b, on in parts.values() if on == "gpu"),
            "cpu": sum(b for b, on in parts.values() if on == "cpu")}


def working_memory(config, micro: int, seq_len: int, bf16: bool = True, checkpointing: bool = False,
                   teacher: bool = True) -> dict[str, int]:
    """Bytes one GPU holds for one micro-batch's forward and backward beyond the model states, per part.

    Assumptions (a Llama-shaped decoder, as transformers runs it with SDPA/flash attention: no s x s scores
    kept):
      - activations saved for the backward, per token and layer, in the run's dtype: the two RMSNorms' inputs
        and outputs (4h), q and the attention output (2h), k and v (2 h_kv), the o_proj input (h), and the
        MLP's gate, up, SiLU(gate) and their product (4i): 7h + 2 h_kv + 4i elements (an MoE layer's MLP part:
        `mlp_elements`). With
        activation_checkpointing only each layer's input (h) is kept, and one layer is recomputed at a time;
      - the student's and the teacher's logits and the loss's gradient (3 x tokens x vocabulary in the run's
        dtype), plus the chunked loss's working set (training/distillation.py: 8 chunks of CHUNK_BYTES,
        measured 0.5 GiB at 128k vocabulary by bench/loss_memory.py);
      - the teacher's forward (no_grad) keeps one layer's outputs at a time: 2 x tokens x hidden."""
    from megatron_ast.training.distillation import CHUNK_BYTES

    bw = 2 if bf16 else 4
    tokens = micro * seq_len
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = h // config.num_attention_heads * getattr(config, "num_key_value_heads", config.num_attention_heads)
    per_layer = [(7 * h + 2 * kv + mlp) * tokens * bw for mlp in mlp_elements(config)]
    acts = layers * tokens * h * bw + max(per_layer) if checkpointing else sum(per_layer)
    return {"activations": acts,
            "logits_and_loss": 3 * tokens * config.vocab_size * bw + 8 * CHUNK_BYTES,
            "teacher_forward": 2 * tokens * h * bw if teacher else 0}


def mlp_elements(config) -> list[int]:
    """Per decoder layer, the MLP's activations kept per token: gate, up, SiLU(gate) and their product, 4i. An
    MoE layer keeps them for each of its top-k experts (width moe_i) and its shared experts, plus each routed
    copy of the token's state and each expert's output (2 k h), the sum of the experts' outputs (h) and the
    router's logits and scores (2E). Dense first layers (DeepSeek-V3's first_k_dense_replace) and MoE layer
    frequencies (decoder_sparse_step) are followed. A gate heavier than SwiGLU keeps more: gpt-oss's clamped
    one 1.6x this MoE part (tests/training/test_plan.py)."""
    layers, dense, h = config.num_hidden_layers, config.intermediate_size, config.hidden_size
    experts = next((getattr(config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                    if getattr(config, k, None)), 0)
    if not experts:
        return [4 * dense] * layers
    k, moe = config.num_experts_per_tok, getattr(config, "moe_intermediate_size", None) or dense
    shared = (getattr(config, "n_shared_experts", None) or 0) * moe + (getattr(config, "shared_expert_intermediate_size",
                                                                                None) or 0)
    routed = 4 * k * moe + 2 * k * h + h + 2 * experts + 4 * shared
    first_dense = getattr(config, "first_k_dense_replace", None) or 0
    step = getattr(config, "decoder_sparse_step", None) or 1
    return [4 * dense if i < first_dense or (i + 1) % step else routed for i in range(layers)]


def deepspeed_estimate(total: int, largest: int, per_node: int, nodes: int, offload_optimizer: bool,
                       offload_params: bool) -> dict:
    """DeepSpeed's own ZeRO-3 model-state estimate (per GPU, and CPU per node), for comparison."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, per_node, nodes, cpu_offload=offload_optimizer,
                                                        cpu_offload_params=offload_params)
    return {"gpu": gpu, "cpu_per_node": cpu}


def gpus_needed(total: int, largest: int, masked: int, gpu_gib: float = 80.0, reserve_gib: float = 16.0,
                offload: bool = False, per_node: int = 8, cpu_node_gib: float = 1024.0) -> int:
    """The fewest GPUs (whole nodes of `per_node`) whose per-rank model states fit `gpu_gib` less `reserve_gib`
    (activations, the CUDA context, allocator slack) and, offloaded, whose node's ranks fit `cpu_node_gib`."""
    world = per_node
    while world < 2**20:
        mem = memory_per_rank(total, largest, masked, world, offload_optimizer=offload, offload_params=offload)
        if mem["gpu"] <= (gpu_gib - reserve_gib) * 2**30 and mem["cpu"] * per_node <= cpu_node_gib * 2**30:
            return world
        world += per_node
    raise UsageError(f"{total:,} parameters do not fit any world size")


def plan(cfg: TrainConfig, world_size: int | None = None, nodes: int | None = None, gpu_gib: float | None = 80.0) -> dict:
    """The dry run's report; `gpu_gib`: the memory of the GPUs planned for (None: CPU ranks)."""
    from transformers import AutoConfig

    world = resolve_world(world_size, nodes)
    ds = load_ds_config(cfg.deepspeed, world["world_size"])
    micro, gas = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    global_batch = micro * gas * world["world_size"]
    model_config = AutoConfig.from_pretrained(cfg.student_dir, local_files_only=True)
    total, largest, masked = param_counts(model_config, tuple(cfg.ignore))
    zero = ds.get("zero_optimization", {})
    offload_opt = zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    offload_param = zero.get("offload_param", {}).get("device") in ("cpu", "nvme")
    bf16 = bool(ds.get("bf16", {}).get("enabled"))
    teacher = cfg.method in ("ast", "dense") and (cfg.distill.w_kl > 0 or cfg.distill.w_sq > 0)
    teacher_zero3 = cfg.teacher_on_zero3(total * (2 if bf16 else 4), int(gpu_gib * 2**30) if gpu_gib else None)
    mem = memory_per_rank(total, largest, masked, world["world_size"], bf16, offload_opt, offload_param, teacher,
                          cfg.method != "dense", int(zero.get("sub_group_size", 10**9)))
    if teacher and not teacher_zero3:  # a whole replica instead of a partition
        mem["parts"]["teacher_params"] = {"bytes": total * (2 if bf16 else 4), "on": "gpu"}
    work = working_memory(model_config, micro, cfg.data.seq_len, bf16, cfg.activation_checkpointing, teacher)
    for k, b in work.items():
        mem["parts"][k] = {"bytes": b, "on": "gpu"}
    mem["gpu"] = sum(v["bytes"] for v in mem["parts"].values() if v["on"] == "gpu")
    mem["cpu"] = sum(v["bytes"] for v in mem["parts"].values() if v["on"] == "cpu")
    est = deepspeed_estimate(total, largest, world["per_node"], world["nodes"], offload_opt, offload_param)
    gib = lambda b: float(f"{b / 2**30:.4g}")  # noqa: E731
    return {
        "world": world,
        "batch": {"micro_batch_per_rank": micro, "grad_accum": gas, "global_batch": global_batch,
                  "tokens_per_step": global_batch * cfg.data.seq_len, "steps": cfg.steps,
                  "tokens_total": global_batch * cfg.data.seq_len * cfg.steps},
        "model": {"dir": cfg.student_dir, "params": total, "largest_layer_params": largest, "masked_params": masked},
        "memory_gib_per_rank": {**{k: gib(v["bytes"]) for k, v in mem["parts"].items()},
                                "gpu_total": gib(mem["gpu"]), "cpu_total": gib(mem["cpu"])},
        "deepspeed_estimate_gib": {"student_model_states_per_gpu": gib(est["gpu"]),
                                   "student_model_states_cpu_per_node": gib(est["cpu_per_node"]),
                                   "ours_over_deepspeed": round(mem["student_model_states_gpu"] / est["gpu"], 3)},
        "offload": {"optimizer": offload_opt, "params": offload_param},
        "teacher": None if not teacher else {
            "held_as": "zero3" if teacher_zero3 else "replica",
            "why": f"teacher.zero {cfg.teacher.zero!r}" + (
                f": {gib(total * (2 if bf16 else 4))} GiB against {cfg.teacher.replica_max_fraction:g} of a "
                f"{gpu_gib:g} GiB GPU" if cfg.teacher.zero == "auto" and gpu_gib else ""),
            "all_gather_gib_per_step": gib(0 if not teacher_zero3 else
                                           total * (2 if bf16 else 4) * gas * (world["world_size"] - 1) / world["world_size"])},
        "activation_checkpointing": cfg.activation_checkpointing,
        "fits": None if not gpu_gib else (
            "yes" if mem["gpu"] <= gpu_gib * 2**30 else
            f"no: {gib(mem['gpu'])} GiB per rank on a {gpu_gib:g} GiB GPU"
            + ("" if cfg.activation_checkpointing else "; activation_checkpointing: true keeps one input per layer")),
        "assumptions": "activations, logits and loss, teacher forward: plan.working_memory's docstring; "
                       "not counted: the CUDA context, NCCL buffers, allocator fragmentation",
    }

"""Student and teacher as DeepSpeed ZeRO-3 engines, built from Hugging Face model dirs.

Both models are constructed partitioned (transformers' ZeRO-3 path builds them
inside `deepspeed.zero.Init`), so no rank ever holds a whole model. The student's
decoder Linears become SparseLinears one at a time, each weight gathered only
while its mask (and SLoRB) is made; each rank keeps only its partition's slice
of the mask (training/mask_partitions.py). The teacher is a second engine with no
optimizer, frozen and in eval mode, fed the same micro-batch (as DeepSpeed-Chat
runs its reference model beside the actor).
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_ast import distributed
from megatron_ast.errors import UsageError
from megatron_ast.modeling import check_model_dir
from megatron_ast.sparsity.masks import nm_mask
from megatron_ast.sparsity.slorb import SLoRBConfig
from megatron_ast.sparsity.sparse_linear import sparsify_module_
from megatron_ast.training.mask_partitions import local_mask


def load_zero3(model_dir: str | Path, ds_config: dict, dtype: torch.dtype):
    """A partitioned HF causal LM (each rank holds 1/world of every parameter)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.utils import logging

    logging.disable_progress_bar()
    check_model_dir(model_dir)
    keep_alive = HfDeepSpeedConfig(ds_config)  # tells transformers to build under zero.Init  # noqa: F841
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)


def decoder_linears(model) -> dict:
    from megatron_ast.pruning.architectures import architecture_of

    arch = architecture_of(model)
    out = {}
    for i, layer in enumerate(arch.layers(model)):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                out[f"{arch.layers_path}.{i}.{name}"] = mod
    return out


@torch.no_grad()
def input_norms_zero3(engine, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every decoder Linear's inputs over all ranks' `batches` (Wanda's input norms).

    Runs `engine` (a ZeRO-3 engine of the dense model) forward on this rank's batches; every rank
    must pass the same number of batches (ZeRO-3's gathers are collective). The sums of squares
    are all-reduced, so every rank returns the same norms.
    """
    sq: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().float()
            sq[name] = sq.get(name, 0) + (x.reshape(-1, x.shape[-1]) ** 2).sum(0)
        return record

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in decoder_linears(engine.module).items()]
    was_training = engine.training
    engine.eval()
    try:
        for x in batches:
            engine(input_ids=x.to(engine.device))
    finally:
        for h in handles:
            h.remove()
        engine.train(was_training)
    for name in sorted(sq):  # the same order on every rank
        distributed.all_reduce_(sq[name])
    return {name: v.sqrt().cpu() for name, v in sq.items()}


def initial_mask(name: str, weight: torch.Tensor, n: int, m: int, stored=None, reader=None, dense: bool = False,
                 input_norms: dict[str, torch.Tensor] | None = None, masks_file=None, dense_values=None) -> torch.Tensor:
    """The starting mask of one (gathered) decoder weight, on the weight's device: the stored one (a safe_open
    handle of masks.safetensors; with `reader`, the dense values go under its pruned positions), all ones
    (`dense`), Wanda's (`input_norms`) or magnitude's."""
    if stored is not None:
        if f"{name}.weight" not in stored.keys():
            raise UsageError(f"{masks_file} has no mask for {name}: was it pruned from this model?")
        mask = stored.get_tensor(f"{name}.weight").to(weight.device, torch.bool)
        if mask.shape != weight.shape:
            raise UsageError(f"{masks_file}: the mask of {name} is {tuple(mask.shape)}, the weight "
                             f"{tuple(weight.shape)}: was it pruned from this model?")
        if reader is not None:
            values = reader.get(f"{name}.weight")
            if values.shape != weight.shape:
                raise UsageError(f"{dense_values}: {name}.weight is {tuple(values.shape)}, the pruned model's "
                                 f"{tuple(weight.shape)}: give the dense model the pruned dir was made from")
            weight.data.copy_(torch.where(mask, weight.data, values.to(weight.device, weight.dtype)))
        return mask
    if dense:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    score = weight.detach().float().abs()
    if input_norms is not None:
        score = score * input_norms[name].to(score.device)
    return nm_mask(score, n, m)


def sparsify_zero3_(model, n: int, m: int, masks_file: str | Path | None = None, slorb: SLoRBConfig | None = None,
                    input_norms: dict[str, torch.Tensor] | None = None, dense: bool = False,
                    dense_values: str | Path | None = None,
                    fitted_s: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Make every decoder Linear sparse; returns this rank's mask slices (for PartitionedMasks). Masks: from
    `masks_file` (a one-shot pruned dir's), else by Wanda when `input_norms` are given, else by magnitude;
    `dense` starts with all-ones masks (gmp). `dense_values`: the dense model dir whose values the weights
    under a stored mask's pruned positions take (kept ones stay the pruned dir's reconstruction), so the
    forward is the one-shot model's while SLoRB's init, SR-STE and regrowth see the dense weights.
    `fitted_s`: SLoRB's S by Linear name, for `slorb.init: fitted` (the pruned dir's adapter)."""
    import deepspeed

    from megatron_ast.modeling import WeightReader

    stored = None
    if masks_file is not None:
        from safetensors import safe_open

        stored = safe_open(str(masks_file), framework="pt")
    reader = WeightReader(dense_values) if dense_values is not None and stored is not None else None
    local = {}
    for name, mod in decoder_linears(model).items():
        # all ranks compute the same weight; rank 0's is re-partitioned when it was changed
        with deepspeed.zero.GatheredParameters([mod.weight], modifier_rank=0 if reader is not None else None):
            if mod.weight.shape[1] % m:
                raise UsageError(f"{name}: in_features {mod.weight.shape[1]} is not a multiple of M={m}")
            mask = initial_mask(name, mod.weight, n, m, stored, reader, dense, input_norms, masks_file, dense_values)
            if fitted_s is not None and name not in fitted_s:
                raise UsageError(f"slorb init fitted: the pruned dir's adapter has no branch for {name}: "
                                 "prune with --slorb-group")
            sparsify_module_(mod, mask, slorb, name, hold_mask=False,
                             fitted_s=fitted_s[name] if fitted_s is not None else None)
            local[name] = local_mask(mask, mod.weight)
    return local

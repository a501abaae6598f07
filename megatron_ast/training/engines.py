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

from megatron_ast import distributed, hf_layout
from megatron_ast.errors import UsageError
from megatron_ast.modeling import check_model_dir
from megatron_ast.sparsity.masks import nm_mask
from megatron_ast.sparsity.slorb import SLoRBConfig
from megatron_ast.sparsity.sparse_linear import sparsify_module_
from megatron_ast.sparsity.sparse_weights import SparseWeight, sparse_weights
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


def masked_weights(model, ignore: tuple[str, ...] = ()) -> list[SparseWeight]:
    """What AST masks: the model's sparse weights (Linears and fused experts) but those `ignore` names."""
    out = []
    for w in sparse_weights(model, ignore):
        if not w.is_linear and not w.experts:
            raise UsageError(f"train: {w.name} is a GPT-2 Conv1D, stored (in, out), which AST does not mask: add it "
                             "to the run's `ignore` list, or prune the model one-shot")
        out.append(w)
    return out


def decoder_linears(model, ignore: tuple[str, ...] = ()) -> dict:
    """The Linears AST masks, by module name (the rest of its masked weights are fused experts)."""
    return {w.module: model.get_submodule(w.module) for w in masked_weights(model, ignore) if w.is_linear}


@torch.no_grad()
def input_norms_zero3(engine, batches: list[torch.Tensor], ignore: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every decoder Linear's inputs over all ranks' `batches` (Wanda's input norms).

    Runs `engine` (a ZeRO-3 engine of the dense model, or a whole replica of it) forward on this rank's batches; every rank
    must pass the same number of batches (ZeRO-3's gathers are collective). The sums of squares
    are all-reduced, so every rank returns the same norms.
    """
    sq: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach().float()
            sq[name] = sq.get(name, 0) + (x.reshape(-1, x.shape[-1]) ** 2).sum(0)
        return record

    model = getattr(engine, "module", engine)  # DeepSpeed's engine wraps the model
    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in decoder_linears(model, ignore).items()]
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


def initial_mask(w: SparseWeight, weight: torch.Tensor, n: int, m: int, dense: bool = False,
                 input_norms: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The starting mask of one gathered sparse weight made from it, shaped like it, on its device: all ones
    (`dense`), Wanda's (`input_norms`, by Linear) or magnitude's, N:M along each matrix's inputs. (A stored mask
    is read slice by slice: `_stored_slice`.)"""
    if dense:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    score = w.matrices(weight.detach()).float().abs()
    if input_norms is not None:
        score = score * input_norms[w.module].to(score.device)
    keep = nm_mask(score.reshape(-1, w.in_features), n, m).view(score.shape)
    return w.stored(keep.view(w.out_in(weight).shape)).contiguous()


def _partition_range(weight) -> tuple[int, int]:
    """[start, stop) of the flattened weight that this rank's ZeRO-3 partition holds (padding excluded)."""
    ps = weight.partition_numel()
    start = torch.distributed.get_rank() * ps
    return start, max(start, min(weight.ds_numel, start + ps))


def _stored_slice(stored, masks_file, key: str, weight, reader, dense_values) -> tuple[torch.Tensor, int]:
    """This rank's slice of a stored mask (the weight `key`'s, stored as the model holds it), read alone; with
    `reader`, the dense values under its pruned positions go straight into the partition (no gather). Returns the
    slice and the bytes read."""
    from megatron_ast.modeling import read_flat

    name = key.removesuffix(".weight")
    if key not in stored.keys():
        raise UsageError(f"{masks_file} has no mask for {name}: was it pruned from this model?")
    shape = tuple(weight.ds_shape)
    if tuple(stored.get_slice(key).get_shape()) != shape:
        raise UsageError(f"{masks_file}: the mask of {name} is {tuple(stored.get_slice(key).get_shape())}, the weight "
                         f"{shape}: was it pruned from this model?")
    start, stop = _partition_range(weight)
    mask, n = read_flat(stored, key, start, stop)
    mask = mask.to(weight.ds_tensor.device, torch.bool)
    if reader is not None:
        if reader.shape(key) != shape:
            raise UsageError(f"{dense_values}: {key} is {reader.shape(key)}, the pruned model's {shape}: give the "
                             "dense model the pruned dir was made from")
        part = weight.ds_tensor.data[: stop - start]
        values = reader.flat(key, start, stop).to(part.device, part.dtype)
        part.copy_(torch.where(mask, part, values))
    return mask, n


def _stored_converted(model, stored, masks_file, w: SparseWeight, weight, reader) -> tuple[torch.Tensor, int]:
    """This rank's slice of a fused expert weight's mask that the dir stores per expert (transformers' stored
    layout: `experts.{e}.gate_proj.weight` ...): only the experts its partition overlaps are read and converted,
    one at a time; with `reader`, the dense values under its pruned positions go into the partition. Returns the
    slice and the bytes read."""
    keys = list(hf_layout.to_stored(model, {w.name: torch.empty(w.shape, dtype=torch.bool, device="meta")}))
    if missing := [k for k in keys if k not in stored.keys()]:
        raise UsageError(f"{masks_file} has no mask {missing[0]} ({len(missing)} of {w.name}'s {len(keys)}): was it "
                         "pruned from this model?")
    per = w.numel // w.experts
    start, stop = _partition_range(weight)
    mask = torch.zeros(stop - start, dtype=torch.bool)
    values = torch.zeros(stop - start) if reader is not None else None
    read = 0
    for e in range(start // per, (stop - 1) // per + 1) if stop > start else ():
        mine = [k for k in keys if f".experts.{e}." in k]  # the expert's own stored tensors
        if not mine:
            raise UsageError(f"{masks_file}: {w.name} is stored as {keys[:2]}..., not one set of tensors per expert: "
                             "this layout is unknown here")
        one = hf_layout.to_model(model, {k: stored.get_tensor(k) for k in mine})[w.name]
        if tuple(one.shape) != (1, *w.shape[1:]):
            raise UsageError(f"{masks_file}: expert {e} of {w.name} is {tuple(one.shape)[1:]}, the weight's "
                             f"{w.shape[1:]}: was it pruned from this model?")
        lo, hi = max(start, e * per), min(stop, (e + 1) * per)
        mask[lo - start : hi - start] = one.reshape(-1)[lo - e * per : hi - e * per]
        read += one.numel()
        if reader is not None:
            dense = {k: reader.get(k) for k in mine}
            values[lo - start : hi - start] = hf_layout.to_model(model, dense)[w.name].reshape(-1)[lo - e * per : hi - e * per]
            read += sum(t.numel() * t.element_size() for t in dense.values())
    mask = mask.to(weight.ds_tensor.device)
    if values is not None:
        part = weight.ds_tensor.data[: stop - start]
        part.copy_(torch.where(mask, part, values.to(part.device, part.dtype)))
    return mask, read


def _whole(local: torch.Tensor, weight) -> torch.Tensor:
    """The full mask from every rank's slice (all-gathered: the network, not the file system, serves it)."""
    ps = weight.partition_numel()
    padded = torch.zeros(ps, dtype=torch.bool, device=local.device)
    padded[: local.numel()] = local
    flat = torch.cat(distributed.all_gather(padded.to(torch.uint8)))[: weight.ds_numel].bool()
    return flat.reshape(tuple(weight.ds_shape))


def sparsify_zero3_(model, n: int, m: int, masks_file: str | Path | None = None, slorb: SLoRBConfig | None = None,
                    input_norms: dict[str, torch.Tensor] | None = None, dense: bool = False,
                    dense_values: str | Path | None = None,
                    fitted_s: dict[str, torch.Tensor] | None = None,
                    ignore: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor | None], int]:
    """Make every sparse weight of the model sparse (Linears become SparseLinears; a fused expert parameter needs
    no new module: its working partitions are kept W*M); returns this rank's mask slices (for PartitionedMasks;
    None for an expert weight whose magnitude mask PartitionedMasks makes from the master partitions, with no
    gather of the whole fused tensor) and the bytes it read of the masks and dense values. SLoRB branches go on
    the Linears only. Masks: from `masks_file` (a one-shot pruned dir's: each rank reads only
    the rows its partition overlaps), else by Wanda when `input_norms` are given, else by magnitude; `dense`
    starts with all-ones masks (gmp). `dense_values`: the dense model dir whose values the weights under a
    stored mask's pruned positions take (kept ones stay the pruned dir's reconstruction), so the forward is the
    one-shot model's while SLoRB's init, SR-STE and regrowth see the dense weights. `fitted_s`: SLoRB's S by
    Linear name, for `slorb.init: fitted`. `ignore`: regexes of weights left dense. SLoRB's parameters are
    partitioned as each is made."""
    import deepspeed

    from megatron_ast.modeling import WeightReader

    stored = None
    if masks_file is not None:
        from safetensors import safe_open

        from megatron_ast.modeling import check_safetensors

        check_safetensors(masks_file)
        stored = safe_open(str(masks_file), framework="pt")
    reader = WeightReader(dense_values) if dense_values is not None and stored is not None else None
    local, read = {}, 0
    for sw in masked_weights(model, ignore):
        if sw.in_features % m:
            raise UsageError(f"{sw.name}: in_features {sw.in_features} is not a multiple of M={m}")
        w = model.get_parameter(sw.name)
        if sw.experts:  # the experts module computes with the working partitions, which are kept W*M
            if input_norms is not None:
                raise UsageError(f"init wanda: {sw.name} is a fused expert weight, whose per-expert input norms the "
                                 "trainer does not gather: prune one-shot with --method wanda (per-expert inputs) and "
                                 "init from that dir, or use init magnitude")
            if stored is not None and sw.name in stored.keys():
                local[sw.name], nbytes = _stored_slice(stored, masks_file, sw.name, w, reader, dense_values)
                read += nbytes
            elif stored is not None:
                local[sw.name], nbytes = _stored_converted(model, stored, masks_file, sw, w, reader)
                read += nbytes
            elif dense:
                start, stop = _partition_range(w)
                local[sw.name] = torch.ones(stop - start, dtype=torch.bool, device=w.ds_tensor.device)
            else:  # magnitude, made by PartitionedMasks from each rank's master partition: nothing is gathered
                local[sw.name] = None
            continue
        name, mod = sw.module, model.get_submodule(sw.module)
        if fitted_s is not None and name not in fitted_s:
            raise UsageError(f"slorb init fitted: the pruned dir's adapter has no branch for {name}: "
                             "prune with --slorb-group")
        if stored is not None:
            local[name], nbytes = _stored_slice(stored, masks_file, sw.name, w, reader, dense_values)
            read += nbytes
            if slorb is None:
                sparsify_module_(mod, None, None, name, hold_mask=False)
                continue
            mask = _whole(local[name], w)
        with deepspeed.zero.GatheredParameters([w]):
            if stored is None:
                mask = initial_mask(sw, w, n, m, dense, input_norms)
                local[name] = local_mask(mask, w)
            sparsify_module_(mod, mask, slorb, name, hold_mask=False,
                             fitted_s=fitted_s[name] if fitted_s is not None else None)
        if mod.slorb is not None:  # partitioned now, by the Init that made the student, not whole until initialize
            w.convert_to_zero_parameters(list(mod.slorb.parameters()))
    return local, read + (reader.bytes_read if reader is not None else 0)

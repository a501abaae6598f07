"""A model's tensors on disk against its parameters in memory, through transformers' own conversions.

transformers 5 loads some families in another layout than they are stored in: Qwen3-MoE's and
DeepSeek-V3's per-expert `experts.{e}.gate_proj.weight` files become one fused
`experts.gate_up_proj` parameter, Mixtral's `block_sparse_moe.experts.{e}.w1` too, GPT-NeoX's
`embed_out` becomes `lm_head`; `save_pretrained` writes the stored layout back. Whatever streams a
model one layer at a time (prune, export) reads and writes with these two functions, so its output
has the keys `save_pretrained` writes and its masks the same keys. Both take any subset of a
state dict (one decoder layer), and both are transformers' own code paths (loading's renaming and
converters, and `revert_weight_conversion`), so a family transformers converts is converted here
the same way.
"""
from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn


def conversions(model: nn.Module) -> list:
    """The transforms transformers applies when it loads `model`'s family (none for most dense models)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    found = getattr(model, "_weight_conversions", None)
    if found is None:
        found = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    return list(found or [])


def to_model(model: nn.Module, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stored tensors (any subset of a checkpoint: one layer's) -> the model's parameters they make, by name."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    convs = conversions(model)
    names = dict(model.named_parameters(remove_duplicate=False))
    names.update(dict(model.named_buffers()))
    if not convs:
        return {_prefixed(model, k, names): v for k, v in stored.items()}
    renamings = [c for c in convs if isinstance(c, WeightRenaming)]
    converters = [c for c in convs if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None)
    pending: dict[str, object] = {}
    for key, tensor in sorted(stored.items(), key=lambda kv: dot_natural_key(kv[0])):
        target, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if target not in names and key in names:
            target, pattern = key, None
        if pattern is not None:
            pending.setdefault(target, deepcopy(by_pattern[pattern])).add_tensor(target, key, pattern, tensor)
        else:
            pending.setdefault(target, WeightRenaming(key, target)).add_tensor(target, key, key, tensor)
    out = {}
    for first, transform in pending.items():
        for name, value in transform.convert(first, model=model, config=model.config).items():
            out[name] = value[0] if isinstance(value, list) else value
    return out


def _prefixed(model: nn.Module, key: str, names: dict) -> str:
    """A stored name as the model's: GPT-2's hub files leave out the base model's `transformer.` prefix."""
    if key in names:
        return key
    full = f"{getattr(model, 'base_model_prefix', '')}.{key}"
    return full if full in names else key


def to_stored(model: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors by parameter name (any subset: one layer's, or masks shaped like them) -> the names and
    layout `save_pretrained` writes."""
    from transformers.core_model_loading import revert_weight_conversion

    if not conversions(model):
        return dict(params)
    return revert_weight_conversion(model, dict(params))

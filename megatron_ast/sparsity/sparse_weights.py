"""Where a model's sparse weights are: the one place every stage (prune, train, export, quantize, eval) asks.

A sparse weight is a parameter of a decoder layer that N:M sparsity applies to: the weight of an
`nn.Linear` (or GPT-2's `Conv1D`), or a fused 3-D expert parameter of a transformers 5 MoE
(`[experts, out, in]`, or `[experts, in, out]` where the experts module says `is_transposed`), one
matrix per expert. Each carries its orientation: N:M groups run along the reduction (input) axis,
where 2:4 tensor cores need them, which is the last axis unless the weight is stored transposed.

The decoder layers are found generically (the base model's ModuleList of `num_hidden_layers`
layers), not from a table of family names. Routers and shared-expert gates, embeddings, lm_head
and norms are never sparse weights here; `ignore` (regexes, searched in the parameter name) leaves
more out. Depthwise convolutions (Qwen3.5's Gated DeltaNet `conv1d`) are not matrices and stay
dense. Any other parameter of three or more axes is an unknown layout: one line naming it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from megatron_ast.errors import UsageError

KINDS = ("attention", "linear_attention", "mlp", "shared_expert", "routed_expert")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # Linears that route (MoE blocks): never pruned
MASK_LAYOUT = "as stored"  # masks.safetensors metadata: each mask is shaped like its weight as stored
HEAD_INPUTS = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "project_out")  # applied in this order


@dataclass(frozen=True)
class SparseWeight:
    name: str  # the parameter's name in the model: "model.layers.3.mlp.experts.gate_up_proj"
    local: str  # its name inside its decoder layer: "mlp.experts.gate_up_proj"
    layer: int
    kind: str  # one of KINDS
    shape: tuple[int, ...]  # as stored
    transposed: bool  # stored (..., in, out): GPT-2's Conv1D, gpt-oss's experts
    experts: int = 0  # a fused [experts, ., .] parameter: one matrix per expert; 0 for a plain matrix

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def is_linear(self) -> bool:
        """An nn.Linear's weight (what SparseLinear, SLoRB and LoRA adapters target)."""
        return not self.experts and not self.transposed

    @property
    def in_features(self) -> int:
        return self.shape[-2] if self.transposed else self.shape[-1]

    @property
    def out_features(self) -> int:
        return self.shape[-1] if self.transposed else self.shape[-2]

    @property
    def numel(self) -> int:
        return (self.experts or 1) * self.in_features * self.out_features

    def out_in(self, t: torch.Tensor) -> torch.Tensor:
        """The stored tensor (or its mask) as (..., out, in): a view, N:M groups along the last axis."""
        return t.transpose(-1, -2) if self.transposed else t

    def stored(self, t: torch.Tensor) -> torch.Tensor:
        """An (..., out, in) tensor in the stored layout (the inverse of `out_in`)."""
        return self.out_in(t)

    def matrices(self, t: torch.Tensor) -> torch.Tensor:
        """The stored tensor as (matrices, out, in): one per expert, or one."""
        return self.out_in(t).reshape(-1, self.out_features, self.in_features)


def _layer_count(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, key, None)
        if isinstance(n, int):
            return n
    return None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name in the model, list) of the decoder layers: the one ModuleList under the base model (`get_decoder`)
    holding `num_hidden_layers` modules."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    n = _layer_count(getattr(model, "config", None))
    lists = [(name, m) for name, m in base.named_modules() if isinstance(m, nn.ModuleList) and name
             and "." not in name and (n is None or len(m) == n)]
    if len(lists) != 1:
        found = ", ".join(f"{name} ({len(m)})" for name, m in lists) or "none"
        raise UsageError(f"cannot tell the decoder layers of {type(model).__name__}: lists of {n} modules under "
                         f"{type(base).__name__}: {found}; this model's layout is unknown here")
    names = {id(m): name for name, m in model.named_modules()}
    return names[id(lists[0][1])], lists[0][1]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: a Linear stored (in, out)."""
    return type(module).__name__ == "Conv1D"


def is_experts(module: nn.Module) -> bool:
    """A transformers 5 fused experts module (`use_experts_implementation`): it states its layout."""
    return hasattr(module, "is_transposed") and any(p.dim() == 3 or len(getattr(p, "ds_shape", ())) == 3
                                                    for p in module.parameters(recurse=False))


def routed_to(args: tuple, kwargs: dict) -> torch.Tensor:
    """The experts each token is sent to, from the arguments of a transformers 5 experts module's forward
    `(hidden_states, top_k_index, top_k_weights)` (gpt-oss names them router_indices, routing_weights)."""
    return args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 leaves an empty tensor and the shape beside it


def _kind(local: str, layer: nn.Module) -> str:
    parts = local.split(".")
    if any("shared_expert" in p for p in parts):
        return "shared_expert"
    top = layer.get_submodule(parts[0]) if len(parts) > 1 else None
    cls = type(top).__name__.lower() if top is not None else ""
    if "linear_attn" in parts[0] or "deltanet" in cls or "linearattention" in cls:
        return "linear_attention"
    if "attn" in parts[0] or "attention" in parts[0] or "attention" in cls:
        return "attention"
    return "mlp"


def _is_router(local: str, layer: nn.Module) -> bool:
    """A Linear named like a router (or inside a module so named) beside experts, as MoE blocks hold both, or a
    shared-expert gate."""
    parts = local.split(".")[:-1]  # the module path, without "weight"
    if parts and parts[-1] == "shared_expert_gate":
        return True
    for i, part in enumerate(parts):
        owner = layer.get_submodule(".".join(parts[:i])) if i else layer
        if part in ROUTER_NAMES and any("expert" in n or any(len(_shape(p)) == 3 for p in m.parameters(recurse=False))
                                        for n, m in owner.named_children()):
            return True
    return False


def layer_weights(layer: nn.Module, index: int, prefix: str, ignore: Iterable[str] = ()) -> list[SparseWeight]:
    """The sparse weights of one decoder layer (`prefix`: the layer's name in the model, e.g. "model.layers.3")."""
    patterns = [re.compile(p) for p in ignore]

    def ignored(name: str) -> bool:
        return any(pat.search(name) for pat in patterns)

    out = []
    for mod_name, mod in layer.named_modules():
        own = [(n, p) for n, p in mod.named_parameters(recurse=False)]
        found: list[tuple[str, nn.Parameter, bool, int]] = []
        if isinstance(mod, nn.Linear) or is_conv1d(mod):
            local = f"{mod_name}.weight" if mod_name else "weight"
            if not _is_router(local, layer):
                found.append(("weight", mod.weight, is_conv1d(mod), 0))
        elif is_experts(mod):
            for n, p in own:
                shape = _shape(p)
                if len(shape) == 3:
                    found.append((n, p, bool(mod.is_transposed), shape[0]))
                elif len(shape) > 3 and not ignored(f"{prefix}.{mod_name}.{n}"):
                    raise UsageError(f"{prefix}.{mod_name}.{n}: a {len(shape)}-axis expert parameter "
                                     f"{shape} of {type(mod).__name__}: this layout is unknown here")
        elif not isinstance(mod, nn.modules.conv._ConvNd):
            for n, p in own:
                if len(_shape(p)) >= 3 and not ignored(f"{prefix}.{mod_name}.{n}"):
                    raise UsageError(f"{prefix}.{mod_name}.{n}: a {len(_shape(p))}-axis parameter {_shape(p)} of "
                                     f"{type(mod).__name__}, which states no layout (not a transformers experts "
                                     "module): its reduction axis is unknown here; --ignore it to leave it dense")
        for attr, p, transposed, experts in found:
            local = f"{mod_name}.{attr}" if mod_name else attr
            name = f"{prefix}.{local}"
            if ignored(name):
                continue
            kind = "routed_expert" if experts else _kind(local, layer)
            out.append(SparseWeight(name, local, index, kind, _shape(p), transposed, experts))
    return out


def sparse_weights(model: nn.Module, ignore: Iterable[str] = ()) -> list[SparseWeight]:
    """Every sparse weight of `model`'s decoder layers, in order."""
    path, layers = decoder_layers(model)
    ignore = tuple(ignore)
    return [w for i, layer in enumerate(layers) for w in layer_weights(layer, i, f"{path}.{i}", ignore)]


def check_ignore(patterns: Iterable[str]) -> tuple[str, ...]:
    """--ignore REGEX values, each compiled once here so a bad one is one line."""
    out = tuple(patterns)
    for p in out:
        try:
            re.compile(p)
        except re.error as e:
            raise UsageError(f"--ignore {p!r} is not a regular expression ({e}): fix it") from None
    return out


def head_inputs(model: nn.Module) -> list[nn.Module]:
    """What lies between the last decoder layer and lm_head (final norm, OPT's project_out), in order."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    return [m for name in HEAD_INPUTS if isinstance(m := getattr(base, name, None), nn.Module)]


def to_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The last decoder layer's output as lm_head sees it."""
    for module in head_inputs(model):
        hidden = module(hidden)
    return hidden

"""Where the decoder layers and their Linears are, per architecture family.

GPT-2 uses `Conv1D`, whose weight is stored transposed (in, out); `weight_out_in`
and `set_weight_out_in` hide that, so every pruner sees (out_features, in_features).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_ast.errors import UsageError

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")


@dataclass(frozen=True)
class Ffn:
    """Names of a decoder layer's feed-forward Linears, for FFN-global pruning (SparseLLM)."""
    kind: str  # "gated" (down(act(gate x) * up x)) or "relu" (fc2(relu(fc1 x)))
    up: str
    down: str
    gate: str | None = None


@dataclass(frozen=True)
class Architecture:
    family: str
    layers_path: str
    ffn: Ffn
    head_inputs: tuple[str, ...]  # modules between the last layer and lm_head, in order (absent ones skipped)

    def to_head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The last decoder layer's output as lm_head sees it."""
        for path in self.head_inputs:
            parent, _, attr = path.rpartition(".")
            module = getattr(model.get_submodule(parent), attr, None)
            if module is not None:
                hidden = module(hidden)
        return hidden

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj


ARCHITECTURES = {
    **{t: Architecture("llama", "model.layers", Ffn("gated", "mlp.up_proj", "mlp.down_proj", "mlp.gate_proj"),
                       ("model.norm",)) for t in LLAMA_LIKE},
    "opt": Architecture("opt", "model.decoder.layers", Ffn("relu", "fc1", "fc2"),
                        ("model.decoder.final_layer_norm", "model.decoder.project_out")),
    "gpt2": Architecture("gpt2", "transformer.h", Ffn("gelu", "mlp.c_fc", "mlp.c_proj"), ("transformer.ln_f",)),
}


def architecture_of(model: nn.Module) -> Architecture:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in ARCHITECTURES:
        raise UsageError(f"unsupported architecture {model_type!r}: supported are {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def prunable_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Every Linear (or GPT-2 Conv1D) inside a decoder layer, by qualified name."""
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}


def weight_out_in(module: nn.Module) -> torch.Tensor:
    return module.weight.t() if is_conv1d(module) else module.weight


def set_weight_out_in(module: nn.Module, weight: torch.Tensor) -> None:
    w = weight.t() if is_conv1d(module) else weight
    module.weight.data.copy_(w.to(module.weight.dtype))


def decoder_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """(out, in) weight of every Linear inside the decoder layers, by qualified module name."""
    arch = architecture_of(model)
    return {f"{arch.layers_path}.{i}.{name}": weight_out_in(mod)
            for i, layer in enumerate(arch.layers(model)) for name, mod in prunable_linears(layer).items()}

"""The student's routers: how many tokens each expert gets (the histogram in the log), and the optional
load-balancing term from the router logits (transformers' own Switch-Transformer loss, `aux_loss`).

The counts come from a forward pre-hook on every fused experts module: transformers 5 hands each one the
chosen experts of every token (`top_k_index`), whatever the family, so DeepSeek-V3's grouped routing is
counted as Qwen3-MoE's is. They stay on the device and are read once per logging interval, summed over ranks.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ast import distributed
from megatron_ast.errors import UsageError
from megatron_ast.sparsity.sparse_weights import decoder_layers, is_experts, routed_to


class ExpertLoad:
    def __init__(self, model: nn.Module):
        self.layers: list[int] = []
        self._experts: list[int] = []
        self._counts: list[torch.Tensor | None] = []
        self._hooks = []
        for i, layer in enumerate(decoder_layers(model)[1]):
            for mod in layer.modules():
                if is_experts(mod):
                    self.layers.append(i)
                    self._experts.append(mod.num_experts)
                    self._counts.append(None)
                    self._hooks.append(mod.register_forward_pre_hook(self._hook(len(self._counts) - 1, mod),
                                                                     with_kwargs=True))

    def __bool__(self) -> bool:
        return bool(self.layers)

    def _hook(self, slot: int, mod: nn.Module):
        def hook(module, args, kwargs):
            if not module.training:
                return
            index = routed_to(args, kwargs)
            n = mod.num_experts
            idx = index.reshape(-1)
            idx = torch.where((idx < 0) | (idx > n), n, idx)  # a sentinel (no expert) counts in slot n, dropped
            counts = torch.zeros(n + 1, dtype=torch.long, device=idx.device).index_add_(
                0, idx, torch.ones_like(idx))[:n]  # no bincount: on CUDA it syncs the host for its input's range
            self._counts[slot] = counts if self._counts[slot] is None else self._counts[slot] + counts
        return hook

    def read(self) -> dict[str, list[float]]:
        """{layer: each expert's share of the routed tokens} since the last read, over all ranks (one collective)."""
        if not self.layers:
            return {}
        device = next((c.device for c in self._counts if c is not None), "cpu")
        total = distributed.all_reduced(torch.cat([  # one device-to-host read, one host collective
            c if c is not None else torch.zeros(n, dtype=torch.long, device=device)
            for c, n in zip(self._counts, self._experts)]).tolist())
        out, at = {}, 0
        for i, n in zip(self.layers, self._experts):
            layer = total[at : at + n]
            at += n
            routed = max(sum(layer), 1.0)
            out[str(i)] = [round(v / routed, 4) for v in layer]
        self._counts = [None] * len(self._counts)
        return out


def check_balance_term(model: nn.Module, weight: float) -> None:
    """A load-balancing weight needs a model whose forward computes the loss (`aux_loss` with `output_router_logits`;
    such configs carry `router_aux_loss_coef`, which the trainer does not apply: `w_router` weights the loss):
    DeepSeek-V3's routes without one."""
    config = model.config
    if weight and not (hasattr(config, "output_router_logits") and hasattr(config, "router_aux_loss_coef")):
        raise UsageError(f"distill.w_router {weight}: {type(model).__name__} computes no router load-balancing loss "
                         "(its config has no router_aux_loss_coef); set w_router: 0")

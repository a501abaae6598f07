"""`sparsify_(model, masks)`: turn chosen Linears into masked (2:4) Linears with an STE forward.

Two ways to hold the mask, one straight-through estimator:
- in one process, the mask is a frozen parameter of the Linear and the forward
  computes W*M through `ste_masked` (the gradient reaches the dense W);
- under DeepSpeed ZeRO-3, `mask` is None: the weight ZeRO-3 gathers is already W*M
  (the working partitions are masked after each optimizer step, while the fp32
  master stays dense: training/mask_partitions.py), so the gradient taken at W*M
  lands on the dense master, and no mask is gathered in the forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ast.sparsity.slorb import SLoRB, SLoRBConfig
from megatron_ast.sparsity.ste import ste_masked


class SparseLinear(nn.Linear):
    """nn.Linear computing (W * M) x + b (+ SLoRB); gradients reach the dense W unmasked."""

    mask: nn.Parameter | None
    slorb: SLoRB | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.mask is None else ste_masked(self.weight, self.mask)
        y = F.linear(x, w, self.bias)
        if self.slorb is not None:
            y = y + self.slorb(x)
        return y


def sparsify_(model: nn.Module, masks: dict[str, torch.Tensor], slorb: SLoRBConfig | None = None) -> nn.Module:
    """In place: every Linear named in `masks` (by its weight's name) becomes a SparseLinear."""
    for name, mask in masks.items():
        sparsify_module_(model.get_submodule(name.removesuffix(".weight")), mask, slorb, name)
    return model


def sparsify_module_(module: nn.Module, mask: torch.Tensor | None, slorb: SLoRBConfig | None = None, name: str = "",
                     hold_mask: bool = True, fitted_s: torch.Tensor | None = None) -> None:
    """Make one nn.Linear a SparseLinear. Its full weight must be present (under ZeRO-3: gathered).
    `hold_mask=False`: the caller keeps the weight masked (ZeRO-3's partitions), the module holds no mask (and
    without SLoRB needs none: `mask` None).
    `fitted_s`: SLoRB's S for init fitted."""
    if type(module) is not nn.Linear:
        raise TypeError(f"{name} belongs to a {type(module).__name__}, not an nn.Linear")
    if mask is not None and mask.shape != module.weight.shape:
        raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, the weight {tuple(module.weight.shape)}")
    module.__class__ = SparseLinear
    module.mask = (nn.Parameter(mask.to(module.weight.dtype).to(module.weight.device), requires_grad=False)
                   if hold_mask else None)
    module.slorb = SLoRB(module.weight, mask, slorb, fitted_s) if slorb is not None else None


def sparse_linears(model: nn.Module) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}

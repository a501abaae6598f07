"""`sparsify_(model, masks)`: make chosen weights masked (2:4) with an STE forward.

A Linear becomes a SparseLinear; a fused expert parameter (`[experts, out, in]`, sparsity/sparse_weights.py)
gets a parametrization that gives its module W*M through the same STE, so the experts module's own forward
(any of transformers' experts implementations) computes with the masked weights.

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


class MaskedParameter(nn.Module):
    """A parametrization: the parameter as its module sees it is W * M, its gradient reaches the dense W."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.bool())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return ste_masked(weight, self.mask.to(weight.device))


def sparsify_(model: nn.Module, masks: dict[str, torch.Tensor], slorb: SLoRBConfig | None = None) -> nn.Module:
    """In place, in one process: every weight named in `masks` (by parameter name, each mask shaped like it) is
    masked: a Linear becomes a SparseLinear (with SLoRB when asked), any other parameter (a fused expert weight)
    is parametrized as W * M."""
    from torch.nn.utils import parametrize

    for name, mask in masks.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr == "weight" and type(module) is nn.Linear:
            sparsify_module_(module, mask, slorb, name)
        else:
            if mask.shape != getattr(module, attr).shape:
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, the weight "
                                 f"{tuple(getattr(module, attr).shape)}")
            parametrize.register_parametrization(module, attr, MaskedParameter(mask.to(getattr(module, attr).device)))
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

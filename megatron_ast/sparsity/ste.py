"""Straight-through sparse weights: the forward sees W * M, the backward hands the gradient to the dense W.

Pruned weights keep receiving gradients, so they can grow back when masks are
recomputed (AST's adaptive masks).
"""
from __future__ import annotations

import torch


class _MaskedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def ste_masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W * M in the forward; d/dW is the identity (not masked) in the backward."""
    return _MaskedSTE.apply(weight, mask.to(weight.dtype))

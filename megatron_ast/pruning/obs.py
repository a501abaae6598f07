"""The OBS column sweep shared by SparseGPT (pruning) and GPTQ (quantization).

Columns of W (out, in) are processed left to right in blocks: each column is
replaced by a target (pruned, or quantized) and its error, divided by [H^-1]_jj,
is spread over the not-yet-processed columns of the block through the upper
Cholesky factor of H^-1; after each block the accumulated error updates all
later columns at once (the lazy batch update of GPTQ).
"""
from __future__ import annotations

from typing import Protocol

import torch


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damping until it is positive definite."""
    h = hessian.double()
    scale = torch.diag(h).mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * (10**attempt) * scale * eye)
        if info == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0:
                return upper.float()
    raise RuntimeError("Hessian is not positive definite even with 1e5x damping")


class ColumnTarget(Protocol):
    def block(self, i1: int, w1: torch.Tensor, d: torch.Tensor) -> None:
        """Called at the start of each block (columns i1.., current values w1, diag of H^-1's factor d)."""

    def column(self, c: int, i: int, w1: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The new values of global column c (block-local i), given the block's current values."""


def prepare(weight: torch.Tensor, hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 copy of W with dead inputs zeroed, H^-1 factor): inputs that never fire do not matter."""
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, inverse_hessian_factor(h, damp)


def obs_sweep(w: torch.Tensor, hinv: torch.Tensor, blocksize: int, target: ColumnTarget) -> torch.Tensor:
    """Run the sweep over `w` in place and return it."""
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        err1 = torch.zeros_like(w1)
        target.block(i1, w1, d)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = target.column(i1 + i, i, w1, d)
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w

"""SparseGPT (Frantar & Alistarh 2023): prune one Linear to a pattern and compensate with an OBS update.

Columns are processed left to right in blocks; within a block the mask is chosen
by w^2 / [H^-1]_jj^2 (per group of M for N:M, per row for unstructured) and each
pruned weight's error is spread over the not-yet-processed columns through the
upper Cholesky factor of H^-1; after each block the accumulated error updates
all later columns at once.
"""
from __future__ import annotations

import torch

from megatron_ast.sparsity.masks import keep_top, nm_mask
from megatron_ast.sparsity.pattern import SparsityPattern


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


def sparsegpt(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern, blocksize: int = 128, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (pruned weight in float32, keep-mask) for `weight` (out, in) with input moments `hessian` (in, in)."""
    if pattern.structured and blocksize % pattern.m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={pattern.m}")
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_hessian_factor(h, damp)
    cols = w.shape[1]
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        err1 = torch.zeros_like(w1)
        keep1 = torch.ones_like(w1, dtype=torch.bool)
        if not pattern.structured:  # cumulative rounding: each row ends with exactly round(s * in) pruned
            pruned = round(pattern.sparsity * i2) - round(pattern.sparsity * i1)
            keep1 = keep_top(w1**2 / d**2, (i2 - i1) - pruned)
        for i in range(i2 - i1):
            if pattern.structured and i % pattern.m == 0:
                g = slice(i, i + pattern.m)
                keep1[:, g] = nm_mask(w1[:, g] ** 2 / d[g] ** 2, pattern.n, pattern.m)
            col = w1[:, i]
            q = torch.where(keep1[:, i], col, torch.zeros_like(col))
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w * keep, keep

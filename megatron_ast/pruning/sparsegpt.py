"""SparseGPT (Frantar & Alistarh 2023): prune one Linear to a pattern and compensate with an OBS update.

Within each block of the OBS sweep (pruning/obs.py) the mask is chosen by
w^2 / [H^-1]_jj^2: per group of M for N:M; for unstructured either per row (each
row exactly s pruned: `scope="row"`) or with one threshold over the whole block
(`scope="block"`, the reference code's choice: rows end with different sparsity).
A pruned weight's target is 0 and its error moves to the columns not yet processed.
"""
from __future__ import annotations

import torch

from megatron_ast.pruning.obs import obs_sweep, prepare
from megatron_ast.sparsity.masks import keep_top, nm_mask
from megatron_ast.sparsity.pattern import SparsityPattern

SCOPES = ("row", "block")


class _Prune:
    def __init__(self, w: torch.Tensor, pattern: SparsityPattern, scope: str):
        self.pattern, self.scope = pattern, scope
        self.keep = torch.ones_like(w, dtype=torch.bool)

    def block(self, i1: int, w1: torch.Tensor, d: torch.Tensor) -> None:
        if not self.pattern.structured:  # cumulative rounding: the matrix ends with exactly round(s * in) per row
            i2 = i1 + w1.shape[1]
            kept = (i2 - i1) - (round(self.pattern.sparsity * i2) - round(self.pattern.sparsity * i1))
            score = w1**2 / d**2
            if self.scope == "row":
                self.keep[:, i1:i2] = keep_top(score, kept)
            else:
                self.keep[:, i1:i2] = keep_top(score.reshape(1, -1), kept * len(score)).reshape(score.shape)

    def column(self, c: int, i: int, w1: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        p = self.pattern
        if p.structured and i % p.m == 0:
            g = slice(i, i + p.m)
            self.keep[:, c : c + p.m] = nm_mask(w1[:, g] ** 2 / d[g] ** 2, p.n, p.m)
        col = w1[:, i]
        return torch.where(self.keep[:, c], col, torch.zeros_like(col))


def sparsegpt(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern, blocksize: int = 128, damp: float = 0.01,
    scope: str = "row",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (pruned weight in float32, keep-mask) for `weight` (out, in) with input moments `hessian` (in, in).
    `scope`: where an unstructured threshold applies, "row" or "block" (module docstring)."""
    if pattern.structured and blocksize % pattern.m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={pattern.m}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    w, hinv = prepare(weight, hessian, damp)
    target = _Prune(w, pattern, scope)
    w = obs_sweep(w, hinv, blocksize, target)
    return w * target.keep, target.keep

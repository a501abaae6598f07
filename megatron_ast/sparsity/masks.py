"""Masks from scores, vectorised: reshape into groups and take the top-k of each (no loop over columns).

A mask is a bool tensor shaped like the weight (out_features, in_features): True = kept.
Exactly N per group (N:M) or exactly in - round(s*in) per row (unstructured), ties included.
"""
from __future__ import annotations

import torch

from megatron_ast.sparsity.pattern import SparsityPattern


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive inputs of each row.

    Each weight's rank in its group is counted with `m` whole-tensor comparisons
    (ties go to the lower input index), so every device and every rank computes
    the same mask; on a GPU this is several times faster than `topk` over a
    trailing dim of 4.
    """
    out_f, in_f = score.shape
    if in_f % m:
        raise ValueError(f"in_features {in_f} is not a multiple of M={m}")
    groups = score.reshape(out_f, in_f // m, m)
    position = torch.arange(m, device=score.device)
    rank = torch.zeros(groups.shape, dtype=torch.int16, device=score.device)
    for j in range(m):
        other = groups[..., j : j + 1]
        rank += (other > groups) | ((other == groups) & (j < position))
    return (rank < n).reshape(out_f, in_f)


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the top (1 - sparsity) fraction of each row (round(sparsity * in) pruned per row)."""
    return keep_top(score, score.shape[-1] - int(round(sparsity * score.shape[-1])))


def keep_top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` highest scores of each row."""
    keep = score.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, keep, True)


def mask_from_score(score: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    if pattern.structured:
        return nm_mask(score, pattern.n, pattern.m)
    return unstructured_mask(score, pattern.sparsity)

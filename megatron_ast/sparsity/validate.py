"""Checks used by tests, export and the trainer: is a weight really N:M, how sparse is it."""
from __future__ import annotations

import torch


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of `m` consecutive inputs holding more than `n` non-zeros (0 = valid N:M)."""
    out_f, in_f = weight.shape
    if in_f % m:
        raise ValueError(f"in_features {in_f} is not a multiple of M={m}")
    nonzero = (weight != 0).reshape(out_f, in_f // m, m).sum(-1)
    return int((nonzero > n).sum())


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


def require_pattern(weights: dict[str, torch.Tensor], pattern, where: str) -> None:
    """Raise a UsageError naming the first weight of `weights` that is not `pattern` (an N:M SparsityPattern)."""
    from megatron_ast.errors import UsageError

    if not pattern.structured:
        raise UsageError(f"--expect {pattern}: give an N:M pattern such as 2:4")
    bad = {n: v for n, w in weights.items() if (v := nm_violations(w, pattern.n, pattern.m))}
    if bad:
        name = next(iter(bad))
        raise UsageError(f"{where} is not {pattern}: {name} has {bad[name]} groups with more than {pattern.n} "
                         f"non-zeros ({len(bad)} weights fail); evaluate without --expect or prune it first")

"""SLoRB (Sparse Low-Rank Boosting): a rank-d/k branch that gives back what the mask took away.

For a Linear W (N x d) with mask M and group size k:  y = (W*M) x + S (P x), where
P (d/k x d) sums each group of k consecutive inputs and S (N x d/k) starts from the
pruned weights: S[i, g] = mean (or sum) over the group of (W * (1-M))[i, g*k:(g+1)*k],
W the dense values (a one-shot init keeps them at pruned positions: training/engines.py).
`zero` starts the branch at 0 (the forward is then the masked model's); `xavier` randomises
P and starts S at 0, as the reference code does (the forward is again the masked model's;
P then stays a tensor). `fitted` takes S from `fit_s`: the least-squares branch on a
pruner's calibration inputs (`megatron-ast prune --slorb-group k` writes it beside the
2:4 weights), for one-shot inits that put zeros under the mask, where `mean` gives 0.
With P frozen, P x is a reshape-and-sum (P is never materialised). As a LoRA
adapter: A = P (d/k x d), B = S (N x d/k). Extra parameters: N * d / k (+1/k).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megatron_ast.errors import UsageError

INITS = ("mean", "sum", "zero", "xavier", "fitted")


@dataclass(frozen=True)
class SLoRBConfig:
    group: int = 16
    init: str = "mean"
    trainable_projection: bool = False

    def __post_init__(self) -> None:
        if self.group < 1:
            raise UsageError(f"slorb group size must be >= 1, got {self.group}")
        if self.init not in INITS:
            raise UsageError(f"slorb init {self.init!r} is not one of {', '.join(INITS)}")


def group_projection(in_features: int, group: int, device: torch.device | str | None = None) -> torch.Tensor:
    """P with P[g, g*k:(g+1)*k] = 1, on `device` (the weight's)."""
    return torch.eye(in_features // group, device=device).repeat_interleave(group, dim=1)


def fit_s(removed: torch.Tensor, hessian: torch.Tensor, group: int, damp: float = 0.01) -> torch.Tensor:
    """The S whose branch best restores what pruning removed on the calibration inputs:
    argmin_S E||R x - S P x||^2 = R H P^T (P H P^T + damp * mean diag * I)^-1, with R = dense - pruned
    (N x d), H = E[x x^T] (d x d). With a reconstructing pruner (SparseGPT) the pruned weights'
    own group means say nothing (the kept ones already took their role); this fit starts the branch
    where it helps. Solved in float64; returns float32 (N x d/k)."""
    out_f, in_f = removed.shape
    g = in_f // group
    php = hessian.double().reshape(g, group, g, group).sum((1, 3))
    rhp = (removed.double() @ hessian.double()).reshape(out_f, g, group).sum(-1)
    php += damp * float(php.diagonal().mean().clamp_min(1e-12)) * torch.eye(g, dtype=torch.float64, device=php.device)
    return torch.linalg.solve(php, rhp.t()).t().float()


def expand_s(s: torch.Tensor, group: int) -> torch.Tensor:
    """S P as a dense (N x d) matrix: the branch folded into a weight."""
    return s.repeat_interleave(group, dim=1)


class SLoRB(nn.Module):
    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, cfg: SLoRBConfig, fitted: torch.Tensor | None = None):
        """S from what the mask took away: the pruned entries of `weight` (the dense values the student's
        master keeps at pruned positions), or `fitted` (init fitted). xavier, as the reference: P random, S = 0."""
        super().__init__()
        out_f, in_f = weight.shape
        if in_f % cfg.group:
            raise UsageError(f"in_features {in_f} is not a multiple of the SLoRB group size {cfg.group}")
        self.group = cfg.group
        dev = weight.device  # everything here is made where the weight lives (the accelerator under ZeRO-3)
        p = group_projection(in_f, cfg.group, dev) if cfg.trainable_projection or cfg.init == "xavier" else None
        if cfg.init == "fitted":
            if fitted is None or fitted.shape != (out_f, in_f // cfg.group):
                raise ValueError(f"init fitted needs S of shape {(out_f, in_f // cfg.group)}")
            s = fitted.to(dev, torch.float32)
        elif cfg.init in ("zero", "xavier"):
            s = torch.zeros(out_f, in_f // cfg.group, device=dev)
            if cfg.init == "xavier":
                p = nn.init.xavier_uniform_(p)
        else:
            pruned = (weight.detach().float() * ~mask.to(dev, torch.bool)).reshape(out_f, in_f // cfg.group, cfg.group)
            s = pruned.mean(-1) if cfg.init == "mean" else pruned.sum(-1)
        self.S = nn.Parameter(s.to(weight.dtype))
        # the plain group projection needs no tensor unless it trains (P x is then a reshape-and-sum)
        self.P = nn.Parameter(p.to(weight.dtype), requires_grad=cfg.trainable_projection) if p is not None else None

    @classmethod
    def from_lora(cls, a: torch.Tensor, b: torch.Tensor) -> "SLoRB":
        """The branch y = B (A x) of a LoRA adapter (as `lora` writes it), frozen; A is recognised as the
        plain group projection when it is one, so the forward is the trainer's to the bit."""
        self = nn.Module.__new__(cls)
        nn.Module.__init__(self)
        rank, in_f = a.shape
        if in_f % rank:
            raise UsageError(f"SLoRB adapter: A is {rank} x {in_f}, and {in_f} inputs do not split into {rank} groups")
        self.group = in_f // rank
        self.S = nn.Parameter(b.detach().clone(), requires_grad=False)
        plain = torch.equal(a, group_projection(in_f, self.group, a.device).to(a.dtype))
        self.P = None if plain else nn.Parameter(a.detach().clone(), requires_grad=False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.P is None:
            px = x.reshape(*x.shape[:-1], -1, self.group).sum(-1)
        else:
            px = x @ self.P.t()
        return px @ self.S.t()

    def lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the equivalent LoRA adapter: y_extra = B (A x)."""
        a = (self.P.detach() if self.P is not None
             else group_projection(self.S.shape[1] * self.group, self.group, self.S.device))
        return a.to(self.S.dtype), self.S.detach()

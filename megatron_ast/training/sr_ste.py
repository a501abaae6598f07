"""Where the decay happens: AST's AdamW with the annealed SR-STE decay inside the optimizer step.

For a masked weight W with mask M (1 = kept) at step t:
    lambda_t = lambda * min(1, t / T_inc)
    m <- b1 m + (1 - b1) g                    (first moment: the loss gradient only)
    u <- m + lambda_t * W * (1 - M)          (decay pulls only the pruned weights to zero)
    v <- b2 v + (1 - b2) u^2                  (second moment: of the update)
    W <- W - lr * ( u / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * W )
This is DESIGN.md §4 taken literally, as thu-ml/Adaptive-Sparse-Trainer's adamw.py
has it: for masked tensors the second moment tracks the update u (not the raw
gradient), also at lambda = 0, where u = m; `second_moment="gradient"` gives
them AdamW's v of g^2 instead (an ablation). Elements that are not masked weights
(embeddings, norms, SLoRB) get plain AdamW. The optimizer works on whatever
tensors it is given: model parameters in a single process, or the flat fp32
master partitions DeepSpeed ZeRO-3 hands a client optimizer, which mix masked
and unmasked elements; `set_pruned` gives each tensor an aligned indicator:
1 = pruned masked weight, 0 = kept masked weight, -1 = not a masked weight.
The baselines (naive, gmp, dense) run lambda = 0 with "gradient": plain AdamW.

On the CPU (ZeRO-Offload's fp32 master, a rank's whole flat partition) the update is one fused,
vectorised, multi-threaded C loop (training/srste_cpu.c, built at first use, as DeepSpeed builds its
CPU Adam); bench/offload_step.py times it against DeepSpeed's CPU Adam on the same partition. On an
accelerator the same rule runs as whole-tensor kernels.
"""
from __future__ import annotations

import torch

from megatron_ast.errors import DeepSpeedMismatch
from megatron_ast.training import srste_cpu


def srste_lambda(step: int, lam: float, t_inc: int) -> float:
    """lambda_t = lambda * min(1, t / T_inc): the decay ramps up, so masks settle late in training."""
    return lam * min(1.0, step / t_inc) if t_inc > 0 else lam


class SRSTEAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 2e-4, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 srste_lambda: float = 6e-5, srste_t_inc: int = 10_000, second_moment: str = "update"):
        if second_moment not in ("update", "gradient"):
            raise ValueError(f"second_moment must be 'update' or 'gradient', got {second_moment!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        srste_lambda=srste_lambda, srste_t_inc=srste_t_inc, second_moment=second_moment)
        super().__init__(params, defaults)
        self._pruned: dict[int, torch.Tensor] = {}  # int8 indicators: 1 byte per element beside the fp32 master
        self._seen: set[int] = set()  # tensors stepped since the last check_stepped
        # in one process every tensor is in every step; ZeRO-3 steps one flat sub-group per call, and its step
        # wrapper (training/mask_partitions.py) checks once all of them were stepped
        self.check_each_step = True

    def set_pruned(self, tensor: torch.Tensor, pruned: torch.Tensor | None) -> None:
        """Declare the indicator of `tensor` (same shape): 1 - M on masked weights, -1 elsewhere; None = plain AdamW.

        Kept as int8 (1 byte per element, a quarter of the fp32 master it sits beside); the step turns each
        cache-sized block of it into the decay factor and the is-masked select."""
        if pruned is None:
            self._pruned.pop(id(tensor), None)
        else:
            if pruned.shape != tensor.shape:
                raise ValueError(f"pruned indicator {tuple(pruned.shape)} does not match tensor {tuple(tensor.shape)}")
            self._pruned[id(tensor)] = pruned.to(device=tensor.device, dtype=torch.int8)

    def current_lambda(self) -> float:
        g = self.param_groups[0]
        step = max((int(s["step"]) for s in self.state.values() if "step" in s), default=0)
        return srste_lambda(step, g["srste_lambda"], g["srste_t_inc"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._seen.add(id(p))
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                v_of_update = group.get("second_moment", "update") == "update"
                # lambda 0 with AdamW's v is AdamW: the baselines skip the masked path's temporaries
                pruned = self._pruned.get(id(p)) if group["srste_lambda"] > 0 or v_of_update else None
                tensors = (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"])
                if p.device.type == "cpu":
                    b1, b2 = group["betas"]
                    t = state["step"]
                    lam = srste_lambda(t, group["srste_lambda"], group["srste_t_inc"])
                    common = (group["lr"] * group["weight_decay"], group["lr"] / (1 - b1**t), 1 - b2**t, group["eps"])
                    if pruned is None:
                        srste_cpu.step_plain(*tensors, b1, b2, *common)
                    else:
                        srste_cpu.step_masked(*tensors, pruned, b1, b2, lam, *common, v_of_update)
                else:
                    self._update(group, state["step"], *tensors, pruned, v_of_update)
        if self.check_each_step:
            self.check_stepped()
        return loss

    def check_stepped(self) -> None:
        """Every tensor declared with `set_pruned` was stepped since the last check (a step that stepped nothing,
        as a skipped one, is no evidence). A miss means DeepSpeed handed over other tensors than the flat
        partitions the masks were declared on: AST would silently be plain AdamW there."""
        seen, self._seen = self._seen, set()
        missing = len(set(self._pruned) - seen)
        if seen and missing:
            raise DeepSpeedMismatch(f"the optimizer step did not get {missing} of the {len(self._pruned)} tensors that "
                                    "hold masked weights (SR-STE would silently be plain AdamW there)")

    @staticmethod
    def _update(group: dict, t: int, p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                pruned: torch.Tensor | None, v_of_update: bool = True) -> None:
        b1, b2 = group["betas"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        if pruned is not None:  # block-sized temporaries: decay factor, select, u and the squared term
            lam = srste_lambda(t, group["srste_lambda"], group["srste_t_inc"])
            u = torch.addcmul(m, p, (pruned == 1).to(p.dtype), value=lam)
            sq = torch.where(pruned >= 0, u, g).square_() if v_of_update else g.square()
        else:  # plain AdamW, with the same roundings: a tensor's update does not depend on how it was grouped
            u, sq = m, g.square()
        v.mul_(b2).add_(sq, alpha=1 - b2)
        denom = torch.div(v, 1 - b2**t, out=sq).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(u, denom, value=-group["lr"] / (1 - b1**t))

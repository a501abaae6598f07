"""Input second moments H = mean_t x_t x_t^T of a layer's sparse weights, collected by forward hooks.

Linears fed the very same tensor (q/k/v, gate/up) share one H, computed once.
A fused experts module gets one H per expert from the tokens its router sends to that
expert (`routing="routed"`), or from every token (`routing="all"`, which leaves the layer's
output as it is: the inputs are recomputed beside the real forward, never fed into it). The
down projection's per-expert inputs are the expert's own gated activations, computed from the
module's weights with the module's own gate (`_apply_gate`), as transformers' experts forwards do.
diag(H) is what Wanda needs (mean x_j^2); SparseGPT needs all of H.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ast.errors import UsageError
from megatron_ast.sparsity.sparse_weights import SparseWeight, routed_to

ROUTINGS = ("routed", "all")


class _Moments:
    """Sum of x x^T and the token count, per matrix (one, or one per expert)."""

    def __init__(self, matrices: int, features: int, device, experts: bool):
        self.experts = experts
        self.sum = torch.zeros(matrices, features, features, device=device)
        self.tokens = torch.zeros(matrices, dtype=torch.long)

    def add(self, i: int, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        self.sum[i].addmm_(flat.t(), flat)
        self.tokens[i] += flat.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / self.tokens.clamp_min(1).to(self.sum.device)[:, None, None]


class InputHessians:
    def __init__(self, layer: nn.Module, weights: list[SparseWeight], routing: str = "routed"):
        if routing not in ROUTINGS:
            raise UsageError(f"--expert-calibration {routing!r}: choose one of {', '.join(ROUTINGS)}")
        self.routing = routing
        self._slots: list[_Moments] = []
        self._slot_of: dict[str, int] = {}
        # input identity -> (slot, the input itself): holding the tensor for the rest of the layer call keeps
        # its memory from being reused by a later input, whose (data_ptr, shape, version) would then collide
        self._seen: dict[tuple, tuple[int, torch.Tensor]] = {}
        self._hooks = [layer.register_forward_pre_hook(lambda *_: self._seen.clear())]
        experts: dict[str, dict[str, SparseWeight]] = {}
        for w in weights:
            module = w.local.rpartition(".")[0]
            if w.experts:
                experts.setdefault(module, {})[w.local.rpartition(".")[2]] = w
            else:
                self._hooks.append(layer.get_submodule(module).register_forward_pre_hook(self._hook(w.local)))
        for module, own in experts.items():
            mod = layer.get_submodule(module)
            if getattr(mod, "has_post_expert_norm", False):
                raise UsageError(f"{module} ({type(mod).__name__}) applies a norm after each expert: its per-expert "
                                 "calibration is not built here; prune it by magnitude or --ignore it")
            self._hooks.append(mod.register_forward_pre_hook(self._experts_hook(own), with_kwargs=True))

    def _slot(self, name: str, matrices: int, features: int, device, experts: bool = True) -> _Moments:
        if name not in self._slot_of:
            self._slot_of[name] = len(self._slots)
            self._slots.append(_Moments(matrices, features, device, experts))
        return self._slots[self._slot_of[name]]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach()
            key = (x.data_ptr(), tuple(x.shape), x._version)
            if key in self._seen:
                self._slot_of.setdefault(name, self._seen[key][0])
                return
            slot = self._slot(name, 1, x.shape[-1], x.device, experts=False)
            self._seen[key] = (self._slot_of[name], x)
            slot.add(0, x)

        return hook

    def _experts_hook(self, own: dict[str, SparseWeight]):
        """Per expert: the tokens it is sent (or all of them), its first projection's inputs and, from them, its
        down projection's inputs (first projection, its bias, the module's gate or activation)."""

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            index = routed_to(args, kwargs)
            first = "gate_up_proj" if getattr(mod, "has_gate", True) else "up_proj"
            n = getattr(mod, first).shape[0]
            for e in range(n):
                tokens = x if self.routing == "all" else x[(index == e).any(-1)]
                if first in own:
                    self._slot(own[first].local, n, tokens.shape[-1], x.device).add(e, tokens)
                if "down_proj" in own:
                    w = getattr(mod, first)[e]
                    h = tokens @ (w if mod.is_transposed else w.t())
                    if getattr(mod, "has_bias", False):
                        h = h + getattr(mod, f"{first}_bias")[e]
                    p = mod._apply_gate(h) if getattr(mod, "has_gate", True) else mod.act_fn(h)
                    self._slot(own["down_proj"].local, n, p.shape[-1], x.device).add(e, p)

        return hook

    def hessian(self, name: str) -> torch.Tensor:
        """H of the weight `name` (its local name in the layer): (in, in), or (experts, in, in)."""
        slot = self._slots[self._slot_of[name]]
        return slot.mean() if slot.experts else slot.mean()[0]

    def tokens(self, name: str) -> torch.Tensor:
        """Calibration tokens behind each matrix of `name` (one entry, or one per expert)."""
        return self._slots[self._slot_of[name]].tokens

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - W_p) X||^2 / ||W X||^2 over the calibration inputs, from H alone."""
    delta = (dense - pruned).float()
    num = ((delta @ hessian) * delta).sum()
    den = ((dense.float() @ hessian) * dense.float()).sum()
    return float(num / den.clamp_min(1e-30))

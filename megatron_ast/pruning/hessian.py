"""Input second moments H = mean_t x_t x_t^T of a layer's Linears, collected by forward hooks.

Linears fed the very same tensor (q/k/v, gate/up) share one H, computed once.
diag(H) is what Wanda needs (mean x_j^2); SparseGPT needs all of H.
"""
from __future__ import annotations

import torch
from torch import nn


class InputHessians:
    def __init__(self, layer: nn.Module, modules: dict[str, nn.Module]):
        self._slots: list[torch.Tensor] = []
        self._tokens: list[int] = []
        self._slot_of: dict[str, int] = {}
        # input identity -> (slot, the input itself): holding the tensor for the rest of the layer call keeps
        # its memory from being reused by a later input, whose (data_ptr, shape, version) would then collide
        self._seen: dict[tuple, tuple[int, torch.Tensor]] = {}
        self._hooks = [layer.register_forward_pre_hook(lambda *_: self._seen.clear())]
        self._hooks += [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach()
            key = (x.data_ptr(), tuple(x.shape), x._version)
            if key in self._seen:
                self._slot_of.setdefault(name, self._seen[key][0])
                return
            if name not in self._slot_of:
                self._slot_of[name] = len(self._slots)
                self._slots.append(torch.zeros(x.shape[-1], x.shape[-1], device=x.device))
                self._tokens.append(0)
            slot = self._slot_of[name]
            self._seen[key] = (slot, x)
            flat = x.reshape(-1, x.shape[-1]).float()
            self._slots[slot].addmm_(flat.t(), flat)
            self._tokens[slot] += flat.shape[0]

        return hook

    def hessian(self, name: str) -> torch.Tensor:
        slot = self._slot_of[name]
        return self._slots[slot] / max(self._tokens[slot], 1)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - W_p) X||^2 / ||W X||^2 over the calibration inputs, from H alone."""
    delta = (dense - pruned).float()
    num = ((delta @ hessian) * delta).sum()
    den = ((dense.float() @ hessian) * dense.float()).sum()
    return float(num / den.clamp_min(1e-30))

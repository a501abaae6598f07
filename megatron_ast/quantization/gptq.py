"""GPTQ (Frantar et al. 2023) on a masked weight: quantize column by column, compensate the error.

The OBS sweep of pruning/obs.py with a quantizing target: at the first column of
each group the group's scales are taken from the current (error-updated) values,
then each column's target is its code times its scale, and 0 where the mask prunes
it, so the compensation never revives a pruned weight and the pattern holds.
"""
from __future__ import annotations

import torch

from megatron_ast.pruning.obs import obs_sweep, prepare
from megatron_ast.quantization.groupwise import QuantSpec, codes_of, group_scales


class _Quantize:
    def __init__(self, w: torch.Tensor, mask: torch.Tensor, spec: QuantSpec):
        self.mask, self.spec = mask.to(w.device, torch.bool), spec
        self.codes = torch.zeros_like(w, dtype=torch.int8)
        self.scales = torch.ones(w.shape[0], w.shape[1] // spec.group, dtype=torch.float16, device=w.device)
        self._scale = None

    def block(self, i1: int, w1: torch.Tensor, d: torch.Tensor) -> None:
        pass

    def column(self, c: int, i: int, w1: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        g = self.spec.group
        if c % g == 0:  # the group's scale from its current values (pruned ones count as 0)
            cols = w1[:, i : i + g] * self.mask[:, c : c + g]
            self.scales[:, c // g] = group_scales(cols, QuantSpec(self.spec.bits, cols.shape[1]))[:, 0].half()
            self._scale = self.scales[:, c // g].float()
        code = codes_of(w1[:, i], self._scale, self.spec) * self.mask[:, c].to(torch.int8)
        self.codes[:, c] = code
        return code.float() * self._scale


def gptq(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, spec: QuantSpec, blocksize: int = 128,
         damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (out, in), scales float16 (out, in/group)) of the masked `weight` (out, in)."""
    if blocksize % spec.group:
        raise ValueError(f"blocksize {blocksize} must be a multiple of the group size {spec.group}")
    w, hinv = prepare(weight.float() * mask, hessian, damp)
    target = _Quantize(w, mask, spec)
    obs_sweep(w, hinv, blocksize, target)
    return target.codes, target.scales

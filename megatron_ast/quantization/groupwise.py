"""Group-wise symmetric integer quantization of weights, applied after the 2:4 masks.

Each row is cut into groups of `group` input columns; a group's scale is
max|w| / qmax (qmax = 2^(bits-1) - 1), its codes round(w / scale) clipped to
[-qmax-1, qmax]. Zero is a code, so a pruned weight stays exactly zero and the
N:M pattern survives quantization. Round-to-nearest here; GPTQ (gptq.py) picks
the codes column by column with error compensation instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ast.errors import UsageError


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group: int = 128

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise UsageError(f"--bits {self.bits}: choose 4 or 8")
        if self.group < 1:
            raise UsageError(f"--group-size must be >= 1, got {self.group}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def check_shape(self, in_features: int, name: str) -> None:
        if in_features % self.group:
            raise UsageError(f"{name}: in_features {in_features} is not a multiple of --group-size {self.group}")


def group_scales(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """(out, in/group) scales of `w` (out, in); an all-zero group gets scale 1 (its codes are 0 anyway)."""
    out_f, in_f = w.shape
    amax = w.float().abs().reshape(out_f, in_f // spec.group, spec.group).amax(-1)
    return torch.where(amax > 0, amax / spec.qmax, torch.ones_like(amax))


def codes_of(w: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """int8 codes of `w` given a scale broadcastable to it."""
    return torch.clamp(torch.round(w.float() / scale), -spec.qmax - 1, spec.qmax).to(torch.int8)


def expand(scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-group scales repeated over their columns: (out, in)."""
    return scales.repeat_interleave(spec.group, dim=1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return codes.float() * expand(scales.float(), spec)


def rtn(weight: torch.Tensor, mask: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest: (codes int8 (out, in), scales float16 (out, in/group)) of W*M."""
    w = weight.float() * mask
    scales = group_scales(w, spec).half()
    return codes_of(w, expand(scales.float(), spec), spec) * mask.to(torch.int8), scales

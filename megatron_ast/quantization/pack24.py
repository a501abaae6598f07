"""Storage of a 2:4 sparse, group-quantized weight, and its honest size.

Per row, each group of 4 inputs keeps 2 values: their codes are stored in order
(int4: two per byte; int8: one byte each) with a 2-bit position inside the group
per kept value (four per byte), plus one float16 scale per `group` inputs. Per
original weight that is bits/2 + 1 + 16/group bits: 3.125 for int4 at group 128,
10.24x smaller than float32 (the 16x often quoted counts the kept values only).
"""
from __future__ import annotations

import torch

from megatron_ast.errors import UsageError
from megatron_ast.quantization.groupwise import QuantSpec


def pack(codes: torch.Tensor, mask: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """{'values': uint8/int8, 'positions': uint8} of the kept codes of `codes` (out, in) under a 2:4 `mask`."""
    out_f, in_f = codes.shape
    if in_f % 8:
        raise UsageError(f"2:4 packing needs in_features divisible by 8, got {in_f}")
    m4 = mask.bool().reshape(out_f, in_f // 4, 4)
    if not bool((m4.sum(-1) == 2).all()):
        raise UsageError("2:4 packing needs exactly 2 kept weights in every group of 4: is the mask 2:4?")
    pos = torch.argsort((~m4).to(torch.int8), dim=-1, stable=True)[..., :2]  # kept positions, ascending
    kept = codes.reshape(out_f, in_f // 4, 4).gather(-1, pos).reshape(out_f, in_f // 2)
    p = pos.reshape(out_f, in_f // 8, 4).to(torch.uint8)
    positions = p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)
    if spec.bits == 8:
        return {"values": kept.to(torch.int8).contiguous(), "positions": positions.contiguous()}
    nib = (kept.to(torch.int16) & 0xF).to(torch.uint8).reshape(out_f, in_f // 4, 2)
    return {"values": (nib[..., 0] | (nib[..., 1] << 4)).contiguous(), "positions": positions.contiguous()}


def unpack(packed: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """The dense int8 codes (out, in) back from `pack`."""
    values, positions = packed["values"], packed["positions"]
    out_f = positions.shape[0]
    in_f = positions.shape[1] * 8
    if spec.bits == 8:
        kept = values.to(torch.int16)
    else:
        lo, hi = (values & 0xF).to(torch.int16), (values >> 4).to(torch.int16)
        kept = torch.stack([lo, hi], -1).reshape(out_f, in_f // 2)
        kept = (kept ^ 8) - 8  # sign-extend the nibbles
    pos = torch.stack([(positions >> s) & 3 for s in (0, 2, 4, 6)], -1).reshape(out_f, in_f // 4, 2).long()
    codes = torch.zeros(out_f, in_f // 4, 4, dtype=torch.int16)
    codes.scatter_(-1, pos, kept.reshape(out_f, in_f // 4, 2))
    return codes.reshape(out_f, in_f).to(torch.int8)


def nbytes(packed: dict[str, torch.Tensor], scales: torch.Tensor) -> int:
    """Bytes stored for one weight: kept values, their positions, the scales."""
    return sum(t.numel() * t.element_size() for t in packed.values()) + scales.numel() * scales.element_size()

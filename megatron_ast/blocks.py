"""Element-wise work in cache-sized blocks on the CPU, in one piece elsewhere.

On the CPU, a chain of element-wise ops over a whole 60M-element tensor streams
every temporary through memory; over 64K-element blocks the temporaries stay in
cache (1.7x to 8x faster here: training/sr_ste.py, sparsity/masks.py). On an
accelerator, one block: every kernel should see the whole tensor.
"""
from __future__ import annotations

from typing import Iterator

import torch

CPU_BLOCK = 1 << 16


def blocks(n: int, device: torch.device) -> Iterator[slice]:
    """Slices covering range(n): CPU_BLOCK long on the CPU, one slice on any other device."""
    step = CPU_BLOCK if device.type == "cpu" else max(n, 1)
    return (slice(s, s + step) for s in range(0, n, step))

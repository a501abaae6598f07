"""Cosine learning rate with linear warmup and a floor (the AST reference: 2e-4 -> 2e-5, 2k warmup)."""
from __future__ import annotations

import math


def lr_at(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    """lr for optimizer step `step` (1-based) of `total`."""
    if warmup and step <= warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))

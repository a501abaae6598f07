"""Importance scores of weights: higher = keep."""
from __future__ import annotations

import torch


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs()


def wanda_score(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_j||_2, with `input_sq_sum[j]` = sum over calibration tokens of x_j^2."""
    return weight.abs() * input_sq_sum.to(weight.dtype).sqrt().unsqueeze(0)

"""The distillation loss of AST: task CE + temperature-scaled KL to the teacher + SquareHead on hidden states.

    L = w_task * CE(student, labels)
      + w_kl * T^2 * KL(softmax(t/T) || softmax(s/T))          (mean over tokens)
      + w_sq * sum_l ||h_s^l - h_t^l||^2 / ||h_t^l||^2          (SquareHead, mean over layers' tokens)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_ast.errors import UsageError


@dataclass(frozen=True)
class DistillConfig:
    w_task: float = 0.33
    w_kl: float = 0.67
    w_sq: float = 0.0
    # 1, not the reference's 2: at equal tokens T=1 recovered more (bench/ast_ablation.py, 16k tokens: ppl 30.13
    # vs 31.87); its gradient p_s - p_t is the task loss's p_s - onehot with the teacher in place of the sample
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if min(self.w_task, self.w_kl, self.w_sq) < 0 or self.w_task + self.w_kl + self.w_sq == 0:
            raise UsageError("distillation weights must be >= 0 and not all zero")
        if self.temperature <= 0:
            raise UsageError(f"distillation temperature must be > 0, got {self.temperature}")


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: DistillConfig,
    teacher_logits: torch.Tensor | None = None,
    student_hidden: tuple[torch.Tensor, ...] = (),
    teacher_hidden: tuple[torch.Tensor, ...] = (),
) -> dict[str, torch.Tensor]:
    """Loss parts for next-token prediction: logits (B, T, V) predict labels shifted by one; returns each part and 'loss'."""
    s = student_logits[:, :-1].float()
    target = labels[:, 1:]
    parts = {"task": F.cross_entropy(s.reshape(-1, s.shape[-1]), target.reshape(-1))}
    loss = cfg.w_task * parts["task"]
    if cfg.w_kl > 0:
        if teacher_logits is None:
            raise ValueError("w_kl > 0 needs teacher logits")
        t = teacher_logits[:, :-1].float()
        T = cfg.temperature
        log_p_t = F.log_softmax(t / T, dim=-1)
        log_p_s = F.log_softmax(s / T, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
        parts["kl"] = kl
        loss = loss + cfg.w_kl * T * T * kl
    if cfg.w_sq > 0:
        if len(student_hidden) != len(teacher_hidden) or not student_hidden:
            raise ValueError("w_sq > 0 needs matching student and teacher hidden states")
        sq = sum(((hs.float() - ht.float()) ** 2).sum(-1).mean() / (ht.float() ** 2).sum(-1).mean()
                 for hs, ht in zip(student_hidden, teacher_hidden))
        parts["squarehead"] = sq
        loss = loss + cfg.w_sq * sq
    parts["loss"] = loss
    return parts

"""The distillation loss of AST: task CE + temperature-scaled KL to the teacher + SquareHead on hidden states.

    L = w_task * CE(student, labels)
      + w_kl * T^2 * KL(softmax(t/T) || softmax(s/T))          (mean over tokens)
      + w_sq * sum_l ||h_s^l - h_t^l||^2 / ||h_t^l||^2          (SquareHead, mean over layers' tokens)

CE and KL are computed over chunks of tokens, so at most one chunk of fp32 logits exists at a time: at
vocabulary 128,256 an upcast of 8 x 1024 tokens is 4.2 GB, and autograd through whole-batch log-softmaxes
keeps about eight of them. The gradient with respect to the student's logits is written in the backward,
chunk by chunk, in the logits' dtype:

    dL/ds = (w_task * (softmax(s) - onehot(y)) + w_kl * T * (softmax(s/T) - softmax(t/T))) / N
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_ast.errors import UsageError

# fp32 bytes of one chunk's logits: each chunk's working set is a few of these
CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class DistillConfig:
    w_task: float = 0.33
    w_kl: float = 0.67
    w_sq: float = 0.0
    # 1, not the reference's 2: at equal tokens T=1 recovered more (bench/recovery.py run, 16k tokens: ppl 30.13
    # vs 31.87); its gradient p_s - p_t is the task loss's p_s - onehot with the teacher in place of the sample
    temperature: float = 1.0
    w_router: float = 0.0  # MoE: the load-balancing term on the student's router logits (the family's aux_loss)

    def __post_init__(self) -> None:
        if min(self.w_task, self.w_kl, self.w_sq) < 0 or self.w_task + self.w_kl + self.w_sq == 0:
            raise UsageError("distillation weights must be >= 0 and not all zero")
        if self.w_router < 0:
            raise UsageError(f"distill.w_router must be >= 0, got {self.w_router}")
        if self.temperature <= 0:
            raise UsageError(f"distillation temperature must be > 0, got {self.temperature}")


def _chunk_terms(s: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor, valid: torch.Tensor, T: float,
                 grad: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """One chunk's summed CE and KL (fp32), and with `grad` the two softmax differences of dL/ds."""
    s = s.float()
    log_p = F.log_softmax(s, dim=-1)
    ce = -(log_p.gather(-1, y[:, None])[:, 0] * valid).sum()
    kl, diffs = s.new_zeros(()), None
    if t is not None:
        log_q = log_p if T == 1.0 else F.log_softmax(s / T, dim=-1)
        log_pt = F.log_softmax(t.float() / T, dim=-1)
        p_t = log_pt.exp()
        kl = ((p_t * (log_pt - log_q)).sum(-1) * valid).sum()
    if grad:
        sm = log_p.exp_()  # softmax(s): log_p (and log_q, its alias at T = 1) are not needed again
        d_kl = None
        if t is not None:
            d_kl = (sm if T == 1.0 else log_q.exp_()) - p_t
            d_kl *= valid[:, None]
        sm[torch.arange(len(y), device=y.device), y] -= 1.0
        sm *= valid[:, None]
        diffs = (sm, d_kl)
    return ce, kl, diffs


class _ChunkedLogitLoss(torch.autograd.Function):
    """w_task * CE + w_kl * T^2 * KL over chunks of rows; the backward recomputes each chunk's softmaxes."""

    @staticmethod
    def forward(ctx, s, t, y, valid, w_task: float, w_kl: float, T: float, rows: int, n: int):
        ce, kl = s.new_zeros((), dtype=torch.float32), s.new_zeros((), dtype=torch.float32)
        for a in range(0, s.shape[0], rows):
            c, k, _ = _chunk_terms(s[a : a + rows], None if t is None else t[a : a + rows], y[a : a + rows],
                                   valid[a : a + rows], T, grad=False)
            ce, kl = ce + c, kl + k
        ce, kl = ce / n, kl / n
        ctx.save_for_backward(s, t, y, valid)
        ctx.args = (w_task, w_kl, T, rows, n)
        ctx.mark_non_differentiable(ce, kl)
        return w_task * ce + w_kl * T * T * kl, ce, kl

    @staticmethod
    def backward(ctx, g, _g_ce, _g_kl):
        s, t, y, valid = ctx.saved_tensors
        w_task, w_kl, T, rows, n = ctx.args
        out = torch.empty_like(s)
        g = g.float()
        for a in range(0, s.shape[0], rows):
            _, _, (d_ce, d_kl) = _chunk_terms(s[a : a + rows], None if t is None else t[a : a + rows],
                                              y[a : a + rows], valid[a : a + rows], T, grad=True)
            d = d_ce.mul_(g * (w_task / n))
            if d_kl is not None:
                d += d_kl.mul_(g * (w_kl * T / n))
            out[a : a + rows] = d
        return out, None, None, None, None, None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: DistillConfig,
    teacher_logits: torch.Tensor | None = None,
    student_hidden: tuple[torch.Tensor, ...] = (),
    teacher_hidden: tuple[torch.Tensor, ...] = (),
    chunk_rows: int | None = None,
) -> dict[str, torch.Tensor]:
    """Loss parts for next-token prediction: logits (B, L, V) predict labels shifted by one; returns each part
    and 'loss'. `chunk_rows` tokens per chunk (default: CHUNK_BYTES of fp32 logits)."""
    if cfg.w_kl > 0 and teacher_logits is None:
        raise ValueError("w_kl > 0 needs teacher logits")
    B, L, V = student_logits.shape
    rows = chunk_rows or max(1, CHUNK_BYTES // (4 * V))
    # flat rows (views, no copy); the last position of each sequence has no next token
    y = torch.zeros_like(labels)
    y[:, :-1] = labels[:, 1:]
    valid = torch.ones(B, L, dtype=torch.float32, device=labels.device)
    valid[:, -1] = 0.0
    t = teacher_logits.reshape(B * L, V) if cfg.w_kl > 0 else None
    loss, ce, kl = _ChunkedLogitLoss.apply(student_logits.reshape(B * L, V), t, y.reshape(-1), valid.reshape(-1),
                                           cfg.w_task, cfg.w_kl, cfg.temperature, rows, B * (L - 1))
    parts = {"task": ce}
    if cfg.w_kl > 0:
        parts["kl"] = kl
    if cfg.w_sq > 0:
        if len(student_hidden) != len(teacher_hidden) or not student_hidden:
            raise ValueError("w_sq > 0 needs matching student and teacher hidden states")
        sq = sum(((hs.float() - ht.float()) ** 2).sum(-1).mean() / (ht.float() ** 2).sum(-1).mean()
                 for hs, ht in zip(student_hidden, teacher_hidden))
        parts["squarehead"] = sq
        loss = loss + cfg.w_sq * sq
    parts["loss"] = loss
    return parts

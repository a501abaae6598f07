import pytest
import torch
import torch.nn.functional as F

from megatron_ast.errors import UsageError
from megatron_ast.training.distillation import DistillConfig, distillation_loss
from tests.bench.scripts import load


def _direct_kl(t, s, T):
    total, n = 0.0, 0
    for b in range(t.shape[0]):
        for i in range(t.shape[1] - 1):
            pt = torch.softmax(t[b, i] / T, -1)
            ps = torch.softmax(s[b, i] / T, -1)
            total += float((pt * (pt.log() - ps.log())).sum())
            n += 1
    return total / n


def test_parts_match_direct_formulas():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    hs = (torch.randn(2, 6, 4), torch.randn(2, 6, 4))
    ht = (torch.randn(2, 6, 4), torch.randn(2, 6, 4))
    cfg = DistillConfig(w_task=0.3, w_kl=0.5, w_sq=0.2, temperature=2.0)
    out = distillation_loss(s, labels, cfg, t, hs, ht)
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert out["task"] == pytest.approx(float(ce), rel=1e-5)
    assert out["kl"] == pytest.approx(_direct_kl(t, s, 2.0), rel=1e-4)
    sq = sum(((a - b) ** 2).sum(-1).mean() / (b**2).sum(-1).mean() for a, b in zip(hs, ht))
    assert out["squarehead"] == pytest.approx(float(sq), rel=1e-5)
    assert out["loss"] == pytest.approx(0.3 * float(ce) + 0.5 * 4 * out["kl"].item() + 0.2 * float(sq), rel=1e-5)


def test_kl_is_zero_for_identical_logits_and_defaults_are_the_papers_but_t1():
    s = torch.randn(1, 5, 7)
    out = distillation_loss(s, torch.zeros(1, 5, dtype=torch.long), DistillConfig(), s.clone())
    assert abs(float(out["kl"])) < 1e-6
    assert DistillConfig() == DistillConfig(0.33, 0.67, 0.0, 1.0)


def test_bad_configs():
    with pytest.raises(UsageError):
        DistillConfig(w_task=-1)
    with pytest.raises(UsageError):
        DistillConfig(temperature=0)


U = 2.0**-24  # fp32's unit roundoff


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_and_gradient_equal_the_unchunked_within_the_derived_bound(T, dtype):
    """Rows are computed by the same kernels either way, so the loss differs only in the order of the mean's
    sum: for any order, |fl(sum x_i) - sum x_i| <= (N-1) u sum |x_i| (Higham, Accuracy and Stability, 4.3), so
    the two means differ by at most 2 (N-1) u mean|x|, per part. The gradient's elements differ in how the same
    softmax differences are rounded: autograd forms g - p * sum(g) per log-softmax, the chunks form
    (p - onehot) and (q - p_t) directly, a few roundings each (4 u per term below) plus the teacher's
    |1 - sum p_t| that autograd's form keeps. A bf16 gradient then rounds each side once: one bf16 ulp (2^-7 relative) more."""
    torch.manual_seed(0)
    B, L, V = 3, 41, 1000
    cfg = DistillConfig(w_task=0.3, w_kl=0.7, temperature=T)
    s0, t = torch.randn(B, L, V) * 4, (torch.randn(B, L, V) * 4).to(dtype)
    labels = torch.randint(0, V, (B, L))
    s_ref, s_new = (s0.to(dtype).requires_grad_() for _ in range(2))
    ref, ce_rows, kl_rows = load("loss_memory").unchunked(s_ref, labels, t, cfg)  # the loss before chunking
    ce_rows, kl_rows = ce_rows.detach(), kl_rows.detach()
    parts = distillation_loss(s_new, labels, cfg, t, chunk_rows=7)  # 123 rows: 18 chunks, the last one short
    n = B * (L - 1)
    parts = {k: v.detach() if k != "loss" else v for k, v in parts.items()}
    assert abs(float(parts["task"]) - float(ce_rows.mean())) <= 2 * (n - 1) * U * float(ce_rows.abs().mean())
    assert abs(float(parts["kl"]) - float(kl_rows.mean())) <= 2 * (n - 1) * U * float(kl_rows.abs().mean())
    bound = 2 * (n - 1) * U * (cfg.w_task * float(ce_rows.abs().mean()) + cfg.w_kl * T * T * float(kl_rows.abs().mean()))
    assert abs(parts["loss"].item() - ref.item()) <= bound + 2 * U * abs(ref.item())

    g = torch.tensor(0.37)  # DeepSpeed scales the loss by 1 / gradient_accumulation_steps
    (ref * g).backward()
    (parts["loss"] * g).backward()
    sf, tf = s0.to(dtype)[:, :-1].float(), t[:, :-1].float()
    p, q, p_t = sf.softmax(-1), (sf / T).softmax(-1), (tf / T).softmax(-1)
    onehot = F.one_hot(labels[:, 1:], V).float()
    c_ce, c_kl = float(g) * cfg.w_task / n, float(g) * cfg.w_kl * T / n
    err = (c_ce * 4 * U * (p + onehot) + c_kl * (4 * U * (q + p_t) + (1 - p_t.sum(-1, keepdim=True)).abs() * q))
    a, b = s_ref.grad[:, :-1].float(), s_new.grad[:, :-1].float()
    if dtype == torch.bfloat16:
        err = err + 2.0**-7 * a.abs()  # adjacent bf16 values differ by at most 2^-7 of either
    assert ((a - b).abs() <= err).all(), float(((a - b).abs() - err).max())
    assert (s_new.grad[:, -1] == 0).all() and s_new.grad.dtype == dtype


def test_the_loss_without_a_teacher_is_the_task_loss_and_its_gradient():
    s = torch.randn(2, 9, 50, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    parts = distillation_loss(s, labels, DistillConfig(1.0, 0.0, 0.0), chunk_rows=4)
    assert set(parts) == {"task", "loss"}
    parts["loss"].backward()
    ref = s.detach().clone().requires_grad_()
    F.cross_entropy(ref[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1)).backward()
    torch.testing.assert_close(s.grad, ref.grad, rtol=0, atol=1e-8)

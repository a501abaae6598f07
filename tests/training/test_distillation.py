import pytest
import torch
import torch.nn.functional as F

from megatron_ast.errors import UsageError
from megatron_ast.training.distillation import DistillConfig, distillation_loss


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

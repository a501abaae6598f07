import pytest
import torch

from megatron_ast.errors import UsageError
from megatron_ast.sparsity import (SparsityPattern, magnitude_score, mask_from_score, nm_mask, nm_violations,
                                   sparsity_of, unstructured_mask, wanda_score)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nm_mask_keeps_exactly_the_top_n_of_each_group(n, m, dtype):
    score = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    mask = nm_mask(score, n, m)
    assert mask.shape == score.shape and mask.dtype == torch.bool
    groups, kept = score.reshape(16, -1, m), mask.reshape(16, -1, m)
    assert (kept.sum(-1) == n).all()
    # every kept score >= every dropped score in its group
    lo_kept = torch.where(kept, groups, torch.tensor(float("inf"), dtype=dtype)).amin(-1)
    hi_dropped = torch.where(~kept, groups, torch.tensor(float("-inf"), dtype=dtype)).amax(-1)
    assert (lo_kept >= hi_dropped).all()


def test_ties_go_to_the_lower_index_and_stay_exact():
    score = torch.ones(3, 8)
    mask = nm_mask(score, 2, 4)
    assert mask.tolist() == [[True, True, False, False] * 2] * 3
    score = torch.tensor([[0.0, 5.0, 5.0, 5.0]])
    assert nm_mask(score, 2, 4).tolist() == [[False, True, True, False]]


def test_unstructured_mask_is_per_row_exact():
    score = torch.rand(5, 100)
    mask = unstructured_mask(score, 0.7)
    assert (mask.sum(1) == 30).all()
    thr = torch.where(mask, score, torch.tensor(2.0)).amin(1)
    assert (torch.where(~mask, score, torch.tensor(-1.0)).amax(1) <= thr).all()


def test_in_features_not_multiple_of_m_is_an_error():
    with pytest.raises(ValueError, match="multiple of M=4"):
        nm_mask(torch.rand(2, 10), 2, 4)
    with pytest.raises(UsageError, match="mlp.down_proj: in_features 10"):
        SparsityPattern.parse("2:4").check_shape(10, "mlp.down_proj")


@pytest.mark.parametrize("text,sparsity,match", [("3:2", None, "0 < N < M"), ("0:4", None, "0 < N < M"),
                                                  ("2-4", None, "neither"), ("unstructured", 1.0, "between 0 and 1"),
                                                  ("unstructured", 0.0, "between 0 and 1"), ("2:4", 0.7, "contradicts")])
def test_bad_patterns(text, sparsity, match):
    with pytest.raises(UsageError, match=match):
        SparsityPattern.parse(text, sparsity)


def test_pattern_parse():
    assert SparsityPattern.parse("4:8") == SparsityPattern(4, 8, 0.5)
    p = SparsityPattern.parse("unstructured", 0.7)
    assert not p.structured and p.sparsity == 0.7 and str(p) == "unstructured 0.7"


def test_scores_against_direct_reference():
    w = torch.randn(4, 8)
    x = torch.randn(100, 8)  # calibration tokens x features
    ref = torch.stack([torch.stack([w[i, j].abs() * x[:, j].norm() for j in range(8)]) for i in range(4)])
    assert torch.allclose(wanda_score(w, (x**2).sum(0)), ref, rtol=1e-5)
    assert torch.equal(magnitude_score(w), w.abs())
    # a quiet input feature makes Wanda drop a large weight that magnitude keeps
    w1 = torch.tensor([[1.0, 0.5, 0.4, 0.3]])
    sq = torch.tensor([1e-4, 1.0, 1.0, 1.0])
    p = SparsityPattern.parse("2:4")
    assert mask_from_score(magnitude_score(w1), p).tolist() == [[True, True, False, False]]
    assert mask_from_score(wanda_score(w1, sq), p).tolist() == [[False, True, True, False]]


def test_validator():
    w = torch.randn(8, 16)
    pruned = w * nm_mask(w.abs(), 2, 4)
    assert nm_violations(pruned, 2, 4) == 0 and sparsity_of(pruned) == 0.5
    pruned[0, :4] = 1.0
    assert nm_violations(pruned, 2, 4) == 1
    assert nm_violations(w, 2, 4) == 32

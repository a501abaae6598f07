import pytest
import torch

from megatron_ast.pruning.hessian import reconstruction_error
from megatron_ast.pruning.sparsegpt import sparsegpt
from megatron_ast.sparsity import SparsityPattern, magnitude_score, mask_from_score, nm_violations


def _layer(seed=0, out_f=48, in_f=256, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    # correlated inputs with uneven scales, as real activations are
    x = torch.randn(tokens, in_f, generator=g) @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=g))
    x *= torch.rand(in_f, generator=g) * 3
    return w, x, x.t() @ x / tokens


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured"])
def test_sparsegpt_beats_magnitude_on_reconstruction(pattern):
    w, x, h = _layer()
    p = SparsityPattern.parse(pattern, 0.5 if pattern == "unstructured" else None)
    pruned, keep = sparsegpt(w, h, p, blocksize=64)
    mag = w * mask_from_score(magnitude_score(w), p)
    err = ((x @ (w - pruned).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum()
    err_mag = ((x @ (w - mag).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum()
    assert err < 0.8 * err_mag
    assert reconstruction_error(w, pruned, h) == pytest.approx(float(err), rel=1e-3)
    assert bool((pruned[~keep] == 0).all())  # every weight the mask drops is zero
    if p.structured:
        assert nm_violations(pruned, p.n, p.m) == 0
    else:
        assert ((pruned != 0).sum(1) <= 128).all()


def test_blocksize_must_hold_whole_groups():
    w, _, h = _layer(in_f=64)
    with pytest.raises(ValueError, match="multiple of M=8"):
        sparsegpt(w, h, SparsityPattern.parse("4:8"), blocksize=12)


def test_dead_inputs_and_singular_hessian_are_handled():
    w, x, _ = _layer(in_f=32)
    x[:, :4] = 0  # never-firing inputs
    x[:, 4] = x[:, 5]  # exactly collinear inputs: singular H
    h = x.t() @ x / len(x)
    pruned, keep = sparsegpt(w, h, SparsityPattern.parse("2:4"), blocksize=32)
    assert torch.isfinite(pruned).all() and nm_violations(pruned, 2, 4) == 0
    assert (pruned[:, :4] == 0).all()


def test_block_scope_prunes_the_same_count_with_uneven_rows():
    """One threshold per block (the reference's choice) prunes as many weights in all as per-row, but rows whose
    weights matter less lose more; per-row gives every row exactly s."""
    w, x, h = _layer()
    w[:8] *= 0.1  # rows that matter less
    p = SparsityPattern.parse("unstructured", 0.5)
    row, keep_row = sparsegpt(w, h, p, blocksize=64, scope="row")
    block, keep_block = sparsegpt(w, h, p, blocksize=64, scope="block")
    assert int(keep_row.sum()) == int(keep_block.sum()) == w.numel() // 2
    assert (keep_row.sum(1) == 128).all()
    assert keep_block[:8].sum() < 8 * 128 / 2 and len(set(keep_block.sum(1).tolist())) > 1
    assert bool((block[~keep_block] == 0).all())
    err = lambda pr: float(((x @ (w - pr).t()) ** 2).sum())  # noqa: E731
    assert err(block) < err(row)  # free to spend the budget where it matters
    with pytest.raises(ValueError, match="scope"):
        sparsegpt(w, h, p, scope="column")

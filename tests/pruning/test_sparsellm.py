import torch
import torch.nn.functional as F

from megatron_ast.pruning.pipeline import PruneConfig
from megatron_ast.pruning.sparsegpt import sparsegpt
from megatron_ast.pruning.sparsellm import _alternate, _refit
from megatron_ast.sparsity import SparsityPattern

CFG = PruneConfig("sparsellm", SparsityPattern.parse("2:4"))


def _problem(gated: bool):
    """A small FFN (gated: Llama's; else ReLU with an up bias, OPT's), its inputs and dense outputs."""
    torch.manual_seed(0)
    x = torch.randn(300, 16)
    dense = {"up": torch.randn(32, 16) / 4, "down": torch.randn(16, 32) / 6, "gate": torch.randn(32, 16) / 4}
    b_up = None if gated else torch.randn(32) / 10
    return x, dense, b_up, _act(x, dense, b_up, gated) @ dense["down"].t()


def _act(x, w, b_up, gated: bool) -> torch.Tensor:
    z = x @ w["up"].t() + (b_up if b_up is not None else 0)
    return F.silu(x @ w["gate"].t()) * z if gated else F.relu(z)


def _run(gated: bool, chunk: int):
    x, dense, b_up, y = _problem(gated)
    z = x @ dense["up"].t() + (b_up if b_up is not None else 0)
    s = x @ dense["gate"].t() if gated else None
    hidden = _act(x, dense, b_up, gated)
    h = x.t() @ x / x.shape[0]
    w, keep = {}, {}
    for k in ("up", "gate", "down") if gated else ("up", "down"):
        hk = h if k != "down" else hidden.t() @ hidden / x.shape[0]
        w[k], keep[k] = sparsegpt(dense[k], hk, CFG.pattern, CFG.blocksize, CFG.damp)
    _alternate(x, y, z, s, w, keep, b_up, gated, CFG, chunk=chunk)
    return w, keep


def test_activation_updates_do_not_depend_on_the_chunking():
    for gated in (True, False):
        (w1, k1), (w2, k2) = _run(gated, chunk=7), _run(gated, chunk=10**6)
        for name in w1:
            assert torch.equal(k1[name], k2[name]), name
            assert torch.allclose(w1[name], w2[name], atol=1e-5, rtol=1e-4), name


def test_the_last_down_refit_takes_what_the_pruned_up_and_gate_produce():
    for gated in (True, False):
        x, _, b_up, y = _problem(gated)
        w, keep = _run(gated, chunk=64)
        down, k = _refit(_act(x, w, b_up, gated), y, CFG)
        assert torch.equal(k, keep["down"]) and torch.allclose(down, w["down"], atol=1e-6)

import torch

from megatron_ast.pruning.pipeline import PruneConfig
from megatron_ast.pruning.sparsegpt import sparsegpt
from megatron_ast.pruning.sparsellm import _alternate
from megatron_ast.sparsity import SparsityPattern


def _run(gated: bool, chunk: int):
    torch.manual_seed(0)
    x = torch.randn(300, 16)
    dense = {"up": torch.randn(32, 16) / 4, "down": torch.randn(16, 32) / 6, "gate": torch.randn(32, 16) / 4}
    b_up = None if gated else torch.randn(32) / 10
    z = x @ dense["up"].t() + (b_up if b_up is not None else 0)
    s = x @ dense["gate"].t()
    hidden = torch.nn.functional.silu(s) * z if gated else torch.relu(z)
    y = hidden @ dense["down"].t()
    cfg = PruneConfig("sparsellm", SparsityPattern.parse("2:4"))
    h = x.t() @ x / x.shape[0]
    w, keep = {}, {}
    for k in ("up", "gate", "down") if gated else ("up", "down"):
        hk = h if k != "down" else hidden.t() @ hidden / x.shape[0]
        w[k], keep[k] = sparsegpt(dense[k], hk, cfg.pattern, cfg.blocksize, cfg.damp)
    _alternate(x, y, z.clone(), s.clone() if gated else None, w, keep, b_up, gated, cfg, chunk=chunk)
    return w, keep


def test_activation_updates_do_not_depend_on_the_chunking():
    for gated in (True, False):
        (w1, k1), (w2, k2) = _run(gated, chunk=7), _run(gated, chunk=10**6)
        for name in w1:
            assert torch.equal(k1[name], k2[name]), name
            assert torch.allclose(w1[name], w2[name], atol=1e-5, rtol=1e-4), name

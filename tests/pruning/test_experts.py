"""MoE calibration: each expert's input moments from the tokens its router sends it, checked against the
matrices transformers' own eager experts forward multiplies (captured at the matmul), for the (out, in) and
the (in, out)-with-biases layouts."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_ast.pruning.hessian import InputHessians
from megatron_ast.pruning.pipeline import PruneConfig, prune_model
from megatron_ast.sparsity import SparsityPattern
from megatron_ast.sparsity.sparse_weights import layer_weights
from tests.families import tiny_model


class _ExpertInputs(TorchFunctionMode):
    """x^T x per expert of every matmul whose weight is a slice of a fused expert parameter, as the eager forward
    computes it (F.linear(x, W[e]) or x @ W[e])."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        super().__init__()
        self.params = params
        self.moments: dict[str, list] = {n: [torch.zeros(0)] * p.shape[0] for n, p in params.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("linear", "matmul", "__matmul__") and len(args) >= 2:
            x, w = args[0], args[1]
            for name, p in self.params.items():
                # the loop indexes W with a tensor (a copy, not a view): the expert is the slice it equals
                e = next((e for e in range(p.shape[0]) if w.shape == p[e].shape and torch.equal(w, p[e])), None)
                if e is not None:
                    flat = x.detach().reshape(-1, x.shape[-1]).float()
                    prev = self.moments[name][e]
                    self.moments[name][e] = flat.t() @ flat + (prev if prev.numel() else 0)
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_each_expert_gets_the_moments_of_the_tokens_routed_to_it(family):
    model = tiny_model(family)
    model.config._experts_implementation = "eager"  # the per-expert loop whose matmuls are captured
    layer = model.model.layers[0]
    weights = [w for w in layer_weights(layer, 0, "model.layers.0") if w.experts]
    assert {w.local for w in weights} == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert all(w.transposed == (family == "gpt_oss") for w in weights)
    experts = layer.mlp.experts
    hs = InputHessians(layer, weights)
    capture = _ExpertInputs({w.local: getattr(experts, w.local.rpartition(".")[2]) for w in weights})
    x = torch.randint(2, 600, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(input_ids=x)
        hs.remove()
        with capture:  # a second pass, without our hooks: only transformers' own matmuls are captured
            model(input_ids=x)
    for w in weights:
        h, tokens = hs.hessian(w.local), hs.tokens(w.local)
        assert h.shape == (4, w.in_features, w.in_features)
        for e in range(4):
            seen = capture.moments[w.local][e]
            if not seen.numel():
                assert tokens[e] == 0
                continue
            torch.testing.assert_close(h[e] * tokens[e], seen, rtol=1e-4, atol=1e-4)
    assert int(hs.tokens("mlp.experts.gate_up_proj").sum()) == 60 * 2  # every token, top-2


def test_all_tokens_through_every_expert_leaves_the_output_alone_and_starved_experts_fall_back():
    model = tiny_model("qwen3_moe")
    layer = model.model.layers[0]
    weights = [w for w in layer_weights(layer, 0, "model.layers.0") if w.experts]
    x = torch.randint(2, 600, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=x).logits
        hs = InputHessians(layer, weights, routing="all")
        after = model(input_ids=x).logits
        hs.remove()
    assert torch.equal(before, after)
    assert hs.tokens("mlp.experts.down_proj").tolist() == [32] * 4
    calib = torch.randint(2, 600, (2, 8), generator=torch.Generator().manual_seed(4))
    _, rows = prune_model(tiny_model("qwen3_moe"), PruneConfig("sparsegpt", SparsityPattern.parse("2:4"),
                                                             expert_min_tokens=10**6), calib)
    fallbacks = [r["experts_magnitude_fallback"] for r in rows if r["kind"] == "routed_expert"]
    assert fallbacks == [4] * 4  # every expert of both layers, gate_up and down: too few tokens for any
    _, rows = prune_model(tiny_model("qwen3_moe"), PruneConfig("sparsegpt", SparsityPattern.parse("2:4"),
                                                             expert_calibration="all", expert_min_tokens=16), calib)
    assert all(r["experts_magnitude_fallback"] == 0 for r in rows if r["kind"] == "routed_expert")

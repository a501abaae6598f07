import torch

from megatron_ast.pruning.hessian import InputHessians
from megatron_ast.sparsity.sparse_weights import layer_weights


def test_each_linear_gets_the_moments_of_its_own_inputs(tiny, calib):
    """q/k/v (and gate/up) share one input and one H; every other Linear has its own, even when
    a freed activation's memory is reused for the next one."""
    model = tiny("llama")
    layer = model.model.layers[0]
    weights = layer_weights(layer, 0, "model.layers.0")
    hs = InputHessians(layer, weights)
    seen = {w.local: [] for w in weights}
    hooks = [layer.get_submodule(w.module.removeprefix("model.layers.0.")).register_forward_pre_hook(
        lambda mod, a, n=w.local: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))) for w in weights]
    with torch.no_grad():
        for row in calib:
            model(input_ids=row[None])
    hs.remove()
    for h in hooks:
        h.remove()
    for name in seen:
        x = torch.cat(seen[name])
        assert torch.allclose(hs.hessian(name), x.t() @ x / len(x), rtol=1e-4, atol=1e-6), name
    slots = hs._slot_of
    q, k, v, o = (f"self_attn.{p}_proj.weight" for p in "qkvo")
    assert slots[q] == slots[k] == slots[v]
    assert slots["mlp.gate_proj.weight"] == slots["mlp.up_proj.weight"]
    assert len({slots[n] for n in (q, o, "mlp.gate_proj.weight", "mlp.down_proj.weight")}) == 4

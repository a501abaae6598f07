import torch

from megatron_ast.pruning.architectures import prunable_linears
from megatron_ast.pruning.hessian import InputHessians


def test_each_linear_gets_the_moments_of_its_own_inputs(tiny, calib):
    """q/k/v (and gate/up) share one input and one H; every other Linear has its own, even when
    a freed activation's memory is reused for the next one."""
    model = tiny("llama")
    layer = model.model.layers[0]
    linears = prunable_linears(layer)
    hs = InputHessians(layer, linears)
    seen = {n: [] for n in linears}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
             for n, m in linears.items()]
    with torch.no_grad():
        for row in calib:
            model(input_ids=row[None])
    hs.remove()
    for h in hooks:
        h.remove()
    for name in linears:
        x = torch.cat(seen[name])
        assert torch.allclose(hs.hessian(name), x.t() @ x / len(x), rtol=1e-4, atol=1e-6), name
    slots = hs._slot_of
    assert slots["self_attn.q_proj"] == slots["self_attn.k_proj"] == slots["self_attn.v_proj"]
    assert slots["mlp.gate_proj"] == slots["mlp.up_proj"]
    assert len({slots[n] for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}) == 4

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_ast.errors import UsageError
from megatron_ast.sparsity import SparsityPattern, mask_from_score
from megatron_ast.sparsity.slorb import SLoRB, SLoRBConfig, group_projection
from megatron_ast.sparsity.sparse_linear import SparseLinear, sparse_linears, sparsify_
from megatron_ast.sparsity.ste import ste_masked


def test_ste_forward_is_masked_backward_is_straight_through():
    w = torch.randn(6, 8, requires_grad=True)
    m = mask_from_score(w.detach().abs(), SparsityPattern.parse("2:4"))
    x = torch.randn(5, 8)
    y = x @ ste_masked(w, m).t()
    assert torch.equal(y, x @ (w.detach() * m).t())
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(w.grad, g.t() @ x)  # the dense gradient, pruned entries included
    assert (w.grad[~m] != 0).all()


def _tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def _masks(model):
    p = SparsityPattern.parse("2:4")
    return {f"{n}.weight": mask_from_score(mod.weight.detach().abs(), p)
            for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in n}


def test_sparsify_equals_pruning_the_weights():
    model, ref = _tiny(), _tiny()
    masks = _masks(model)
    sparsify_(model, masks)
    with torch.no_grad():
        for name, mask in masks.items():
            ref.get_submodule(name.removesuffix(".weight")).weight.mul_(mask)
    x = torch.randint(0, 300, (2, 16))
    assert torch.allclose(model(x).logits, ref(x).logits, atol=1e-6)
    assert len(sparse_linears(model)) == 14 and all(not m.mask.requires_grad for m in sparse_linears(model).values())
    # the dense weights are untouched and all receive gradients
    model(x).logits.sum().backward()
    lin = model.model.layers[0].mlp.up_proj
    assert isinstance(lin, SparseLinear) and (lin.weight.grad[lin.mask == 0] != 0).any()


def test_slorb_init_forward_lora_and_size():
    torch.manual_seed(0)
    w = torch.randn(12, 32)
    m = mask_from_score(w.abs(), SparsityPattern.parse("2:4"))
    x = torch.randn(3, 32)
    for init, reduce in (("mean", torch.mean), ("sum", torch.sum)):
        sl = SLoRB(w, m, SLoRBConfig(group=8, init=init))
        assert torch.allclose(sl.S, reduce((w * ~m).reshape(12, 4, 8), dim=-1))
        P = group_projection(32, 8)
        assert torch.allclose(sl(x), x @ P.t() @ sl.S.t(), atol=1e-6)
        a, b = sl.lora()
        assert torch.allclose(x @ a.t() @ b.t(), sl(x), atol=1e-6)
        assert sum(p.numel() for p in sl.parameters()) == 12 * 32 // 8
    trainable = SLoRB(w, m, SLoRBConfig(group=8, trainable_projection=True))
    assert torch.allclose(trainable(x), SLoRB(w, m, SLoRBConfig(group=8))(x), atol=1e-6)
    assert trainable.P.requires_grad and trainable.P.shape == (4, 32)
    # on inputs that share a component within each group, SLoRB gives back part of what the mask removed
    xc = torch.randn(3, 4).repeat_interleave(8, dim=1) + 0.1 * torch.randn(3, 32)
    lost = xc @ (w * ~m).t()
    assert ((lost - SLoRB(w, m, SLoRBConfig(group=8))(xc)) ** 2).sum() < 0.1 * (lost**2).sum()


def test_zero_and_xavier_inits_follow_the_reference():
    torch.manual_seed(0)
    w = torch.randn(12, 32)
    m = mask_from_score(w.abs(), SparsityPattern.parse("2:4"))
    zero = SLoRB(w, m, SLoRBConfig(group=8, init="zero"))
    assert torch.count_nonzero(zero.S) == 0 and zero.P is None
    xavier = SLoRB(w, m, SLoRBConfig(group=8, init="xavier"))  # the reference randomises the projection, S = 0
    assert torch.count_nonzero(xavier.S) == 0 and xavier.P is not None and not xavier.P.requires_grad
    assert not torch.equal(xavier.P, group_projection(32, 8))
    x = torch.randn(3, 32)
    assert torch.count_nonzero(xavier(x)) == 0
    xavier.S.data.normal_()  # once S has trained, the branch is B (A x) with A = the random P
    a, b = xavier.lora()
    assert torch.allclose(xavier(x), x @ a.t() @ b.t(), atol=1e-6) and torch.count_nonzero(xavier(x)) > 0


@pytest.mark.parametrize("cfg", [SLoRBConfig(group=8), SLoRBConfig(group=8, trainable_projection=True),
                                 SLoRBConfig(group=8, init="xavier")])
def test_from_lora_gives_the_branch_back_to_the_bit(cfg):
    torch.manual_seed(1)
    w = torch.randn(12, 32)
    branch = SLoRB(w, mask_from_score(w.abs(), SparsityPattern.parse("2:4")), cfg)
    branch.S.data += torch.randn_like(branch.S)  # as after training (xavier starts S at 0)
    again = SLoRB.from_lora(*branch.lora())
    assert (again.P is None) == (cfg.init != "xavier")  # the plain projection is recognised: a reshape-and-sum
    x = torch.randn(5, 32)
    same_path = (again.P is None) == (branch.P is None)  # a trainable P still plain is summed instead: rounding
    assert torch.equal(again(x), branch(x)) if same_path else torch.allclose(again(x), branch(x), atol=1e-6)
    assert not any(p.requires_grad for p in again.parameters())


def test_slorb_bad_config():
    with pytest.raises(UsageError, match="not one of"):
        SLoRBConfig(init="zeros")
    with pytest.raises(UsageError, match="multiple of the SLoRB group size 7"):
        SLoRB(torch.randn(4, 16), torch.ones(4, 16, dtype=torch.bool), SLoRBConfig(group=7))


def test_fit_s_is_the_least_squares_branch():
    """fit_s minimises E||R x - S P x||^2: it recovers an S that is exactly representable, and otherwise
    does at least as well as the zero branch and the group-mean (the paper's) init on those inputs."""
    from megatron_ast.sparsity.slorb import expand_s, fit_s

    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs, as a Linear sees
    h = x.t() @ x / len(x)
    s_true = torch.randn(8, 4)
    assert torch.allclose(fit_s(expand_s(s_true, 16), h, 16, damp=0.0), s_true, atol=1e-4)
    w = torch.randn(8, 64)
    m = mask_from_score(w.abs(), SparsityPattern.parse("2:4"))
    r = w * ~m
    err = lambda s: float(((x @ (r - expand_s(s, 16)).t()) ** 2).mean())  # noqa: E731
    fitted = fit_s(r, h, 16, damp=0.0)
    mean = SLoRB(w, m, SLoRBConfig(group=16)).S.detach()
    assert err(fitted) < err(mean) and err(fitted) < err(torch.zeros_like(fitted))
    s = SLoRB(w, m, SLoRBConfig(group=16, init="fitted"), fitted)
    assert torch.equal(s.S.detach(), fitted) and s.P is None
    with pytest.raises(ValueError, match="init fitted needs S"):
        SLoRB(w, m, SLoRBConfig(group=16, init="fitted"))

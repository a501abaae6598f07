"""Device discipline without a GPU: the model's parameters on `meta`, everything else as the code makes it.

PyTorch refuses to mix a meta tensor with a CPU one ("Tensor on device cpu is not on the expected device
meta!"), as CUDA refuses to mix with the CPU. So any tensor these paths create on the default device instead
of on the weight's fails here, as it would fail on the first GPU step: SLoRB's init from a pruned dir's CPU
masks, the starting masks made from the weight (dense, magnitude, Wanda; stored ones go straight to the
partition's device), sparsify, N:M masks, the distillation loss.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_ast.sparsity import nm_mask
from megatron_ast.sparsity.slorb import SLoRB, SLoRBConfig
from megatron_ast.sparsity.sparse_linear import sparsify_
from megatron_ast.training.distillation import DistillConfig, distillation_loss
from megatron_ast.training.engines import initial_mask

META = torch.device("meta")
CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2)


@pytest.mark.parametrize("init,trainable", [("mean", False), ("sum", False), ("zero", False), ("xavier", False),
                                            ("fitted", False), ("mean", True)])
def test_slorb_is_made_on_the_weights_device(init, trainable):
    weight = torch.empty(8, 32, device=META)
    mask = nm_mask(torch.randn(8, 32).abs(), 2, 4)  # a pruned dir's mask: read onto the CPU
    fitted = torch.randn(8, 2)  # a pruned dir's adapter, on the CPU
    branch = SLoRB(weight, mask, SLoRBConfig(group=16, init=init, trainable_projection=trainable), fitted)
    assert {p.device for p in branch.parameters()} == {META}
    assert branch(torch.empty(3, 32, device=META)).device == META
    a, b = branch.lora()
    assert a.device == b.device == META


def test_sparsify_a_meta_model_with_cpu_masks_and_run_it():
    with torch.device(META):
        model = LlamaForCausalLM(CFG)
    masks = {f"{n}.weight": nm_mask(torch.randn(m.weight.shape).abs(), 2, 4)
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    sparsify_(model, masks, SLoRBConfig(group=16))
    assert {p.device for p in model.parameters()} == {META}
    assert model(input_ids=torch.zeros(1, 8, dtype=torch.long, device=META)).logits.device == META


@pytest.mark.parametrize("source", ["dense", "magnitude", "wanda"])
def test_starting_masks_are_made_on_the_weights_device(source):
    from megatron_ast.sparsity.sparse_weights import SparseWeight

    name = "model.layers.0.mlp.up_proj"
    w = SparseWeight(f"{name}.weight", "mlp.up_proj.weight", 0, "mlp", (64, 32), False)
    weight = torch.nn.Parameter(torch.empty(64, 32, device=META))
    norms = {name: torch.rand(32)} if source == "wanda" else None  # all-reduced norms come back on the CPU
    mask = initial_mask(w, weight, 2, 4, source == "dense", norms)
    assert mask.device == META and mask.dtype == torch.bool and mask.shape == weight.shape
    experts = SparseWeight("model.layers.0.mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj", 0, "routed_expert",
                           (4, 32, 64), True, 4)  # gpt-oss's (experts, in, out)
    weight = torch.nn.Parameter(torch.empty(4, 32, 64, device=META))
    mask = initial_mask(experts, weight, 2, 4, source == "dense")
    assert mask.device == META and mask.dtype == torch.bool and mask.shape == weight.shape


def test_distillation_loss_on_meta_logits():
    s, t = (torch.empty(2, 8, 64, device=META) for _ in range(2))
    labels = torch.zeros(2, 8, dtype=torch.long, device=META)
    hidden = tuple(torch.empty(2, 8, 32, device=META) for _ in range(2))
    parts = distillation_loss(s, labels, DistillConfig(0.3, 0.5, 0.2, 2.0), t, hidden, hidden)
    assert {v.device for v in parts.values()} == {META}

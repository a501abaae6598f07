"""SLoRB's adapter on disk: written as PEFT LoRA, read back onto a plain base with exactly the branch's output."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_ast.errors import UsageError
from megatron_ast.sparsity import SparsityPattern, mask_from_score, slorb_adapter
from megatron_ast.sparsity.slorb import SLoRBConfig
from megatron_ast.sparsity.sparse_linear import SparseLinear, sparse_linears, sparsify_


def _tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def _sparse_with_branch(cfg: SLoRBConfig) -> LlamaForCausalLM:
    model = _tiny()
    masks = {f"{n}.weight": mask_from_score(m.weight.abs(), SparsityPattern.parse("2:4"))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    sparsify_(model, masks, cfg)
    with torch.no_grad():
        for mod in sparse_linears(model).values():
            mod.slorb.S.normal_()  # a trained branch, not its init
    return model


@pytest.mark.parametrize("trainable", [False, True])
def test_save_then_attach_gives_the_trained_branch(tmp_path, trainable):
    sparse = _sparse_with_branch(SLoRBConfig(group=8, trainable_projection=trainable))
    if trainable:
        with torch.no_grad():
            for mod in sparse_linears(sparse).values():
                mod.slorb.P.add_(0.1 * torch.randn_like(mod.slorb.P))  # a trained projection
    loras = {n: m.slorb.lora() for n, m in sparse_linears(sparse).items()}
    written = slorb_adapter.save(tmp_path / "slorb_adapter", loras, torch.float32, tmp_path)
    assert written == sum((a.numel() + b.numel()) * 4 for a, b in loras.values())
    base = _tiny()  # the exported base: W*M stored, no project modules
    with torch.no_grad():
        for n, m in sparse_linears(sparse).items():
            base.get_submodule(n).weight.copy_(m.weight * m.mask)
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        plain = base(input_ids=x).logits
        assert slorb_adapter.attach_(base, tmp_path / "slorb_adapter") == sum(b.numel() for _, b in loras.values())
        assert torch.allclose(base(input_ids=x).logits, sparse(input_ids=x).logits, atol=1e-6)
        assert not torch.allclose(plain, sparse(input_ids=x).logits, atol=1e-3)
        branches = slorb_adapter.detach_(base)
        assert len(branches) == 14 and not sparse_linears(base)
        assert torch.equal(base(input_ids=x).logits, plain)  # the plain base again


def test_peft_reads_what_we_write(tmp_path):
    from peft import PeftModel

    sparse = _sparse_with_branch(SLoRBConfig(group=8))
    slorb_adapter.save(tmp_path / "a", {n: m.slorb.lora() for n, m in sparse_linears(sparse).items()}, torch.float32,
                       tmp_path)
    base = _tiny()
    with torch.no_grad():
        for n, m in sparse_linears(sparse).items():
            base.get_submodule(n).weight.copy_(m.weight * m.mask)
    x = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert torch.allclose(PeftModel.from_pretrained(base, tmp_path / "a").eval()(input_ids=x).logits,
                              sparse(input_ids=x).logits, atol=1e-5)


def test_an_adapter_for_another_model_is_refused(tmp_path):
    sparse = _sparse_with_branch(SLoRBConfig(group=8))
    slorb_adapter.save(tmp_path / "a", {n: m.slorb.lora() for n, m in sparse_linears(sparse).items()}, torch.float32,
                       tmp_path)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(UsageError, match="does not fit its Linear"):
        slorb_adapter.attach_(other, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(UsageError, match="not a plain LoRA adapter"):
        slorb_adapter.read(tmp_path / "a")
    assert slorb_adapter.adapter_dir(tmp_path) is None and not any(isinstance(m, SparseLinear) for m in other.modules())

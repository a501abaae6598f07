import pytest
import torch
from torch import nn

from megatron_ast.errors import UsageError
from megatron_ast.sparsity.sparse_weights import check_ignore, decoder_layers, head_inputs, sparse_weights
from tests.families import FAMILIES, tiny_model


def test_orientation_follows_what_the_experts_module_states():
    oss = {w.local: w for w in sparse_weights(tiny_model("gpt_oss")) if w.layer == 0}
    gu = oss["mlp.experts.gate_up_proj"]
    assert gu.transposed and gu.experts == 4 and gu.shape == (4, 64, 256) and (gu.in_features, gu.out_features) == (64, 256)
    t = torch.arange(4 * 64 * 256).reshape(4, 64, 256)
    assert gu.matrices(t).shape == (4, 256, 64) and torch.equal(gu.stored(gu.out_in(t)), t)
    assert torch.equal(gu.matrices(t)[1, 5, 7], t[1, 7, 5])  # expert 1, output 5, input 7
    qwen = {w.local: w for w in sparse_weights(tiny_model("qwen3_moe")) if w.layer == 0}
    assert not qwen["mlp.experts.down_proj"].transposed and qwen["mlp.experts.down_proj"].in_features == 32
    gpt2 = {w.local: w for w in sparse_weights(tiny_model("gpt2")) if w.layer == 0}
    assert gpt2["mlp.c_fc.weight"].transposed and gpt2["mlp.c_fc.weight"].in_features == 64


@pytest.mark.parametrize("family", list(FAMILIES))
def test_routers_gates_embeddings_and_norms_are_never_sparse_weights(family):
    model = tiny_model(family)
    names = {w.name for w in sparse_weights(model)}
    params = dict(model.named_parameters())
    assert names <= set(params)
    for name in names:
        assert not any(part in ("gate", "router", "embed_tokens", "lm_head") for part in name.split("."))
        assert params[name].dim() in (2, 3) and "norm" not in name
    path, layers = decoder_layers(model)
    assert len(layers) == 2 and path in ("model.layers", "transformer.h", "model.decoder.layers")
    assert head_inputs(model) and all("norm" in type(m).__name__.lower() for m in head_inputs(model))


def test_ignore_and_bad_input():
    model = tiny_model("deepseek_v3")
    kept = sparse_weights(model, ignore=(r"\.experts\.", r"self_attn\.kv_"))
    assert not any(".experts." in w.name or ".kv_" in w.name for w in kept)
    assert {w.kind for w in kept} == {"attention", "mlp", "shared_expert"}
    with pytest.raises(UsageError, match=r"--ignore '\(\[' is not a regular expression"):
        check_ignore(["(["])
    model = tiny_model("llama")
    model.model.twins = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])  # a second list of 2: which are the layers?
    with pytest.raises(UsageError, match="cannot tell the decoder layers of LlamaForCausalLM: .*layers \\(2\\), twins \\(2\\)"):
        sparse_weights(model)


def test_found_on_the_meta_device_as_under_zero3():
    """Nothing is read but shapes: a 70B config costs nothing, and ZeRO-3's empty partitions keep ds_shape."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.families import COMMON

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **{**COMMON, **FAMILIES["qwen3_moe"]}))
    p = model.model.layers[0].mlp.experts.down_proj
    p.ds_shape = p.shape
    p.data = torch.empty(0, device="meta")
    w = next(w for w in sparse_weights(model) if w.name == "model.layers.0.mlp.experts.down_proj")
    assert w.shape == (4, 64, 32) and w.numel == 4 * 64 * 32

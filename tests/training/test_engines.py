import pytest

from megatron_ast.errors import UsageError
from megatron_ast.training.engines import decoder_linears, masked_weights
from tests.families import tiny_model


def test_ast_masks_linears_and_fused_experts_and_names_what_it_cannot():
    model = tiny_model("qwen3_moe")
    assert sum(w.experts > 0 for w in masked_weights(model)) == 4  # gate_up and down of both layers
    assert not any(w.experts for w in masked_weights(model, ignore=(r"\.experts\.",)))
    linears = decoder_linears(model)
    assert sorted(linears) == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo")
    assert len(decoder_linears(tiny_model("qwen3_5_text"))) == 15  # Gated DeltaNet's projections are Linears too
    with pytest.raises(UsageError, match=r"train: transformer.h.0.attn.c_attn.weight is a GPT-2 Conv1D"):
        masked_weights(tiny_model("gpt2"))

import pytest

from megatron_ast.errors import UsageError
from megatron_ast.training.engines import decoder_linears
from tests.families import tiny_model


def test_ast_masks_the_linears_and_names_the_fused_experts_it_cannot_mask_yet():
    model = tiny_model("qwen3_moe")
    with pytest.raises(UsageError, match=r"train: model.layers.0.mlp.experts.gate_up_proj is a fused expert weight, "
                                         r"which AST does not mask yet: add its name to the run's `ignore` list"):
        decoder_linears(model)
    linears = decoder_linears(model, ignore=(r"\.experts\.",))
    assert sorted(linears) == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo")
    assert len(decoder_linears(tiny_model("qwen3_5_text"))) == 15  # Gated DeltaNet's projections are Linears too

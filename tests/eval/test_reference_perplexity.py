import pytest

from data_tools.preprocess import preprocess
from megatron_ast.eval.perplexity import perplexity, token_windows
from megatron_ast.modeling import load_causal_lm


@pytest.mark.assets
@pytest.mark.slow
def test_dense_smollm2_on_held_out_shakespeare(reference_assets, tmp_path):
    """DESIGN.md §7: about 31 at 512-token windows on held-out Shakespeare."""
    preprocess([reference_assets["corpus"]["book"]["validation"]], tmp_path / "val", reference_assets["tokenizer"])
    windows = token_windows([str(tmp_path / "val")], reference_assets["tokenizer"], 512, 8)
    r = perplexity(load_causal_lm(reference_assets["model"]), windows)
    assert 15 < r["book"]["ppl"] < 60, r

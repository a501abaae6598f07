import copy

import pytest
import torch

from megatron_ast.errors import UsageError
from megatron_ast.pruning.pipeline import PruneConfig, prune_model
from megatron_ast.sparsity import SparsityPattern, mask_from_score, nm_violations, wanda_score
from megatron_ast.sparsity.sparse_weights import sparse_weights


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "sparsellm"])
def test_every_decoder_linear_is_exactly_the_pattern(tiny, calib, arch, method):
    if arch == "gpt2" and method == "sparsellm":
        with pytest.raises(UsageError, match="sparsellm: no FFN of this GPT2LMHeadModel is one its solve handles"):
            prune_model(tiny(arch), PruneConfig(method, SparsityPattern.parse("2:4")), calib)
        return
    model = tiny(arch)
    emb_before = model.get_input_embeddings().weight.clone()
    masks, rows = prune_model(model, PruneConfig(method, SparsityPattern.parse("2:4")), calib)
    weights = {w.name: w for w in sparse_weights(model)}
    assert len(rows) == len(masks) == len(weights) == {"llama": 14, "opt": 12, "gpt2": 8}[arch]
    for name, mask in masks.items():
        w = model.get_parameter(name)
        assert mask.shape == w.shape  # masks are shaped like the weight as stored (GPT-2's Conv1D: (in, out))
        assert nm_violations(weights[name].out_in(w), 2, 4) == 0 and bool(((w != 0) <= mask).all())
    assert all(r["pattern_valid"] for r in rows)
    assert torch.equal(model.get_input_embeddings().weight, emb_before)  # embeddings are never pruned
    if method != "magnitude":
        assert all(0 < r["reconstruction_error"] < 1 for r in rows)


def _q_proj_input_sq(model, calib) -> torch.Tensor:
    """Sum over calibration tokens of x_j^2 at layer 1's q_proj input."""
    sq = torch.zeros(64)

    def record(module, args):
        sq.add_((args[0].reshape(-1, 64) ** 2).sum(0))

    handle = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(record)
    with torch.no_grad():
        for row in calib:
            model(input_ids=row[None])
    handle.remove()
    return sq


def _untied_mismatches(mask, score) -> int:
    """Groups where `mask` differs from the 2:4 mask of `score`, ties to float noise (1e-4 relative) excepted."""
    expected = mask_from_score(score, SparsityPattern.parse("2:4"))
    differ = (expected != mask).reshape(score.shape[0], -1, 4).any(-1)
    ranked = score.reshape(score.shape[0], -1, 4).sort(-1, descending=True).values
    tied = (ranked[..., 1] - ranked[..., 2]) <= 1e-4 * ranked[..., 1]
    return int((differ & ~tied).sum())


def test_layer_inputs_come_from_the_already_pruned_layer(tiny, calib):
    """Wanda's layer-1 mask must follow the activations of the *pruned* layer 0, not the dense one."""
    model = tiny("llama")
    dense = copy.deepcopy(model)
    masks, _ = prune_model(model, PruneConfig("wanda", SparsityPattern.parse("2:4")), calib)
    mask = masks["model.layers.1.self_attn.q_proj.weight"]
    w_dense = dense.model.layers[1].self_attn.q_proj.weight.detach()
    assert _untied_mismatches(mask, wanda_score(w_dense, _q_proj_input_sq(model, calib))) == 0
    assert _untied_mismatches(mask, wanda_score(w_dense, _q_proj_input_sq(dense, calib))) > 0


def test_sparsellm_beats_sparsegpt_on_the_ffn_output(tiny, calib):
    for arch in ("llama", "opt"):
        _, rows = prune_model(tiny(arch), PruneConfig("sparsellm", SparsityPattern.parse("unstructured", 0.7)), calib)
        infos = [r["sparsellm"] for r in rows if "sparsellm" in r]
        assert infos and all(i["ffn_error_sparsellm"] < i["ffn_error_sparsegpt"] and not i["fallback_to_sparsegpt"]
                             for i in infos)


def test_sparsellm_falls_back_when_it_cannot_improve(tiny, calib, monkeypatch):
    import megatron_ast.pruning.sparsellm as sl

    def poisoned(inputs, target, cfg):  # a diverging refit
        pruned, keep = real(inputs, target, cfg)
        return pruned * float("nan"), keep

    real = sl._refit
    monkeypatch.setattr(sl, "_refit", poisoned)
    model = tiny("llama")
    _, rows = prune_model(model, PruneConfig("sparsellm", SparsityPattern.parse("2:4")), calib)
    infos = [r["sparsellm"] for r in rows if "sparsellm" in r]
    assert all(i["fallback_to_sparsegpt"] for i in infos)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_family_no_table_names_and_bad_shapes(tiny, calib):
    """GPT-NeoX is in no list of ours: its layers and Linears are found from the model itself."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=4, intermediate_size=64))
    masks, rows = prune_model(neox, PruneConfig("sparsegpt", SparsityPattern.parse("2:4")), calib % 100)
    assert sorted(masks) == sorted(f"gpt_neox.layers.0.{m}.weight" for m in
                                   ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
    assert all(r["pattern_valid"] for r in rows) and {r["kind"] for r in rows} == {"attention", "mlp"}
    with pytest.raises(UsageError, match="model.layers.0.self_attn.q_proj.weight: in_features 64 is not a multiple of M=3"):
        prune_model(tiny("llama"), PruneConfig("magnitude", SparsityPattern.parse("2:3")), None)
    with pytest.raises(UsageError, match="needs calibration data"):
        prune_model(tiny("llama"), PruneConfig("wanda", SparsityPattern.parse("2:4")), None)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_lm_head_pruned_by_wanda_on_the_final_hidden_states_when_asked(tiny, calib, arch):
    model = tiny(arch)
    model.config.tie_word_embeddings = False
    if model.lm_head.weight is model.get_input_embeddings().weight:  # untie, so only the head may change
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    emb_before = model.get_input_embeddings().weight.clone()
    dense_head = model.lm_head.weight.detach().clone()
    masks, rows = prune_model(model, PruneConfig("wanda", SparsityPattern.parse("2:4"), prune_head=True), calib)
    head = model.lm_head.weight
    assert nm_violations(head, 2, 4) == 0 and "lm_head.weight" in masks and rows[-1]["name"] == "lm_head.weight"
    assert torch.equal(model.get_input_embeddings().weight, emb_before)
    # the head's inputs, seen directly on the pruned model: the same Wanda mask
    sq = torch.zeros(64)
    handle = model.lm_head.register_forward_pre_hook(lambda m, a: sq.add_((a[0].reshape(-1, 64) ** 2).sum(0)))
    with torch.no_grad():
        for row in calib:
            model(input_ids=row[None])
    handle.remove()
    expected = mask_from_score(wanda_score(dense_head, sq / calib.numel()), SparsityPattern.parse("2:4"))
    assert (expected == masks["lm_head.weight"]).float().mean() > 0.999  # equal up to float ties
    assert not torch.equal(expected, mask_from_score(dense_head.abs(), SparsityPattern.parse("2:4")))


def test_tied_embeddings_are_pruned_once_by_magnitude(tiny, calib):
    model = tiny("gpt2")  # GPT-2 ties lm_head to the input embedding
    dense = model.get_input_embeddings().weight.detach().clone()
    masks, rows = prune_model(model, PruneConfig("sparsegpt", SparsityPattern.parse("2:4"), prune_embeddings=True), calib)
    emb = model.get_input_embeddings().weight
    assert emb is model.lm_head.weight and nm_violations(emb, 2, 4) == 0
    assert torch.equal(masks["transformer.wte.weight"], mask_from_score(dense.abs(), SparsityPattern.parse("2:4")))
    assert rows[-1]["tied"] and rows[-1]["method"] == "magnitude" and len([r for r in rows if "tied" in r]) == 1

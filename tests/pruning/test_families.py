"""Every decoder family users bring, end to end on a tiny random model: prune (each method that applies),
reload with transformers, eval ppl --expect 2:4, quantize. One concept finds the weights for all of them
(megatron_ast/sparsity/sparse_weights.py); no stage keeps a family table."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from megatron_ast import hf_layout
from megatron_ast.cli import main
from megatron_ast.sparsity import nm_violations
from megatron_ast.sparsity.sparse_weights import sparse_weights
from tests.conftest import stdlib_texts, write_jsonl
from tests.families import FAMILIES, MOE, tiny_model

KINDS = {  # the matrices of each kind in the tiny models (experts one by one)
    "llama": {"attention": 8, "mlp": 6}, "qwen3_5_text": {"linear_attention": 5, "attention": 4, "mlp": 6},
    "phi3": {"attention": 4, "mlp": 4}, "gpt2": {"attention": 4, "mlp": 4}, "opt": {"attention": 8, "mlp": 4},
    "qwen3_moe": {"attention": 8, "routed_expert": 16}, "mixtral": {"attention": 8, "routed_expert": 16},
    "gpt_oss": {"attention": 8, "routed_expert": 16},
    "deepseek_v3": {"attention": 10, "mlp": 3, "routed_expert": 8, "shared_expert": 3},
}


NO_SPARSELLM = {"gpt2": "no gate/up/down or fc1/fc2 Linears", "phi3": "one fused Linear (gate_up_proj)",
                "gemma3_text": "its activation is GELUTanh", "gpt_oss": "routed experts", "qwen3_moe": "routed experts",
                "mixtral": "routed experts"}


def _stored(d) -> dict[str, tuple]:
    with safe_open(str(d / "model.safetensors"), framework="pt") as h:
        return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("family_data")
    return write_jsonl(d / "github" / "c.jsonl", stdlib_texts(8)), write_jsonl(d / "val" / "v.jsonl", stdlib_texts(12)[8:])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_prunes_reloads_evaluates_and_quantizes(family, tmp_path, hf_tokenizer_dir, data, capsys):
    calib, val = data
    src = tmp_path / "dense"
    dense = tiny_model(family)
    dense.save_pretrained(src)
    for f in hf_tokenizer_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    weights = sparse_weights(dense)
    counts = {}
    for w in weights:
        counts[w.kind] = counts.get(w.kind, 0) + (w.experts or 1)
    assert counts == KINDS.get(family, {"attention": 8, "mlp": 6})
    for method in ["magnitude", "wanda", "sparsegpt", "sparsellm"]:
        out = tmp_path / method
        args = [] if method == "magnitude" else ["--calib", str(calib), "--nsamples", "4", "--seqlen", "32",
                                                   "--expert-min-tokens", "4"]
        rc = main(["prune", "--model", str(src), "--method", method, *args, "--out", str(out)])
        if method == "sparsellm" and family in NO_SPARSELLM:  # its solve is SiLU-gated or ReLU, on unfused Linears
            assert rc == 2 and NO_SPARSELLM[family] in capsys.readouterr().err.strip().splitlines()[-1]
            continue
        assert rc == 0, method
        report = json.loads((out / "sparsity_report.json").read_text())
        assert report["all_valid"] and report["sparsity"] == pytest.approx(0.5)
        assert {k: c["matrices"] for k, c in report["by_kind"].items()} == counts
        # the layout save_pretrained writes for the family, and the masks under the same stored names
        stored = _stored(out)
        assert stored == _stored(src)
        with safe_open(str(out / "masks.safetensors"), framework="pt") as h:
            masks = {k: h.get_tensor(k) for k in h.keys()}
        assert masks and all(stored[k] == tuple(m.shape) for k, m in masks.items())
        model = AutoModelForCausalLM.from_pretrained(out)
        as_model = hf_layout.to_model(model, masks)
        for w in sparse_weights(model):
            p = model.get_parameter(w.name)
            assert nm_violations(w.matrices(p).reshape(-1, w.in_features), 2, 4) == 0, (method, w.name)
            assert bool(((p != 0) <= as_model[w.name]).all()), (method, w.name)
        if method == "magnitude":  # the kept values are the dense ones: the reloaded model is the dense one masked
            with torch.no_grad():
                for w in sparse_weights(dense):
                    dense.get_parameter(w.name).mul_(as_model[w.name])
                x = torch.randint(2, 600, (1, 24), generator=torch.Generator().manual_seed(0))
                torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=0, atol=0)
    capsys.readouterr()
    assert main(["eval", "ppl", "--model", str(tmp_path / "sparsegpt"), "--data", str(val), "--seq-len", "32",
                 "--max-windows", "2", "--expect", "2:4"]) == 0
    ppl = json.loads(capsys.readouterr().out)
    assert all(v == v and v > 1 for v in _numbers(ppl)), ppl
    q = ["quantize", "--model", str(tmp_path / "magnitude"), "--bits", "4", "--group-size", "16", "--method", "rtn",
         "--out", str(tmp_path / "int4")]
    if family in MOE:
        assert main(q) == 2
        assert "is a fused expert weight" in capsys.readouterr().err.strip().splitlines()[-1]
        gptq = [*q[:-3], "gptq", "--calib", str(calib), "--nsamples", "4", "--seqlen", "32", *q[-2:]]
        assert main([*gptq, "--ignore", r"\.experts\."]) == 0  # the rest int4, the experts float under their masks
        report = json.loads((tmp_path / "int4" / "compression_report.json").read_text())
        assert report["all_zeros_kept"] and report["decoder_linears"]["count"] == KINDS[family]["attention"] + \
            KINDS[family].get("mlp", 0) + KINDS[family].get("shared_expert", 0)
    else:
        assert main(q) == 0
        assert json.loads((tmp_path / "int4" / "compression_report.json").read_text())["all_zeros_kept"]


def _numbers(obj):
    if isinstance(obj, dict):
        return [x for k, v in obj.items() if "ppl" in k or isinstance(v, dict) for x in _numbers(v)]
    return [obj] if isinstance(obj, float) else []

"""AST on MoE through the CLI: a tiny Qwen3-MoE ((out, in) experts) and gpt-oss ((in, out) experts with biases),
2 ranks, ZeRO-3 student and teacher; masks on the fused expert partitions, the SR-STE step, the load-balancing term
and the expert-load histogram; resume bit for bit; export in the layout save_pretrained writes, reloaded logits
equal to the masked student's."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from megatron_ast import hf_layout
from megatron_ast.cli import main
from megatron_ast.sparsity import nm_violations
from megatron_ast.sparsity.sparse_weights import sparse_weights
from tests.families import tiny_model
from tests.training.conftest import ckpt_masks, config_file, consolidated, train


def _moe_dir(run_dir, family: str):
    src = run_dir / family
    if not src.is_dir():
        tiny_model(family).save_pretrained(src)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (src / f).write_bytes((run_dir / "dense" / f).read_bytes())
    return src


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _keys(d) -> set[str]:
    with safe_open(str(d / "model.safetensors"), framework="pt") as h:
        return set(h.keys())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_ast_on_fused_experts_trains_resumes_exports_and_reloads(run_dir, family, tmp_path):
    src = _moe_dir(run_dir, family)
    over = {"model": str(src), "steps": 4, "mask_interval": 2, "checkpoint": {"every": 2, "keep": 3},
            "eval": {"every": 0, "windows": 2}, "srste": {"lam": 2e-4, "t_inc": 4}, "slorb": None,
            "distill": {"w_router": 0.01}, "output_dir": str(run_dir / f"{family}-ref")}
    train(config_file(run_dir, **over))
    ref = run_dir / f"{family}-ref"
    assert json.loads((ref / "summary.json").read_text())["masked_expert_weights"] == 4
    log = _log(ref)
    assert all(r["loss_router"] > 0 for r in log)
    for r in log:  # every expert's share of each layer's routed tokens
        assert set(r["expert_load"]) == {"0", "1"}
        assert all(len(v) == 4 and abs(sum(v) - 1) < 1e-3 for v in r["expert_load"].values())
    masks = ckpt_masks(ref / "checkpoints" / "step4")
    experts = [n for n in masks if ".experts." in n]
    assert len(experts) == 4 and all(masks[n].shape == tiny_model(family).get_parameter(n).shape for n in experts)

    # resumed at step 2 in another dir: steps 3 and 4 bit for bit
    resumed = run_dir / f"{family}-resumed"
    train(config_file(run_dir, **{**over, "output_dir": str(resumed), "resume": str(ref / "checkpoints" / "step2")}))
    assert [r["loss"] for r in _log(resumed)] == [r["loss"] for r in log[2:]]
    a, b = consolidated(ref / "checkpoints" / "step4"), consolidated(resumed / "checkpoints" / "step4")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # export: the stored layout of the family (per-expert files for Qwen3-MoE), masks under the same names
    out = tmp_path / "hf"
    assert main(["export", str(ref / "checkpoints" / "step4"), "--out", str(out)]) == 0
    assert _keys(out) == _keys(src)
    model = AutoModelForCausalLM.from_pretrained(out)
    with safe_open(str(out / "masks.safetensors"), framework="pt") as h:
        stored = {k: h.get_tensor(k) for k in h.keys()}
    assert set(stored) <= _keys(out)
    as_model = hf_layout.to_model(model, stored)
    student = tiny_model(family)
    with torch.no_grad():
        for name, p in student.named_parameters():
            p.copy_(a[name])
        for w in sparse_weights(model):
            p = model.get_parameter(w.name)
            assert nm_violations(w.matrices(p).reshape(-1, w.in_features), 2, 4) == 0, w.name
            mask = masks[w.module if w.is_linear else w.name]
            assert torch.equal(as_model[w.name], mask)
            student.get_parameter(w.name).mul_(mask)
        x = torch.randint(2, 600, (1, 24), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model(x).logits, student(x).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_an_moe_starts_from_the_per_expert_masks_of_its_pruned_dir(run_dir, tmp_path):
    """Qwen3-MoE's pruned dir stores its masks per expert (`experts.{e}.gate_proj.weight`): each rank reads and
    converts only the experts its partition overlaps, and the run starts from exactly those masks."""
    src, pruned = _moe_dir(run_dir, "qwen3_moe"), tmp_path / "pruned"
    assert main(["prune", "--model", str(src), "--method", "wanda", "--calib", str(run_dir / "corpus"), "--nsamples", "4",
                 "--seqlen", "32", "--expert-min-tokens", "4", "--out", str(pruned)]) == 0
    out = run_dir / "qwen3_moe-from-pruned"
    train(config_file(run_dir, model=str(src), init=str(pruned), pruned_values="dense", steps=2, mask_interval=2,
                      checkpoint={"every": 2, "keep": 1}, eval={"every": 0, "windows": 2}, slorb=None,
                      output_dir=str(out)))
    with safe_open(str(pruned / "masks.safetensors"), framework="pt") as h:
        stored = {k: h.get_tensor(k) for k in h.keys()}
    assert any(".experts.3.gate_proj." in k for k in stored)  # the stored layout, one file tensor per expert
    want = hf_layout.to_model(tiny_model("qwen3_moe"), stored)
    from megatron_ast.training import checkpoint
    from megatron_ast.training.mask_partitions import masks_from_rank_files

    initial = masks_from_rank_files(checkpoint.rank_files(out / "checkpoints" / "step2"), "initial")
    experts = [n for n in initial if ".experts." in n]
    assert len(experts) == 4 and all(torch.equal(initial[n], want[n]) for n in experts)

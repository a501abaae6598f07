"""MoE calibration against magnitude: each expert calibrated on the tokens its router sends it, or on every token.

No MoE checkpoint is on this machine, so the model is made from the real SmolLM2-135M by sparse upcycling (as
Mixtral-style MoEs are grown from dense ones): a Mixtral (Llama's attention, fused [experts, out, in] experts) of
its first `--layers` layers, its attention, norms and embeddings copied, each of `--experts` experts its MLP plus
`--noise` relative Gaussian noise, a random router, top-2. Each pruner prunes it to 2:4 on calibration windows of the train split; the figure is each
decoder layer's MoE block output error on held-out validation windows, ||moe_p(x) - moe(x)||^2 / ||moe(x)||^2
with x the dense model's inputs to that block, averaged over layers. With all of the source's layers
(`--layers 30`) the perplexity on those windows is measured too; a truncated model's is meaningless (SmolLM2's
first 6 layers alone: 1.8e8, the upcycled model the same), so it is left out.

    python bench/moe_calibration.py [--layers 4 --experts 8 --nsamples 32 --seqlen 256 --windows 16 --name vm]
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_result  # noqa: E402
from reference import reference_shards  # noqa: E402

RUNS = [("magnitude", "routed"), ("wanda", "routed"), ("wanda", "all"), ("sparsegpt", "routed"), ("sparsegpt", "all")]


def upcycled(model_dir: str, layers: int, experts: int, noise: float, seed: int = 0):
    """A Mixtral grown from the dense Llama-shaped model in `model_dir` (its first `layers` layers)."""
    from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig

    from megatron_ast.modeling import load_causal_lm

    dense = load_causal_lm(model_dir, adapter=False)
    c = AutoConfig.from_pretrained(model_dir)
    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=layers,
                        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                        head_dim=c.hidden_size // c.num_attention_heads, intermediate_size=c.intermediate_size,
                        num_local_experts=experts, num_experts_per_tok=2, rms_norm_eps=c.rms_norm_eps,
                        rope_parameters=getattr(c, "rope_parameters", None), tie_word_embeddings=c.tie_word_embeddings,
                        max_position_embeddings=c.max_position_embeddings, sliding_window=None)
    torch.manual_seed(seed)
    moe = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        moe.model.embed_tokens.weight.copy_(dense.model.embed_tokens.weight)
        moe.model.norm.weight.copy_(dense.model.norm.weight)
        if moe.lm_head.weight is not moe.model.embed_tokens.weight:  # tied or not, the dense model's head
            moe.lm_head.weight.copy_(dense.get_output_embeddings().weight)
        for src, dst in zip(dense.model.layers, moe.model.layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(dst.self_attn, name).weight.copy_(getattr(src.self_attn, name).weight)
            dst.input_layernorm.weight.copy_(src.input_layernorm.weight)
            dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight)
            gate_up = torch.cat([src.mlp.gate_proj.weight, src.mlp.up_proj.weight])
            for e in range(experts):
                for w, base in ((dst.mlp.experts.gate_up_proj[e], gate_up), (dst.mlp.experts.down_proj[e], src.mlp.down_proj.weight)):
                    w.copy_(base * (1 + noise * torch.randn(base.shape, generator=g)))
            dst.mlp.gate.weight.copy_(torch.randn(dst.mlp.gate.weight.shape, generator=g) / math.sqrt(c.hidden_size))
    return moe


@torch.no_grad()
def block_inputs(model, windows: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per layer, the dense model's inputs to its MoE block on each window."""
    seen = [[] for _ in model.model.layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().clone()))
             for i, layer in enumerate(model.model.layers)]
    for w in windows:
        model(input_ids=w[None])
    for h in hooks:
        h.remove()
    return seen


@torch.no_grad()
def block_error(dense, pruned, inputs) -> list[float]:
    out = []
    for i, xs in enumerate(inputs):
        num = den = 0.0
        for x in xs:
            y = dense.model.layers[i].mlp(x)
            num += float(((pruned.model.layers[i].mlp(x) - y) ** 2).sum())
            den += float((y ** 2).sum())
        out.append(num / den)
    return out


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    nll = n = 0.0
    for w in windows:
        logits = model(input_ids=w[None]).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        n += w.numel() - 1
    return math.exp(nll / n)


def main() -> None:
    from transformers import AutoConfig

    from megatron_ast.eval.perplexity import token_windows
    from megatron_ast.pruning.calibration import calibration_samples
    from megatron_ast.pruning.pipeline import PruneConfig, prune_model, summary
    from megatron_ast.sparsity import SparsityPattern

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16, help="held-out validation windows per domain")
    ap.add_argument("--work", default="runs/bench_moe_calibration")
    ap.add_argument("--name", default="vm")
    a = ap.parse_args()
    assets, shards = reference_shards(Path(a.work))
    moe = upcycled(assets["model"], a.layers, a.experts, a.noise)
    calib = calibration_samples([str(shards["train"])], assets["tokenizer"], a.nsamples, a.seqlen, seed=0)
    held = torch.from_numpy(__import__("numpy").concatenate(
        list(token_windows([str(shards["validation"])], assets["tokenizer"], a.seqlen, a.windows).values())))
    inputs = block_inputs(moe, held)
    whole = a.layers == AutoConfig.from_pretrained(assets["model"]).num_hidden_layers
    ppl = perplexity if whole else (lambda model, windows: None)  # noqa: E731
    rows = [{"method": "dense", "perplexity": ppl(moe, held)}]
    for method, routing in RUNS:
        model = copy.deepcopy(moe)
        t0 = time.perf_counter()
        _, report = prune_model(model, PruneConfig(method, SparsityPattern.parse("2:4"), expert_calibration=routing),
                                calib if method != "magnitude" else None)
        errors = block_error(moe, model, inputs)
        row = {"method": method, "expert_calibration": routing if method != "magnitude" else None,
               "moe_block_error": sum(errors) / len(errors), "moe_block_error_by_layer": errors,
               "perplexity": ppl(model, held), "prune_s": round(time.perf_counter() - t0, 1),
               "experts_magnitude_fallback": summary(report)["routed_expert"]["experts_magnitude_fallback"]}
        rows.append(row)
        print(f"{method} {row['expert_calibration']}: MoE block error {row['moe_block_error']:.4f}, "
              f"ppl {row['perplexity']} ({row['prune_s']} s)", flush=True)
    base = rows[1]["moe_block_error"]
    for r in rows[1:]:
        r["error_vs_magnitude"] = r["moe_block_error"] / base
    write_result("moe_calibration", a.name, {
        "model": f"Mixtral upcycled from SmolLM2-135M: {a.layers} layers, {a.experts} experts (top-2), "
                 f"noise {a.noise}, random router", "pattern": "2:4",
        "calibration": {"nsamples": a.nsamples, "seqlen": a.seqlen, "split": "train"},
        "held_out": {"windows": int(held.shape[0]), "seqlen": a.seqlen, "split": "validation"}, "rows": rows})


if __name__ == "__main__":
    main()

"""Tiny random models of the decoder families users bring, built from transformers' own config classes.

Each is two layers, hidden 64, vocabulary 600 (the test tokenizer's), so every family is pruned, reloaded
and measured in seconds. MoE families have 4 experts with 2 active; DeepSeek-V3 keeps its first layer
dense, its MLA attention and a shared expert; Qwen3.5 has a Gated DeltaNet layer beside a full one.
"""
from __future__ import annotations

import torch

COMMON = dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=0)
FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "phi3": {}, "olmo2": {}, "granite": {},
    "gemma3_text": dict(sliding_window=16),
    "qwen3_5_text": dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                         linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=128),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"]),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                        n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=16, n_shared_experts=1, head_dim=8, num_key_value_heads=4),
}
MOE = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3")


def tiny_model(family: str, seed: int = 0):
    """A random model of `family` (fp32, eval mode); expert weights drawn like a Linear's so none is all zero."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family]}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3:  # fused experts: transformers' init may leave them for the loader
                p.normal_(0, 0.05)
            elif name.endswith("bias") and "experts" in name:
                p.normal_(0, 0.01)
    return model.eval()

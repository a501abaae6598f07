import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

TINY = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    "opt": lambda: OPTForCausalLM(OPTConfig(vocab_size=600, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                            num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=64)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=600, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                               bos_token_id=0, eos_token_id=0)),
}


@pytest.fixture()
def tiny():
    def make(arch: str):
        torch.manual_seed(0)
        return TINY[arch]().eval()

    return make


@pytest.fixture()
def calib():
    return torch.randint(0, 600, (16, 32), generator=torch.Generator().manual_seed(1))

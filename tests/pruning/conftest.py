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


@pytest.fixture()
def model_dir(tmp_path, tiny, hf_tokenizer_dir):
    """A tiny Llama saved with a real tokenizer: what `megatron-ast prune/quantize --model` takes."""
    d = tmp_path / "dense"
    tiny("llama").save_pretrained(d)
    for f in hf_tokenizer_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


@pytest.fixture()
def calib_file(tmp_path):
    from tests.conftest import stdlib_texts, write_jsonl

    return write_jsonl(tmp_path / "calib" / "github" / "c.jsonl", stdlib_texts(10))

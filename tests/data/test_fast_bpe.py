"""The tiktoken fast path gives Hugging Face's ids, routes what it cannot encode, and steps aside when it differs."""
import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from megatron_ast.data.fast_bpe import unicode_to_byte
from megatron_ast.data.tokenizer import Tokenizer
from tests.conftest import stdlib_texts

EDGE = ["it's we'll they've I'm you'd", "  two  spaces\n\n\ttab\r\nend   ", "3.14159 and 2026-11-23", "日本語のテキスト",
        "emoji 👍🏽 and combining e\u0301", "<|endoftext|>inside<pad>text<|endoftext|>", "", " ", "x\x04y\x1d", "naïve café"]


def _hf_ids(tok_dir: Path, texts: list[str]) -> list[list[int]]:
    tok = RustTokenizer.from_file(str(tok_dir / "tokenizer.json"))
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def _save(tok: RustTokenizer, d: Path) -> Path:
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return d


def test_fast_path_gives_the_ids_of_tokenizers(hf_tokenizer_dir):
    tok = Tokenizer.load(hf_tokenizer_dir)
    assert tok.engine == "tiktoken"
    texts = stdlib_texts(60) + EDGE
    assert tok.encode_batch(texts) == _hf_ids(hf_tokenizer_dir, texts)
    assert tok.engine == "tiktoken"  # the first-batch check passed
    assert Tokenizer.load(hf_tokenizer_dir, fast_bpe=False).engine == "tokenizers"


def test_characters_without_a_byte_token_go_to_tokenizers(tmp_path):
    """No token for the bytes 0x04, 0xE4 (the lead byte of U+4000-U+4FFF) and 0xF0 (of emoji): HF drops such a
    character; tiktoken would fail on it."""
    alphabet = [c for c, b in unicode_to_byte().items() if b not in (0x04, 0xE4, 0xF0)]
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(stdlib_texts(20), trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                                   initial_alphabet=alphabet))
    fast = Tokenizer.load(_save(tok, tmp_path))
    assert fast.engine == "tiktoken"
    odd = "\u4e2d\u6587 and \U0001F600"
    texts = stdlib_texts(20)[:5] + ["caf\u00e9 \u00fc\u00df", odd, "x\x04y"]
    hf = _hf_ids(tmp_path, texts)
    assert fast.encode_batch(texts) == hf and fast.engine == "tiktoken"
    assert len(hf[-2]) < len(odd.encode())  # bytes were dropped: the routed case ran


def test_tokenizers_that_are_not_plain_byte_level_bpe_keep_tokenizers(hf_tokenizer_dir, tmp_path):
    shutil.copytree(hf_tokenizer_dir, tmp_path / "t")
    tok = RustTokenizer.from_file(str(tmp_path / "t" / "tokenizer.json"))
    tok.normalizer = normalizers.NFKC()
    tok.save(str(tmp_path / "t" / "tokenizer.json"))
    t = Tokenizer.load(tmp_path / "t")
    assert t.engine == "tokenizers"
    texts = ["\ufb01ne \u00bd \u2460", *stdlib_texts(3)]
    assert t.encode_batch(texts) == _hf_ids(tmp_path / "t", texts)


def test_a_vocabulary_where_the_two_differ_falls_back_to_tokenizers(tmp_path, capfd):
    """Merges b+c, a+b, ab+c: for "abc" tokenizers stops at [a, bc] (there is no a+bc merge), while tiktoken joins
    a and bc because "abc" has a rank. The structure checks pass; the first-batch comparison catches it."""
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    n = len(vocab)
    vocab.update({"bc": n, "ab": n + 1, "abc": n + 2})
    tok = RustTokenizer(models.BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|endoftext|>"])
    t = Tokenizer.load(_save(tok, tmp_path))
    assert t.engine == "tiktoken"
    texts = ["abc abc", "xabcx"]
    hf = _hf_ids(tmp_path, texts)
    assert all(n in ids and n + 2 not in ids for ids in hf)  # [a, bc], never "abc"
    assert t.encode_batch(texts) == hf
    assert t.engine == "tokenizers"
    assert "differs from tokenizers" in capfd.readouterr().err


@pytest.mark.assets
@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "llama3-style"])
def test_a_real_tokenizer_on_the_reference_corpus_and_every_vocabulary_entry(reference_assets, which):
    """SmolLM2's (GPT-2's shape) and a 32k tokenizer of Llama-3's exact structure trained on the corpus
    (Split on Llama-3's regex, ByteLevel without one, ignore_merges): every train and validation document of both
    domains, and every token's own text. Before: the Llama-3 shape fell back to tokenizers."""
    from megatron_ast.assets import llama3_style_tokenizer

    d = Path(reference_assets["tokenizer"]) if which == "smollm2" else llama3_style_tokenizer()
    fast, hf = Tokenizer.load(d), Tokenizer.load(d, fast_bpe=False)
    assert fast.engine == "tiktoken"
    docs = [json.loads(line)["text"] for dom in reference_assets["corpus"].values() for f in dom.values()
            for line in open(f, encoding="utf-8")]
    rust = RustTokenizer.from_file(str(d / "tokenizer.json"))
    pieces = [rust.decode([i]) for i in sorted(rust.get_vocab().values())]
    for texts in (docs, pieces, EDGE):
        assert fast.encode_batch(texts) == hf.encode_batch(texts)
    assert fast.engine == "tiktoken"


def test_qwen2s_shape_nfc_then_split_takes_the_fast_path(tmp_path):
    """Qwen2/2.5/3: an NFC normalizer, a Split on Llama-3's regex with single digits, ByteLevel without a regex."""
    from tokenizers import Regex

    from megatron_ast.assets import LLAMA3_PATTERN

    tok = RustTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(stdlib_texts(30), trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>"],
                                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = Tokenizer.load(_save(tok, tmp_path))
    assert t.engine == "tiktoken"
    texts = [*stdlib_texts(40), *EDGE, "cafe\u0301 vs caf\u00e9 12345", "\u212b \u2126"]  # NFC changes these
    assert t.encode_batch(texts) == _hf_ids(tmp_path, texts) and t.engine == "tiktoken"

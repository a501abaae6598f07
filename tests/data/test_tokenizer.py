import json

import pytest
from transformers import AutoTokenizer

from megatron_ast.data.tokenizer import Tokenizer
from megatron_ast.errors import UsageError
from tests.conftest import stdlib_texts


def test_hf_batch_encode_matches_transformers_per_document(hf_tokenizer_dir):
    tok = Tokenizer.load(hf_tokenizer_dir)
    ref = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    texts = [t[:2000] for t in stdlib_texts(8)]
    assert tok.encode_batch(texts) == [ref(t, add_special_tokens=False).input_ids for t in texts]
    assert tok.identity.eod_id == ref.convert_tokens_to_ids("<|endoftext|>")
    assert tok.decode(tok.encode_batch(["def f(x):\n    return x"])[0]) == "def f(x):\n    return x"


def test_sentencepiece(sp_model):
    import sentencepiece as spm

    tok = Tokenizer.load(sp_model)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert tok.identity.kind == "sentencepiece" and tok.identity.eod_id == sp.eos_id()
    assert tok.encode_batch(["import os", "x = 1"]) == [sp.encode("import os"), sp.encode("x = 1")]


def test_identity_tracks_the_vocabulary(hf_tokenizer_dir, sp_model, tmp_path):
    a = Tokenizer.load(hf_tokenizer_dir).identity
    assert a.same_vocab(Tokenizer.load(hf_tokenizer_dir).identity.to_dict())
    assert not a.same_vocab(Tokenizer.load(sp_model).identity.to_dict())
    # the same vocabulary with another EOD is another identity
    other = tmp_path / "tok"
    other.mkdir()
    (other / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))
    assert not a.same_vocab(Tokenizer.load(other).identity.to_dict())


def test_unreadable_tokenizers_are_usage_errors(tmp_path, hf_tokenizer_dir):
    with pytest.raises(UsageError, match="cannot read a tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UsageError, match="unreadable tokenizer"):
        Tokenizer.load(tmp_path)
    with pytest.raises(UsageError, match="end-of-document"):
        Tokenizer.load(hf_tokenizer_dir, eod_token="<no such token>")

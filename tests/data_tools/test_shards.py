import numpy as np
import pytest

from data_tools.preprocess import preprocess
from data_tools.shards import inspect, merge
from megatron_ast.cli import main
from megatron_ast.data.indexed import IndexedShard
from megatron_ast.data.manifest import read_manifest
from tests.conftest import stdlib_texts, write_jsonl


@pytest.fixture()
def shards(tmp_path, hf_tokenizer_dir):
    texts = stdlib_texts(24)
    for i in range(3):
        write_jsonl(tmp_path / "in" / "github" / f"part{i}.jsonl", texts[i * 8 : (i + 1) * 8])
    preprocess([str(tmp_path / "in")], tmp_path / "shards", hf_tokenizer_dir)
    return tmp_path / "shards"


def test_merge_concatenates_in_order(shards, tmp_path):
    meta = merge([str(shards)], tmp_path / "merged" / "all")
    parts = [IndexedShard(shards / f"github__part{i}") for i in range(3)]
    merged = IndexedShard(tmp_path / "merged" / "all")
    assert meta["documents"] == merged.num_documents == 24 and meta["domain"] == "github"
    docs = [p.document(j) for p in parts for j in range(p.num_documents)]
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(merged.document(i), d)
    assert read_manifest(tmp_path / "merged")["tokens"] == sum(p.num_tokens for p in parts)


def test_merge_across_domains_needs_a_domain(tmp_path, hf_tokenizer_dir, shards):
    write_jsonl(tmp_path / "in2" / "book" / "b.jsonl", stdlib_texts(3))
    preprocess([str(tmp_path / "in2")], shards, hf_tokenizer_dir)
    assert main(["merge", "--input", str(shards), "--output", str(tmp_path / "m" / "x")]) == 2
    assert not (tmp_path / "m" / "x.bin").exists()
    assert merge([str(shards)], tmp_path / "m" / "x", domain="mixed")["documents"] == 27


def test_inspect_decodes_the_first_tokens(shards, hf_tokenizer_dir):
    r = inspect(shards, doc=2, tokens=12, tokenizer=str(hf_tokenizer_dir))
    assert r["shards"]["github__part0"]["documents"] == 8
    assert stdlib_texts(24)[2].startswith(r["document"]["first_text"])
    assert main(["inspect", str(shards), "--doc", "99"]) == 2

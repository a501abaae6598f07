import re
from pathlib import Path

import numpy as np
import pytest

from data_tools.preprocess import preprocess
from data_tools.shards import adopt, inspect, merge
from megatron_ast.cli import main
from megatron_ast.data.indexed import IndexedShard
from megatron_ast.data.manifest import read_manifest
from megatron_ast.errors import UsageError
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


def _damage(shards, tmp_path, kind):
    """A copy of the shard dir with github__part1 damaged as `kind` says."""
    import shutil

    d = tmp_path / f"damaged-{kind}"
    shutil.copytree(shards, d)
    prefix = d / "github__part1"
    b, i = prefix.with_suffix(".bin"), prefix.with_suffix(".idx")
    if kind == "bin cut":
        b.write_bytes(b.read_bytes()[: b.stat().st_size // 2])
    elif kind == "idx cut":
        i.write_bytes(i.read_bytes()[:-20])
    elif kind == "bin byte flipped":
        data = bytearray(b.read_bytes())
        data[10] ^= 0xFF
        b.write_bytes(bytes(data))
    elif kind == "pointer moved":  # sequence 1 starts 2 bytes late; the last pointer (checked on open) is intact
        s = IndexedShard(prefix)
        data = bytearray(i.read_bytes())
        at = 34 + 4 * len(s.sequence_lengths) + 8
        data[at : at + 8] = (int(s.sequence_pointers[1]) + 2).to_bytes(8, "little")
        i.write_bytes(bytes(data))
    return d


@pytest.mark.parametrize("kind", ["bin cut", "idx cut", "bin byte flipped", "pointer moved"])
def test_a_damaged_shard_is_one_line_exit_2_and_merge_writes_nothing(kind, shards, tmp_path, capsys):
    """Before: a cut .bin was inspected (wrong counts), evaluated and merged into a whole-looking shard with a fresh
    sha256; a cut .idx gave a ValueError traceback; a flipped byte or a moved pointer went unnoticed everywhere."""
    from megatron_ast.data.indexed import CorruptShard
    from megatron_ast.data.streams import load_domains

    d = _damage(shards, tmp_path, kind)
    found_on_open = kind in ("bin cut", "idx cut")
    assert main(["inspect", str(d)]) == (2 if found_on_open else 0)
    capsys.readouterr()
    for cmd in (["inspect", str(d), "--verify"], ["merge", "--input", str(d), "--output", str(tmp_path / "m" / "new" / "all")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "github__part1" in err[0] and "re-run `megatron-ast preprocess`" in err[0], err
    assert not (tmp_path / "m").exists()  # not even the dirs merge made for its output (before: m/new stayed, empty)
    if found_on_open:  # training and eval open shards this way; their full read is the trainer's verify_shards
        with pytest.raises(CorruptShard, match="github__part1"):
            load_domains([d], 8)
    else:
        load_domains([d], 8)


def test_inspect_verify_passes_a_whole_dir_and_a_prefix_without_sidecar(shards, tmp_path):
    r = inspect(shards, verify=True)
    assert {v["verified"] for v in r["shards"].values()} == {"sha256"}
    import shutil

    for suffix in (".bin", ".idx"):
        shutil.copy(shards / f"github__part0{suffix}", tmp_path / f"megatron{suffix}")
    assert inspect(tmp_path / "megatron", verify=True)["shards"]["megatron"]["verified"] == "structure"


def test_merge_refuses_an_existing_output_even_an_input(shards, tmp_path, capsys):
    """Before: merge overwrote its output silently, even when that was one of its inputs."""
    before = (shards / "github__part0.bin").read_bytes()
    capsys.readouterr()
    assert main(["merge", "--input", str(shards / "github__part0"), str(shards / "github__part1"),
                 "--output", str(shards / "github__part0")]) == 2
    assert "exists" in capsys.readouterr().err
    assert (shards / "github__part0.bin").read_bytes() == before


def test_verify_shards_reads_each_shard_once_and_again_after_a_change(shards):
    import os

    from megatron_ast.data.manifest import verify_shards
    from megatron_ast.data.streams import load_domains

    opened = load_domains([shards], 8)["github"].shards
    first = verify_shards(opened, {})
    assert len(first) == 3
    split = [verify_shards(opened, {}, r, 2) for r in range(2)]
    assert sorted(k for s in split for k in s) == sorted(first) and all(split)
    assert verify_shards(opened, first) == {}
    b = shards / "github__part2.bin"
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))
    assert list(verify_shards(opened, first)) == [str(b.resolve())]


def megatron_shards(out: Path, name: str, docs: list[list[int]], eod: int | None, dtype=np.uint16,
                    split_first: bool = False) -> Path:
    """Shards as Megatron-LM's tools/preprocess_data.py writes them: megatron-core's IndexedDatasetBuilder, the
    EOD appended to each document (--append-eod), optionally a document of two sentences (--split-sentences)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"{name}_text_document"
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for i, ids in enumerate(docs):
        ids = ids + ([eod] if eod is not None else [])
        lens = [len(ids) // 2, len(ids) - len(ids) // 2] if split_first and i == 0 else [len(ids)]
        b.add_document(torch.tensor(ids), lens)
    b.finalize(str(prefix) + ".idx")
    return prefix


def _ids(tok_dir, texts):
    from megatron_ast.data.tokenizer import Tokenizer

    return Tokenizer.load(tok_dir).encode_batch(texts)


def test_adopt_megatron_shards_then_every_reader_takes_them(tmp_path, hf_tokenizer_dir, capsys):
    from megatron_ast.data.streams import load_domains
    from megatron_ast.data.tokenizer import Tokenizer

    texts = stdlib_texts(12)
    eod = Tokenizer.load(hf_tokenizer_dir).identity.eod_id
    d = tmp_path / "mega"
    megatron_shards(d, "book", _ids(hf_tokenizer_dir, texts[:6]), eod, split_first=True)
    megatron_shards(d, "code", _ids(hf_tokenizer_dir, texts[6:]), eod)
    with pytest.raises(UsageError, match=r"holds .bin/.idx shards but no manifest.json .*inspect --adopt"):
        load_domains([d], 64)
    assert main(["inspect", str(d), "--adopt", "--tokenizer", str(hf_tokenizer_dir)]) == 0
    assert "adopted 2 shards" in capsys.readouterr().out
    m = read_manifest(d)
    assert sorted(m["shards"]) == ["book_text_document", "code_text_document"]
    assert m["shards"]["book_text_document"]["domain"] == "book" and m["shards"]["book_text_document"]["documents"] == 6
    ours = preprocess([str(write_jsonl(tmp_path / "in" / "code" / "c.jsonl", texts[6:]))], tmp_path / "ours", hf_tokenizer_dir)
    assert (d / "code_text_document.bin").read_bytes() == (tmp_path / "ours" / "code__c.bin").read_bytes()
    assert m["shards"]["code_text_document"]["sha256"] == ours["shards"]["code__c"]["sha256"]
    streams = load_domains([d], 64, Tokenizer.load(hf_tokenizer_dir).identity)
    assert sorted(streams) == ["book", "code"]
    assert inspect(d, verify=True)["shards"]["book_text_document"]["verified"] == "sha256"
    streams = load_domains([d / "code_text_document"], 64)  # one prefix, through its sidecar
    assert list(streams) == ["code"]


def test_adopt_names_what_does_not_fit_the_tokenizer(tmp_path, hf_tokenizer_dir, capsys):
    from megatron_ast.data.streams import load_domains
    from megatron_ast.data.tokenizer import Tokenizer

    ids = _ids(hf_tokenizer_dir, stdlib_texts(3))
    eod = Tokenizer.load(hf_tokenizer_dir).identity.eod_id
    cases = {
        "noeod": (megatron_shards(tmp_path / "a", "x", ids, None), "ends with id .* not the EOD 0 .* --append-eod"),
        "vocab": (megatron_shards(tmp_path / "b", "x", [ids[0] + [700]] + ids[1:], eod),
                  r"is id 700, outside the vocabulary .* \(600 ids\): it was made with another tokenizer"),
        "dtype": (megatron_shards(tmp_path / "c", "x", [[i % 250 for i in t] for t in ids], eod % 250, np.uint8),
                  r"its uint8 tokens cannot hold the ids"),
    }
    for case, (prefix, pattern) in cases.items():
        assert main(["inspect", str(prefix), "--adopt", "--tokenizer", str(hf_tokenizer_dir)]) == 2, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(pattern, err[0]), (case, err)
        assert not (prefix.parent / "manifest.json").exists() and not list(prefix.parent.glob("*.meta.json"))
    with pytest.raises(UsageError, match=r"has no sidecar .* inspect --adopt"):
        load_domains([cases["noeod"][0]], 64)
    assert main(["inspect", str(cases["noeod"][0]), "--adopt"]) == 2
    assert "pass --tokenizer MODEL_DIR" in capsys.readouterr().err


def test_adopt_leaves_sidecars_alone_reports_the_right_document_and_refuses_floats(tmp_path, hf_tokenizer_dir, shards,
                                                                                   capsys):
    import shutil

    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_ast.data.tokenizer import Tokenizer

    eod = Tokenizer.load(hf_tokenizer_dir).identity.eod_id
    d = tmp_path / "mixed"
    shutil.copytree(shards, d)  # ours, with sidecars and a manifest
    ours = {p.name: p.read_bytes() for p in d.glob("*.meta.json")}
    ids = _ids(hf_tokenizer_dir, stdlib_texts(3))
    megatron_shards(d, "wiki", ids, eod)
    (d / "wiki_text_document.bin").rename(d / "wiki_text_sentence.bin")
    (d / "wiki_text_document.idx").rename(d / "wiki_text_sentence.idx")
    m = adopt(d, hf_tokenizer_dir)
    assert {p.name: p.read_bytes() for p in d.glob("*.meta.json") if p.name in ours} == ours
    assert m["shards"]["wiki_text_sentence"]["domain"] == "wiki"
    # an empty document, then one without its EOD: the error names the second (index 1), not the first non-empty
    b = IndexedDatasetBuilder(str(tmp_path / "e_text_document.bin"), dtype=np.uint16)
    b.add_document(torch.tensor([], dtype=torch.int64), [0])
    b.add_document(torch.tensor(ids[0]), [len(ids[0])])
    b.finalize(str(tmp_path / "e_text_document.idx"))
    with pytest.raises(UsageError, match=r"document 1 of 2 ends with id"):
        adopt(tmp_path / "e_text_document", hf_tokenizer_dir)
    b = IndexedDatasetBuilder(str(tmp_path / "f_text_document.bin"), dtype=np.float32)
    b.add_document(torch.tensor([1.0, 2.0]), [2])
    b.finalize(str(tmp_path / "f_text_document.idx"))
    with pytest.raises(UsageError, match=r"its tokens are float32, not integers"):
        adopt(tmp_path / "f_text_document", hf_tokenizer_dir)

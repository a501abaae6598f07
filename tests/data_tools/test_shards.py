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
    for cmd in (["inspect", str(d), "--verify"], ["merge", "--input", str(d), "--output", str(tmp_path / "m" / "all")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "github__part1" in err[0] and "re-run `megatron-ast preprocess`" in err[0], err
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())
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

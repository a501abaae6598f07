import gzip
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from data_tools import preprocess as pp
from megatron_ast.cli import main
from megatron_ast.data import documents
from megatron_ast.data.indexed import IndexedShard
from megatron_ast.data.manifest import read_manifest
from megatron_ast.data.tokenizer import Tokenizer
from megatron_ast.errors import UsageError
from megatron_ast.fsutil import sha256_file
from tests.conftest import assert_full_disk_line, stdlib_texts, write_jsonl

BAD = {3: b'{"text": "unterminated', 7: b'{"meta": {}}', 11: b'{"text": "\xff bad utf8"}', 15: b'{"text": ""}'}


@pytest.fixture()
def corpus(tmp_path):
    texts = stdlib_texts(30)
    write_jsonl(tmp_path / "in" / "book" / "plays.jsonl", texts[:12])
    write_jsonl(tmp_path / "in" / "github" / "code.jsonl", texts[12:], extra_lines=BAD)
    return tmp_path / "in", texts


def _expected(tok_dir, texts):
    tok = Tokenizer.load(tok_dir)
    return [np.array(ids + [tok.identity.eod_id]) for ids in tok.encode_batch(texts)]


def test_tokens_equal_direct_tokenization_and_bad_lines_are_reported(corpus, hf_tokenizer_dir, tmp_path, capsys):
    root, texts = corpus
    m = pp.preprocess([str(root)], tmp_path / "out", hf_tokenizer_dir)
    assert sorted(m["shards"]) == ["book__plays", "github__code"]
    gh = m["shards"]["github__code"]
    assert gh["domain"] == "github" and gh["documents"] == 18
    assert gh["skipped"] == {"malformed_json": 1, "missing_text": 1, "invalid_utf8": 1, "empty_document": 1}
    src = root / "github" / "code.jsonl"
    # lines counted in the file, bad lines included: inserted at 3, 7, 11, 15 in turn -> lines 4, 9, 14, 19
    assert gh["skipped_examples"][0] == f"{src}:4: malformed json"
    assert f"{src}:14: invalid utf8" in gh["skipped_examples"]
    assert "skipped" in capsys.readouterr().err
    shard = IndexedShard(tmp_path / "out" / "github__code")
    for i, ref in enumerate(_expected(hf_tokenizer_dir, texts[12:])):
        np.testing.assert_array_equal(shard.document(i), ref)
    assert gh["sha256"] == sha256_file(tmp_path / "out" / "github__code.bin")
    assert m["tokenizer"]["name"] == hf_tokenizer_dir.name and m["dtype"] == "uint16"


def test_workers_split_one_file_and_give_identical_bytes(tmp_path, hf_tokenizer_dir, monkeypatch):
    texts = stdlib_texts(80)
    src = write_jsonl(tmp_path / "in" / "github" / "big.jsonl", texts)
    monkeypatch.setattr(documents, "UNIT_BYTES", 64 << 10)  # many byte ranges from a ~1 MB file
    assert len(pp.plan_units(pp.find_sources([str(src)]), 2)) > 4
    pp.preprocess([str(src)], tmp_path / "one", hf_tokenizer_dir, workers=1)
    pp.preprocess([str(src)], tmp_path / "two", hf_tokenizer_dir, workers=2)
    for ext in (".bin", ".idx"):
        a, b = tmp_path / "one" / f"github__big{ext}", tmp_path / "two" / f"github__big{ext}"
        assert a.read_bytes() == b.read_bytes()


def test_sentencepiece_tokenizer(corpus, sp_model, tmp_path):
    root, texts = corpus
    m = pp.preprocess([str(root / "book")], tmp_path / "out", sp_model)
    shard = IndexedShard(tmp_path / "out" / "book__plays")
    np.testing.assert_array_equal(shard.document(3), _expected(sp_model, texts[3:4])[0])
    assert m["tokenizer"]["kind"] == "sentencepiece"


def test_gz_zst_and_truncated_inputs(tmp_path, hf_tokenizer_dir):
    texts = stdlib_texts(20)
    plain = write_jsonl(tmp_path / "p" / "x.jsonl", texts).read_bytes()
    d = tmp_path / "in" / "github"
    d.mkdir(parents=True)
    (d / "a.jsonl.gz").write_bytes(gzip.compress(plain))
    (d / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    cut = gzip.compress(plain)
    (d / "c.jsonl.gz").write_bytes(cut[: len(cut) * 2 // 3])
    m = pp.preprocess([str(d)], tmp_path / "out", hf_tokenizer_dir)
    assert m["shards"]["github__a"]["tokens"] == m["shards"]["github__b"]["tokens"] > 0
    c = m["shards"]["github__c"]
    assert c["skipped"] == {"truncated": 1} and 0 < c["documents"] < len(texts)
    with pytest.raises(Exception, match="truncated"):
        pp.preprocess([str(d / "c.jsonl.gz")], tmp_path / "strict", hf_tokenizer_dir, strict=True)


def test_resume_skips_complete_shards_and_ignores_partial_ones(corpus, hf_tokenizer_dir, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    pp.preprocess([str(root)], out, hf_tokenizer_dir)
    done = out / "book__plays.bin"
    stamp = done.stat().st_mtime_ns
    # simulate a run killed while writing the other shard: temp files and no sidecar
    (out / "github__code.meta.json").unlink()
    (out / "github__code.bin").rename(out / ".github__code.bin.tmp-999")
    pp.preprocess([str(root)], out, hf_tokenizer_dir)
    assert done.stat().st_mtime_ns == stamp
    assert IndexedShard(out / "github__code").num_documents == 18
    assert read_manifest(out)["documents"] == 30


def test_strict_bad_line_exits_2_and_writes_nothing(corpus, hf_tokenizer_dir, tmp_path, capsys):
    root, _ = corpus
    out = tmp_path / "new" / "out"
    rc = main(["preprocess", "--input", str(root / "github"), "--output-dir", str(out),
               "--tokenizer", str(hf_tokenizer_dir), "--strict"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "code.jsonl:4: malformed json" in err[0] and "--strict" in err[0]
    assert not (tmp_path / "new").exists()  # the dirs this run made go too (before: an empty output dir stayed)


@pytest.mark.parametrize("case", ["missing_input", "bad_tokenizer", "other_tokenizer", "not_jsonl", "empty_dir",
                                  "output_is_a_file", "output_under_a_file"])
def test_bad_input_is_one_line_exit_2(case, corpus, hf_tokenizer_dir, sp_model, tmp_path, capsys):
    root, _ = corpus
    out, tok, inputs = tmp_path / "out", str(hf_tokenizer_dir), [str(root)]
    if case == "missing_input":
        inputs = [str(tmp_path / "nope.jsonl")]
    elif case == "bad_tokenizer":
        tok = str(tmp_path)
    elif case == "other_tokenizer":
        pp.preprocess([str(root / "book")], out, sp_model)
    elif case == "not_jsonl":
        (tmp_path / "x.csv").write_text("a,b")
        inputs = [str(tmp_path / "x.csv")]
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        inputs = [str(tmp_path / "empty")]
    elif case == "output_is_a_file":  # before: a FileExistsError traceback
        out.write_text("x")
    elif case == "output_under_a_file":  # before: a NotADirectoryError traceback (under MPI the others waited)
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    rc = main(["preprocess", "--input", *inputs, "--output-dir", str(out), "--tokenizer", tok])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("megatron-ast: error: ")
    if case == "output_is_a_file":
        assert "is a file: give a directory" in err[0] and out.read_text() == "x"
    elif case == "output_under_a_file":
        assert "is a file, not a directory" in err[0] and (tmp_path / "f").read_text() == "x"
    else:
        assert (sorted(p.name for p in out.iterdir()) if out.exists() else []) == before


def test_ranks_take_disjoint_balanced_files():
    srcs = [pp.Source(None, f"d__{i}", "d", size, "jsonl") for i, size in enumerate([100, 90, 50, 40, 10, 5])]
    parts = pp.assign_to_ranks(srcs, 2)
    names = [s.name for p in parts for s in p]
    assert sorted(names) == sorted(s.name for s in srcs) and len(set(names)) == len(names)
    loads = [sum(s.size for s in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 10


@pytest.mark.mpi
@pytest.mark.slow
def test_mpi_two_ranks_match_one_process(corpus, hf_tokenizer_dir, tmp_path):
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if mpiexec is None:
        pytest.skip("no mpiexec: pip install mpich (in the dev extra)")
    root, _ = corpus
    pp.preprocess([str(root)], tmp_path / "single", hf_tokenizer_dir)
    cmd = [mpiexec, "-n", "2", sys.executable, "-m", "megatron_ast.cli", "preprocess", "--input", str(root),
           "--output-dir", str(tmp_path / "mpi"), "--tokenizer", str(hf_tokenizer_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[rank 1]" in proc.stderr or "tokenize[1]" in proc.stderr
    a, b = read_manifest(tmp_path / "single"), read_manifest(tmp_path / "mpi")
    assert {k: v["sha256"] for k, v in a["shards"].items()} == {k: v["sha256"] for k, v in b["shards"].items()}


@pytest.mark.mpi
@pytest.mark.slow
def test_mpi_unbalanced_like_redpajama_then_a_node_lost_halfway(hf_tokenizer_dir, tmp_path):
    """RedPajama's shape: one huge file (book) beside many small ones (arxiv). On 2 ranks the huge file goes
    whole to one rank, whose workers split it into byte ranges, the small ones to the other; the shards equal
    one process's. Then a node dies halfway: its shard half-written (a temp file, no sidecar) and one of the
    other rank's lost too; the rerun redoes exactly those and ends with the same bytes."""
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if mpiexec is None:
        pytest.skip("no mpiexec: pip install mpich (in the dev extra)")
    texts, root = stdlib_texts(60), tmp_path / "in"
    write_jsonl(root / "book" / "book.jsonl", texts * 6)
    for i in range(12):
        write_jsonl(root / "arxiv" / f"arxiv_{i:03d}.jsonl", texts[5 * i : 5 * i + 5])
    pp.preprocess([str(root)], tmp_path / "single", hf_tokenizer_dir)
    sources = pp.find_sources([str(root)])
    ranks = pp.assign_to_ranks(sources, 2)
    assert [s.name for s in ranks[0]] == ["book__book"] and len(ranks[1]) == 12
    assert len(pp.plan_units(ranks[0], 2)) >= 2  # rank 0's workers share the huge file
    out = tmp_path / "mpi"
    cmd = [mpiexec, "-n", "2", sys.executable, "-m", "megatron_ast.cli", "preprocess", "--input", str(root),
           "--output-dir", str(out), "--tokenizer", str(hf_tokenizer_dir), "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr

    def hashes(d):
        return {k: v["sha256"] for k, v in read_manifest(d)["shards"].items()}

    assert hashes(out) == hashes(tmp_path / "single") and len(hashes(out)) == 13
    (out / "book__book.meta.json").unlink()
    (out / "book__book.bin").rename(out / ".book__book.bin.tmp-123")
    (out / "arxiv__arxiv_007.meta.json").unlink()
    kept = (out / "arxiv__arxiv_000.bin").stat().st_mtime_ns
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[rank 1] 11 shard(s) already complete, skipping" in proc.stderr
    assert hashes(out) == hashes(tmp_path / "single") and (out / "arxiv__arxiv_000.bin").stat().st_mtime_ns == kept


def test_a_full_disk_is_one_line_exit_2_and_leaves_nothing(corpus, hf_tokenizer_dir, small_disk, capsys):
    """Before: an OSError [Errno 28] traceback, exit 1 (and under mpirun the other ranks waited in allgather)."""
    root, _ = corpus
    disk = small_disk(16 * 1024)
    rc = main(["preprocess", "--input", str(root), "--output-dir", str(disk / "out"), "--tokenizer", str(hf_tokenizer_dir)])
    assert rc == 2
    assert_full_disk_line(capsys.readouterr().err, disk)


def test_a_killed_runs_temp_files_go_on_the_rerun_and_an_empty_input_warns(corpus, hf_tokenizer_dir, tmp_path, capsys):
    """Before: a kill -9 left `.NAME.bin.tmp-PID` for good, and an empty jsonl made a 0-token shard silently."""
    root, _ = corpus
    (root / "book" / "empty.jsonl").write_text("")
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".book__plays.bin.tmp-999999", out / ".github__code.idx.tmp-999998"]
    for f in stale:
        f.write_bytes(b"x" * 100)
    mine = out / ".other.bin.tmp-1"  # not a shard of these inputs: left alone
    mine.write_bytes(b"y")
    assert main(["preprocess", "--input", str(root), "--output-dir", str(out), "--tokenizer", str(hf_tokenizer_dir)]) == 0
    assert not any(f.exists() for f in stale) and mine.exists()
    assert "book__empty: warning: " in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["parquet", "arrow", "ipc", "hf"])
def test_every_format_makes_the_shard_of_its_jsonl(tmp_path, hf_tokenizer_dir, monkeypatch, kind):
    """Parquet, Arrow and a Hugging Face dataset dir of the same rows give the jsonl's tokens byte for byte, with
    two workers sharing each file, and the same bad-row counts."""
    from tests.data.test_documents import write_formats

    paths = write_formats(tmp_path / "in", stdlib_texts(40))
    monkeypatch.setattr(documents, "UNIT_BYTES", 16 << 10)
    ref = pp.preprocess([str(paths["jsonl"])], tmp_path / "ref", hf_tokenizer_dir, domain="d")["shards"]["d__docs"]
    m = pp.preprocess([str(paths[kind])], tmp_path / "out", hf_tokenizer_dir, workers=2, domain="d")
    shards = [n for n in m["shards"] if n != "d__validation"]
    if len(shards) > 1:  # save_to_disk's two data files: merged, they are the jsonl's documents
        main(["merge", "--input", *[str(tmp_path / "out" / n) for n in shards], "--output", str(tmp_path / "m" / "d__docs")])
        got = tmp_path / "m" / "d__docs"
    else:
        got = tmp_path / "out" / shards[0]
    for ext in (".bin", ".idx"):
        assert (tmp_path / "ref" / f"d__docs{ext}").read_bytes() == got.with_suffix(ext).read_bytes()
    skipped = {}
    for n in shards:
        for k, v in m["shards"][n]["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped == ref["skipped"] == {"missing_text": 2, "empty_document": 1}


def test_text_key_and_strict_name_the_row(tmp_path, hf_tokenizer_dir, capsys):
    from tests.data.test_documents import write_parquet

    src = write_parquet(tmp_path / "in" / "web" / "a.parquet", ["one doc", None, "two doc"], key="content")
    assert main(["preprocess", "--input", str(src), "--output-dir", str(tmp_path / "o"), "--tokenizer",
                 str(hf_tokenizer_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("has no column 'text' (columns: content, id): pass --text-key with one of them")
    assert not (tmp_path / "o").exists()
    assert main(["preprocess", "--input", str(src), "--output-dir", str(tmp_path / "o"), "--tokenizer",
                 str(hf_tokenizer_dir), "--text-key", "content", "--strict"]) == 2
    assert f"{src}:row 2: missing text ('content' is null)" in capsys.readouterr().err
    m = pp.preprocess([str(src)], tmp_path / "o", hf_tokenizer_dir, text_key="content")
    assert m["shards"]["web__a"]["documents"] == 2 and m["shards"]["web__a"]["skipped_examples"] == [f"{src}:row 2: missing text"]


def test_max_tokens_stops_at_a_document_boundary_and_resumes(tmp_path, hf_tokenizer_dir, capsys):
    texts = stdlib_texts(30)
    write_jsonl(tmp_path / "in" / "a" / "x.jsonl", texts[:15])
    write_jsonl(tmp_path / "in" / "b" / "y.jsonl", texts[15:])
    full = pp.preprocess([str(tmp_path / "in")], tmp_path / "full", hf_tokenizer_dir)
    first = full["shards"]["a__x"]["tokens"]
    cap = first + 100  # inside b__y's first document: a__x whole, nothing of b__y
    m = pp.preprocess([str(tmp_path / "in")], tmp_path / "cap", hf_tokenizer_dir, max_tokens=cap)
    assert list(m["shards"]) == ["a__x"] and m["tokens"] == first
    assert "stopped at --max-tokens" in capsys.readouterr().err
    shard_b = IndexedShard(tmp_path / "full" / "b__y")
    cap = first + len(shard_b.document(0)) + len(shard_b.document(1)) + 5  # two documents of b__y and 5 tokens
    m = pp.preprocess([str(tmp_path / "in")], tmp_path / "cap2", hf_tokenizer_dir, max_tokens=cap, workers=2)
    b = m["shards"]["b__y"]
    assert b["documents"] == 2 and m["tokens"] == cap - 5 and b["stopped_at"] == {"row": 2}
    assert b["max_tokens_run"] == m["shards"]["a__x"]["max_tokens_run"] == {"max_tokens": cap, "ranks": 1}
    for i in range(2):
        np.testing.assert_array_equal(IndexedShard(tmp_path / "cap2" / "b__y").document(i), shard_b.document(i))
    again = pp.preprocess([str(tmp_path / "in")], tmp_path / "cap2", hf_tokenizer_dir, max_tokens=cap)
    assert again == m and "reached by an earlier run" in capsys.readouterr().err  # the same cap: kept
    bigger = pp.preprocess([str(tmp_path / "in")], tmp_path / "cap2", hf_tokenizer_dir, max_tokens=cap + 3 * 10**4)
    assert bigger["tokens"] <= cap + 3 * 10**4 and bigger["shards"]["b__y"]["documents"] > 2  # another cap: redone
    smaller = pp.preprocess([str(tmp_path / "in")], tmp_path / "cap2", hf_tokenizer_dir, max_tokens=first + 10)
    assert smaller["tokens"] == first and list(smaller["shards"]) == ["a__x"]  # never more than the cap
    with pytest.raises(UsageError, match="holds no complete token shards"):  # below the first document: none
        pp.preprocess([str(tmp_path / "in")], tmp_path / "cap2", hf_tokenizer_dir, max_tokens=100)
    assert not (tmp_path / "cap2" / "manifest.json").exists()
    uncapped = pp.preprocess([str(tmp_path / "in")], tmp_path / "cap2", hf_tokenizer_dir)  # no cap: all redone whole
    assert uncapped["shards"]["b__y"]["documents"] == 15 and "stopped_at" not in uncapped["shards"]["b__y"]
    assert uncapped["tokens"] == full["tokens"]

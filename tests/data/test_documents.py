"""megatron_ast/data/documents.py: the same rows from jsonl, parquet, Arrow and a local Hugging Face dataset dir."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_ast.data import documents
from megatron_ast.errors import UsageError
from tests.conftest import stdlib_texts

# rows a table can hold that are not documents: null, not a string, blank
BAD_ROWS = {2: None, 5: 17, 9: "   "}


def table_texts(texts: list[str]) -> list:
    rows = list(texts)
    for pos, v in sorted(BAD_ROWS.items()):
        rows.insert(pos, v)
    return rows


def write_parquet(path: Path, values: list, key: str = "text", row_group_size: int = 7) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    col = pa.array([v if isinstance(v, str) else None for v in values], pa.string())  # a table column has one type
    pq.write_table(pa.table({key: col, "id": list(range(len(values)))}), path, row_group_size=row_group_size)
    return path


def write_formats(root: Path, texts: list[str]) -> dict[str, Path]:
    """The same rows as jsonl, one parquet file, a save_to_disk dir and a Hugging Face dataset dir."""
    from datasets import Dataset

    rows = table_texts(texts)
    jl = root / "jsonl" / "docs.jsonl"
    jl.parent.mkdir(parents=True)
    jl.write_text("".join(json.dumps({"text": v, "meta": {"i": i}}) + "\n" for i, v in enumerate(rows)))
    pqf = write_parquet(root / "parquet" / "docs.parquet", rows)
    arrow = root / "arrow"
    Dataset.from_dict({"text": [v if isinstance(v, str) else None for v in rows]}).save_to_disk(str(arrow), num_shards=2)
    stream = root / "ipc" / "docs.arrow"  # what a pyarrow user writes: an IPC stream of small record batches
    stream.parent.mkdir()
    table = pa.table({"text": pa.array([v if isinstance(v, str) else None for v in rows], pa.string())})
    with pa.ipc.new_stream(str(stream), table.schema) as w:
        for b in table.to_batches(max_chunksize=4):
            w.write_batch(b)
    ipc_file = root / "ipcfile" / "docs.arrow"  # the IPC file format, random access
    ipc_file.parent.mkdir()
    with pa.ipc.new_file(str(ipc_file), table.schema) as w:
        for b in table.to_batches(max_chunksize=4):
            w.write_batch(b)
    hf = root / "hfdir"
    write_parquet(hf / "data" / "train-00000-of-00002.parquet", rows[:20])
    write_parquet(hf / "data" / "train-00001-of-00002.parquet", rows[20:])
    write_parquet(hf / "data" / "validation-00000-of-00001.parquet", texts[:3])
    (hf / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                  "  - split: train\n    path: data/train-*.parquet\n"
                                  "  - split: validation\n    path: data/validation-*.parquet\n---\n# a card\n")
    return {"jsonl": jl, "parquet": pqf, "arrow": arrow, "ipc": stream, "ipcfile": ipc_file, "hf": hf}


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    texts = stdlib_texts(40)
    return write_formats(tmp_path_factory.mktemp("formats"), texts), texts


def _texts(sources, unit_workers: int | None = None, split: str | None = None) -> list:
    out = []
    for s in sources:
        if split and s.split != split:
            continue
        if unit_workers is None:
            out += list(documents.rows(s))
        else:
            for u in documents.plan_units([s], unit_workers):
                out += list(documents.rows(s, u))
    return out


@pytest.mark.parametrize("kind", ["parquet", "arrow", "ipc", "ipcfile", "hf"])
def test_every_format_gives_the_rows_of_the_jsonl(formats, kind):
    paths, texts = formats
    ref = _texts(documents.find_sources([str(paths["jsonl"])]))
    srcs = documents.find_sources([str(paths[kind])])
    got = _texts(srcs, split="train" if kind == "hf" else None)
    assert [t for t, _, _ in got] == [t for t, _, _ in ref] and [t for t, _, _ in got if t] == texts
    kinds = [k for _, k, _ in got if k]
    assert kinds.count("empty_document") == 1 and len(kinds) == 3  # null and int both count as missing text


@pytest.mark.parametrize("kind", ["parquet", "ipc", "ipcfile", "hf"])
def test_units_partition_the_rows_exactly(formats, kind, monkeypatch):
    paths, _ = formats
    monkeypatch.setattr(documents, "UNIT_BYTES", 4 << 10)
    srcs = documents.find_sources([str(paths[kind])])
    units = documents.plan_units(srcs, 4)
    assert len(units) > len(srcs)  # more than one unit per source: workers share a file
    assert _texts(srcs, 4) == _texts(srcs)


def test_sources_are_named_by_domain_and_file_or_split(formats):
    paths, _ = formats
    names = {s.name: s.kind for s in documents.find_sources([str(p) for p in paths.values()])}
    assert names["jsonl__docs"] == "jsonl" and names["parquet__docs"] == "parquet"
    assert names["hfdir__train"] == names["hfdir__validation"] == "hf"
    assert names["arrow__data-00000-of-00002"] == names["arrow__data-00001-of-00002"] == "arrow"  # save_to_disk's files
    hf = next(s for s in documents.find_sources([str(paths["hf"])]) if s.split == "train")
    assert hf.size == sum(f.stat().st_size for f in (paths["hf"] / "data").glob("train-*"))


def test_a_missing_text_column_names_the_columns(formats, tmp_path):
    paths, _ = formats
    with pytest.raises(UsageError, match=r"has no column 'content' \(columns: text, id\): pass --text-key"):
        documents.find_sources([str(paths["parquet"])], text_key="content")
    with pytest.raises(UsageError, match=r"no column 'content' \(columns: text, meta\)"):
        documents.find_sources([str(paths["jsonl"])], text_key="content")
    other = write_parquet(tmp_path / "c" / "x.parquet", ["a b", "c d"], key="content")
    s = documents.find_sources([str(other)], text_key="content")
    assert [t for t, _, _ in documents.rows(s[0], None, "content")] == ["a b", "c d"]


def test_a_damaged_parquet_is_one_line(tmp_path, formats):
    paths, _ = formats
    bad = tmp_path / "x" / "cut.parquet"
    bad.parent.mkdir()
    bad.write_bytes(paths["parquet"].read_bytes()[:500])
    with pytest.raises(UsageError, match="is not a readable parquet file"):
        documents.find_sources([str(bad)])


def test_documents_yields_domain_and_text(formats):
    paths, texts = formats
    assert [t for _, t in documents.documents(paths["parquet"])] == texts
    assert {d for d, _ in documents.documents(paths["hf"])} == {"hfdir"}

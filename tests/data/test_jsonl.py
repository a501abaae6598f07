import gzip
import json

import pytest
import zstandard

from megatron_ast.data import jsonl


def _lines(n):
    return [json.dumps({"text": f"document {i} " + "x" * (i % 97)}) for i in range(n)]


@pytest.mark.parametrize("cuts", [[0, 1, 2, 3], [0, 100, 5000, 12345], [0, 17, 18, 19, 20, 7001]])
def test_byte_ranges_partition_the_lines_exactly(tmp_path, cuts):
    lines = _lines(300)
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(lines) + "\n")
    size = p.stat().st_size
    bounds = sorted(set(c for c in cuts if c < size)) + [None]
    got = []
    for start, end in zip(bounds, bounds[1:]):
        got += [l.decode() for l in jsonl.raw_lines(p, start, end)]
    assert got == lines


def test_range_ending_on_a_line_start_does_not_take_the_next_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text":"a"}\n{"text":"b"}\n')
    first = list(jsonl.raw_lines(p, 0, 13))
    second = list(jsonl.raw_lines(p, 13, None))
    assert first == [b'{"text":"a"}'] and second == [b'{"text":"b"}']


def test_parse_line_classifies_bad_input():
    assert jsonl.parse_line(b'{"text": "hi"}')[0] == "hi"
    assert jsonl.parse_line(b"   ")[0] == ""
    assert jsonl.parse_line(b'{"text": ')[1] == "malformed_json"
    assert jsonl.parse_line(b"[1, 2]")[1] == "malformed_json"
    assert jsonl.parse_line(b'{"meta": {}}')[1] == "missing_text"
    assert jsonl.parse_line(b'{"text": 3}')[1] == "missing_text"
    assert jsonl.parse_line(b'{"text": "\xff\xfe"}')[1] == "invalid_utf8"
    assert jsonl.parse_line(b'{"text": "\\ud800"}')[1] == "invalid_utf8"
    assert jsonl.parse_line(b'{"text": "  \\n"}')[1] == "empty_document"


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_inputs_and_truncation(tmp_path, suffix):
    lines = _lines(5000)
    data = ("\n".join(lines) + "\n").encode()
    comp = gzip.compress(data) if suffix.endswith("gz") else zstandard.ZstdCompressor().compress(data)
    full, cut = tmp_path / f"full{suffix}", tmp_path / f"cut{suffix}"
    full.write_bytes(comp)
    cut.write_bytes(comp[: len(comp) // 2])
    assert [l.decode() for l in jsonl.raw_lines(full)] == lines
    got = []
    with pytest.raises(jsonl.Truncated):
        for l in jsonl.raw_lines(cut):
            got.append(l.decode())
    assert 0 < len(got) < len(lines) and got == lines[: len(got)]  # only whole lines before the cut

"""megatron_ast/data/streams.py: raw documents read only as far as asked, a column by name, a cut file's rows kept."""
import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megatron_ast.data.streams import token_streams
from megatron_ast.data.tokenizer import Tokenizer
from tests.conftest import stdlib_texts, write_jsonl


def test_max_tokens_stops_reading_a_domain_and_the_rest_is_the_same_prefix(tmp_path, hf_tokenizer_dir):
    tok = Tokenizer.load(hf_tokenizer_dir)
    texts = [line for t in stdlib_texts(20) for line in t.splitlines() if line.strip()][:2000]
    src = write_jsonl(tmp_path / "d" / "x.jsonl", texts)
    whole = token_streams([str(src)], tok, 16)["d"]
    part = token_streams([str(src)], tok, 16, max_tokens=3000)["d"]
    assert 3000 <= part.num_tokens < whole.num_tokens
    np.testing.assert_array_equal(part.tokens, whole.tokens[: part.num_tokens])
    lengths = np.diff(np.flatnonzero(whole.tokens == tok.identity.eod_id), prepend=-1)  # each document with its EOD
    assert part.num_tokens == lengths.cumsum()[np.searchsorted(lengths.cumsum(), 3000)]  # the shortest prefix >= 3000


def test_a_text_key_names_the_column_and_a_cut_gz_keeps_its_rows(tmp_path, hf_tokenizer_dir, capsys):
    tok = Tokenizer.load(hf_tokenizer_dir)
    texts = stdlib_texts(6)
    path = tmp_path / "web" / "a.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"content": texts}), path)
    jl = write_jsonl(tmp_path / "web2" / "a.jsonl", texts)
    got = token_streams([str(path)], tok, 32, text_key="content")["web"].tokens
    np.testing.assert_array_equal(got, token_streams([str(jl)], tok, 32)["web2"].tokens)
    data = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    cut = tmp_path / "web3" / "a.jsonl.gz"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) * 2 // 3])
    capsys.readouterr()
    s = token_streams([str(cut)], tok, 32)["web3"]
    assert 0 < s.num_tokens < len(got) and "its rows before that are used" in capsys.readouterr().err

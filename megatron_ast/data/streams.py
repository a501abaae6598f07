"""Token streams of a domain, read as windows of `seq_len`: from token shards or from raw text files."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_ast.data import documents
from megatron_ast.data.indexed import IndexedShard
from megatron_ast.data.manifest import is_shards, shard_set
from megatron_ast.data.tokenizer import Tokenizer, TokenizerIdentity
from megatron_ast.errors import UsageError


class DomainStream:
    """The tokens of several shards, concatenated, read as windows of `seq_len`."""

    def __init__(self, shards: list[IndexedShard], seq_len: int):
        self.shards = shards
        self.seq_len = seq_len
        self.offsets = np.cumsum([0] + [s.num_tokens for s in shards])
        self.num_tokens = int(self.offsets[-1])
        self.num_windows = self.num_tokens // seq_len

    def window(self, k: int) -> np.ndarray:
        start, end = k * self.seq_len, (k + 1) * self.seq_len
        out = []
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while start < end:
            lo = start - self.offsets[i]
            take = min(end - start, self.shards[i].num_tokens - lo)
            out.append(self.shards[i].tokens[lo : lo + take])
            start += take
            i += 1
        return np.concatenate(out).astype(np.int64)


def load_domains(
    shard_dirs: list[str | Path], seq_len: int, tokenizer: TokenizerIdentity | None = None
) -> dict[str, DomainStream]:
    """Group the shards of shard dirs and shard prefixes by domain; check they match the model's tokenizer."""
    by_domain: dict[str, list[IndexedShard]] = {}
    seen_tok = None
    for d in shard_dirs:
        tok, shards = shard_set(d)
        if tokenizer is not None and not tokenizer.same_vocab(tok):
            raise UsageError(
                f"shards in {d} were made with tokenizer {tok['name']!r}, not the model's {tokenizer.name!r}: "
                "re-run `megatron-ast preprocess --tokenizer MODEL_DIR`"
            )
        if seen_tok is not None and seen_tok["vocab_sha256"] != tok["vocab_sha256"]:
            raise UsageError(f"shard dirs {list(map(str, shard_dirs))} were made with different tokenizers")
        seen_tok = tok
        for prefix, meta in shards:
            by_domain.setdefault(meta["domain"], []).append(IndexedShard(prefix, meta))
    streams = {dom: DomainStream(sh, seq_len) for dom, sh in sorted(by_domain.items())}
    for dom, s in streams.items():
        if s.num_windows == 0:
            raise UsageError(f"domain {dom!r} has {s.num_tokens} tokens, fewer than one sequence of {seq_len}")
    return streams


class ArrayStream:
    """An in-memory token array with DomainStream's window interface."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.num_tokens = len(tokens)
        self.num_windows = self.num_tokens // seq_len

    def window(self, k: int) -> np.ndarray:
        return self.tokens[k * self.seq_len : (k + 1) * self.seq_len]


def token_streams(data: list[str], tokenizer: Tokenizer, seq_len: int) -> dict:
    """domain -> stream, from token shards (dirs, prefixes) and/or documents (tokenized here): jsonl, parquet
    and Arrow files or dirs, local Hugging Face dataset dirs (data/documents.py), or plain text files."""
    shard_dirs = [d for d in data if is_shards(d)]
    streams: dict = load_domains(shard_dirs, seq_len, tokenizer.identity) if shard_dirs else {}
    texts: dict[str, list[str]] = {}
    for d in data:
        if d in shard_dirs:
            continue
        p = Path(d)
        if p.is_file() and documents.kind_of(p) is None:
            texts.setdefault(p.parent.name, []).append(p.read_text(encoding="utf-8"))
            continue
        if not p.exists():
            raise UsageError(f"{d} does not exist: give token-shard dirs, jsonl/parquet/arrow/text files or dataset dirs")
        for dom, text in documents.documents(p):
            texts.setdefault(dom, []).append(text)
    for dom, docs in texts.items():
        if dom in streams:
            raise UsageError(f"domain {dom!r} comes both from token shards and from text files: pass one of them")
        ids = tokenizer.encode_batch(docs)
        flat = np.fromiter((i for t in ids for i in (*t, tokenizer.identity.eod_id)), np.int64)
        streams[dom] = ArrayStream(flat, seq_len)
    return streams

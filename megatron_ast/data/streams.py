"""Token streams of a domain, read as windows of `seq_len`: from token shards or from raw text files."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from megatron_ast.data import documents, jsonl
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


def token_streams(data: list[str], tokenizer: Tokenizer, seq_len: int, text_key: str = "text",
                  max_tokens: int | None = None) -> dict:
    """domain -> stream, from token shards (dirs, prefixes) and/or documents (tokenized here): jsonl, parquet
    and Arrow files or dirs, local Hugging Face dataset dirs (data/documents.py), or plain text files.
    `max_tokens`: read documents of a domain only until it holds that many tokens (calibration's need), not a
    whole dataset into memory."""
    shard_dirs = [d for d in data if is_shards(d)]
    streams: dict = load_domains(shard_dirs, seq_len, tokenizer.identity) if shard_dirs else {}
    ids: dict[str, list[list[int]]] = {}
    counts: dict[str, int] = {}

    def add(dom: str, texts: list[str]) -> None:
        """Documents up to the first that brings the domain to `max_tokens`: the same prefix however the domain's
        documents are split into files and batches."""
        for t in tokenizer.encode_batch(texts):
            if full(dom):
                return
            ids.setdefault(dom, []).append(t)
            counts[dom] = counts.get(dom, 0) + len(t) + 1

    def full(dom: str) -> bool:
        return max_tokens is not None and counts.get(dom, 0) >= max_tokens

    for d in data:
        if d in shard_dirs:
            continue
        p = Path(d)
        if p.is_file() and documents.kind_of(p) is None:
            add(p.parent.name, [p.read_text(encoding="utf-8")])
            continue
        if not p.exists():
            raise UsageError(f"{d} does not exist: give token-shard dirs, jsonl/parquet/arrow/text files or dataset dirs")
        for src in documents.find_sources([str(p)], None, text_key):
            batch: list[str] = []
            try:
                for text, _, _ in documents.rows(src, None, text_key):
                    if full(src.domain):
                        break
                    if text:
                        batch.append(text)
                    if len(batch) == 64:
                        add(src.domain, batch)
                        batch = []
            except jsonl.Truncated as e:  # as preprocess does: the rows before the damage stand, and it says so
                print(f"warning: {src.describe()}: {e}; its rows before that are used", file=sys.stderr)
            if batch and not full(src.domain):
                add(src.domain, batch)
    for dom, docs in ids.items():
        if dom in streams:
            raise UsageError(f"domain {dom!r} comes both from token shards and from text files: pass one of them")
        flat = np.fromiter((i for t in docs for i in (*t, tokenizer.identity.eod_id)), np.int64)
        streams[dom] = ArrayStream(flat, seq_len)
    return streams

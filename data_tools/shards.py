"""`merge` (many shards -> one) and `inspect` (counts, decode a document) for token shards."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_ast.data.indexed import IndexedShard, ShardWriter, idx_path
from megatron_ast.data.manifest import check_tokenizer, meta_path, read_manifest, write_manifest
from megatron_ast.data.tokenizer import Tokenizer, TokenizerIdentity
from megatron_ast.errors import UsageError
from megatron_ast.fsutil import atomic_write_json


def _shard_metas(inputs: list[str]) -> list[tuple[Path, dict]]:
    """(prefix, sidecar) for shard prefixes and for every shard of shard dirs, in order."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += [(p / name, {**meta, **_dir_common(p)}) for name, meta in sorted(read_manifest(p)["shards"].items())]
        elif idx_path(p).is_file() and meta_path(p).is_file():
            out.append((p, json.loads(meta_path(p).read_text())))
        else:
            raise UsageError(f"{p} is neither a token-shard dir nor a shard prefix with .idx and .meta.json")
    if not out:
        raise UsageError("no shards to merge")
    return out


def _dir_common(d: Path) -> dict:
    m = read_manifest(d)
    return {"tokenizer": m["tokenizer"], "dtype": m["dtype"]}


def merge(inputs: list[str], output: str | Path, domain: str | None = None) -> dict:
    """Concatenate shards (same tokenizer and dtype) into one shard at prefix `output`."""
    shards = _shard_metas(inputs)
    tok, dtype = shards[0][1]["tokenizer"], shards[0][1]["dtype"]
    for p, m in shards:
        if m["tokenizer"]["vocab_sha256"] != tok["vocab_sha256"] or m["dtype"] != dtype:
            raise UsageError(f"{p} has another tokenizer or dtype than {shards[0][0]}: merge only shards of one tokenizer")
    domains = sorted({m["domain"] for _, m in shards})
    if domain is None and len(domains) > 1:
        raise UsageError(f"shards span domains {domains}: pass --domain for the merged shard")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_tokenizer(out.parent, TokenizerIdentity(**tok))
    with ShardWriter(out, np.dtype(dtype)) as w:
        for p, _ in shards:
            w.add_shard(IndexedShard(p))
        info = w.commit()
    meta = {"tokenizer": tok, "dtype": dtype, "domain": domain or domains[0],
            "source": [str(p) for p, _ in shards], "source_bytes": sum(m["bin_bytes"] for _, m in shards),
            "skipped": {}, "skipped_examples": [], **info}
    atomic_write_json(meta_path(out), meta)
    write_manifest(out.parent)
    return meta


def inspect(path: str | Path, doc: int = 0, tokens: int = 32, tokenizer: str | None = None) -> dict:
    """Counts of a shard (or of every shard of a dir) and the first tokens of one document, decoded."""
    p = Path(path)
    prefixes = [p / n for n in sorted(read_manifest(p)["shards"])] if p.is_dir() else [p]
    report = {"shards": {}}
    for prefix in prefixes:
        if not idx_path(prefix).is_file():
            raise UsageError(f"{prefix}.idx does not exist: pass a shard prefix (without .bin/.idx) or a shard dir")
        s = IndexedShard(prefix)
        report["shards"][prefix.name] = {"documents": s.num_documents, "tokens": s.num_tokens, "dtype": s.dtype.name}
    first = IndexedShard(prefixes[0])
    if not 0 <= doc < first.num_documents:
        raise UsageError(f"--doc {doc} is out of range: {prefixes[0].name} has {first.num_documents} documents")
    ids = first.document(doc)[:tokens].tolist()
    report["document"] = {"shard": prefixes[0].name, "index": doc, "length": len(first.document(doc)), "first_ids": ids}
    if tokenizer is not None:
        report["document"]["first_text"] = Tokenizer.load(tokenizer).decode(ids)
    return report

"""`merge` (many shards -> one) and `inspect` (counts, decode a document) for token shards."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_ast.data.indexed import IndexedShard, ShardWriter, bin_path, idx_path
from megatron_ast.data.manifest import check_tokenizer, meta_path, read_manifest, write_manifest
from megatron_ast.data.tokenizer import Tokenizer, TokenizerIdentity
from megatron_ast.errors import UsageError
from megatron_ast.fsutil import atomic_write_json, existing_ancestor, read_config_file


def _shard_metas(inputs: list[str]) -> list[tuple[Path, dict]]:
    """(prefix, sidecar) for shard prefixes and for every shard of shard dirs, in order."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += [(p / name, {**meta, **_dir_common(p)}) for name, meta in sorted(read_manifest(p)["shards"].items())]
        elif idx_path(p).is_file() and meta_path(p).is_file():
            out.append((p, read_config_file(meta_path(p), "shard sidecar", ": re-run `megatron-ast preprocess` on its source")))
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
    if any(f.exists() for f in (bin_path(out), idx_path(out), meta_path(out))):
        raise UsageError(f"{out}.bin/.idx exists: merge writes a new shard; give another --output or remove it")
    if existing_ancestor(out.parent).is_file():
        raise UsageError(f"--output {out}: a parent of it is a file; give DIR/NAME with DIR a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    check_tokenizer(out.parent, TokenizerIdentity(**tok))
    with ShardWriter(out, np.dtype(dtype)) as w:  # an error aborts it: nothing is left
        for p, m in tqdm(shards, desc="merge", disable=None, file=sys.stderr):  # one shard open at a time
            s = IndexedShard(p, m)
            s.verify()  # a damaged input would give a merged shard that looks whole, with a fresh sha256
            w.add_shard(s)
        info = w.commit()
    meta = {"tokenizer": tok, "dtype": dtype, "domain": domain or domains[0],
            "source": [str(p) for p, _ in shards], "source_bytes": sum(m["bin_bytes"] for _, m in shards),
            "skipped": {}, "skipped_examples": [], **info}
    atomic_write_json(meta_path(out), meta)
    write_manifest(out.parent)
    return meta


def inspect(path: str | Path, doc: int = 0, tokens: int = 32, tokenizer: str | None = None,
            verify: bool = False) -> dict:
    """Counts of a shard (or of every shard of a dir) and the first tokens of one document, decoded; with `verify`,
    every shard's index structure and sha256 checked against its sidecar."""
    p = Path(path)
    if p.is_dir():
        prefixes = [(p / n, m) for n, m in sorted(read_manifest(p)["shards"].items())]
    else:
        sidecar = meta_path(p)
        prefixes = [(p, read_config_file(sidecar, "shard sidecar") if sidecar.is_file() else None)]
    report = {"shards": {}}
    first = None
    for prefix, meta in tqdm(prefixes, desc="verify", disable=None if verify else True, file=sys.stderr):
        s = IndexedShard(prefix, meta)  # one open at a time: thousands of shards, two descriptors each
        if verify:
            s.verify()
        first = first or s
        report["shards"][prefix.name] = {"documents": s.num_documents, "tokens": s.num_tokens, "dtype": s.dtype.name,
                                         **({"verified": "sha256" if (meta or {}).get("sha256") else "structure"}
                                            if verify else {})}
    prefixes = [q for q, _ in prefixes]
    if not 0 <= doc < first.num_documents:
        raise UsageError(f"--doc {doc} is out of range: {prefixes[0].name} has {first.num_documents} documents")
    ids = first.document(doc)[:tokens].tolist()
    report["document"] = {"shard": prefixes[0].name, "index": doc, "length": len(first.document(doc)), "first_ids": ids}
    if tokenizer is not None:
        report["document"]["first_text"] = Tokenizer.load(tokenizer).decode(ids)
    return report

"""`merge` (many shards -> one), `inspect` (counts, decode a document) and `adopt` (Megatron-LM's own shards ->
ours: checked, with sidecars and a manifest) for token shards."""
from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_ast.data.indexed import IndexedShard, ShardWriter, bin_path, idx_path
from megatron_ast.data.manifest import check_tokenizer, meta_path, read_meta, shard_set, write_manifest
from megatron_ast.data.tokenizer import Tokenizer, TokenizerIdentity
from megatron_ast.errors import UsageError
from megatron_ast.fsutil import atomic_write_json, new_dirs


def _shard_metas(inputs: list[str]) -> list[tuple[Path, dict]]:
    """(prefix, sidecar) for shard prefixes and for every shard of shard dirs, in order."""
    out = [pm for item in inputs for pm in shard_set(item)[1]]
    if not out:
        raise UsageError("no shards to merge")
    return out


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
    with new_dirs(out.parent):  # a damaged input found while merging leaves no new empty dirs
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
    if p.is_dir() or meta_path(p).is_file():
        prefixes = shard_set(p)[1]
    else:  # a bare .bin/.idx pair (Megatron-LM's): counts and structure, no sidecar to check against
        prefixes = [(p, None)]
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


def adopt(path: str | Path, tokenizer_dir: str | Path, domain: str | None = None, eod_token: str | None = None,
          block: int = 1 << 24) -> dict:
    """Give shards made by Megatron-LM's tools/preprocess_data.py (a dir of them, or one prefix) our sidecars and
    manifest, after checking them against the tokenizer they will be trained with: every id below its vocabulary
    size, a dtype that holds the vocabulary, every document ending with its EOD (`--append-eod`). Returns the
    manifest. The domain of a shard is its name without Megatron's `_<json key>_<level>` (`_text_document`),
    unless `domain` is given. Shards that already have a sidecar are left as they are."""
    p = Path(path)
    if p.is_dir():
        prefixes = sorted(q.with_suffix("") for q in p.glob("*.idx") if bin_path(q.with_suffix("")).is_file())
        out_dir = p
    else:
        prefixes, out_dir = [p], p.parent
    if not prefixes:
        raise UsageError(f"no PREFIX.bin/PREFIX.idx pairs in {p}: give the dir of Megatron-LM's output or one prefix")
    prefixes = [q for q in prefixes if read_meta(q) is None]  # shards with a sidecar (ours, or adopted) stay as they are
    tok = Tokenizer.load(tokenizer_dir, eod_token)
    ident = tok.identity
    check_tokenizer(out_dir, ident)
    for prefix in tqdm(prefixes, desc="adopt", disable=None, file=sys.stderr):
        s = IndexedShard(prefix)
        s.verify()  # pointers, lengths and document indices, before any token is trusted
        if s.dtype.kind not in "iu":
            raise UsageError(f"{prefix}: its tokens are {s.dtype}, not integers: it is not a token shard")
        if np.iinfo(s.dtype).max < ident.vocab_size - 1:
            raise UsageError(f"{prefix}: its {s.dtype} tokens cannot hold the ids of {ident.name!r} ({ident.vocab_size:,}"
                             " ids): it was made with another tokenizer; re-run preprocess with this one")
        sha = hashlib.sha256()
        for i in range(0, s.num_tokens, block):
            chunk = np.asarray(s.tokens[i : i + block])
            sha.update(chunk.tobytes())
            if len(chunk) and (int(chunk.max()) >= ident.vocab_size or int(chunk.min()) < 0):
                bad = i + int(np.argmax((chunk >= ident.vocab_size) | (chunk < 0)))
                raise UsageError(f"{prefix}: token {bad:,} is id {int(s.tokens[bad])}, outside the vocabulary of "
                                 f"{ident.name!r} ({ident.vocab_size:,} ids): it was made with another tokenizer")
        docs, ends = _document_last_tokens(s)
        if len(ends) and (wrong := np.flatnonzero(ends != ident.eod_id)).size:
            raise UsageError(f"{prefix}: document {int(docs[wrong[0]])} of {s.num_documents:,} ends with id "
                             f"{int(ends[wrong[0]])}, "
                             f"not the EOD {ident.eod_id} of {ident.name!r} ({len(wrong):,} documents do): make the shards "
                             "with preprocess_data.py --append-eod, or pass --eod-token")
        name = re.sub(r"_[A-Za-z0-9]+_(document|sentence)$", "", prefix.name)  # Megatron: PREFIX_<json key>_<level>
        meta = {"tokenizer": ident.to_dict(), "dtype": s.dtype.name, "source": f"megatron-lm shard {prefix}",
                "source_bytes": bin_path(prefix).stat().st_size, "adopted": True,
                "domain": domain or name or prefix.name,
                "skipped": {}, "skipped_examples": [], "documents": s.num_documents, "tokens": s.num_tokens,
                "bin_bytes": bin_path(prefix).stat().st_size, "sha256": sha.hexdigest()}
        atomic_write_json(meta_path(prefix), meta)
    return write_manifest(out_dir)


def _document_last_tokens(s: IndexedShard) -> tuple[np.ndarray, np.ndarray]:
    """(index, last token) of every non-empty document: its last non-empty sequence's last token."""
    seq_ends = np.cumsum(s.sequence_lengths.astype(np.int64))  # token offset after each sequence
    docs = s.document_indices
    first_tok = np.concatenate([[0], seq_ends])[docs[:-1]]
    last_tok = np.concatenate([[0], seq_ends])[docs[1:]]
    nonempty = np.flatnonzero(last_tok > first_tok)
    return nonempty, np.asarray(s.tokens[last_tok[nonempty] - 1]) if len(nonempty) else np.zeros(0, s.dtype)

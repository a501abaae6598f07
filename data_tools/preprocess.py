"""Documents (jsonl, parquet, Arrow, Hugging Face dataset dirs) -> Megatron token shards, one shard per source.

Parallelism: `workers` processes on one node tokenize work units (a byte range of a plain jsonl file, a run of
parquet row groups or Arrow record batches, a dataset shard: megatron_ast/data/documents.py) with the
tokenizer's native batch encoder; across nodes each MPI rank takes a disjoint set of sources. Output is the same
whatever the worker or rank count. Finished shards are skipped, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_ast.data import jsonl
from megatron_ast.data.documents import Source, Unit, find_sources, plan_units, rows
from megatron_ast import mpi
from megatron_ast.data.indexed import ShardWriter, bin_path, idx_path, token_dtype
from megatron_ast.data.manifest import META_SUFFIX, check_tokenizer, meta_path, read_meta, write_manifest
from megatron_ast.data.tokenizer import Tokenizer
from megatron_ast.errors import UsageError
from megatron_ast.fsutil import atomic_write_json, make_dirs, no_space, out_of_space, remove_empty

BATCH_CHARS = 1 << 20  # texts per native encode call
MAX_EXAMPLES = 20  # bad lines listed by location per shard


@dataclass
class UnitResult:
    tokens: np.ndarray
    lengths: np.ndarray
    lines: int
    doc_rows: np.ndarray  # the row (1-based, in the unit) of each document: where a token cap cuts
    bad: list[jsonl.BadLine] = field(default_factory=list)
    truncated: str = ""


def assign_to_ranks(sources: list[Source], size: int) -> list[list[Source]]:
    """Largest file first to the least loaded rank: disjoint, deterministic, balanced by bytes."""
    load, out = [0] * size, [[] for _ in range(size)]
    for s in sorted(sources, key=lambda s: (-s.size, s.name)):
        r = load.index(min(load))
        out[r].append(s)
        load[r] += s.size
    return [sorted(o, key=lambda s: s.name) for o in out]


# --- worker side -----------------------------------------------------------------------------
_TOKENIZER: Tokenizer | None = None
_SOURCES: list[Source] = []
_TEXT_KEY = "text"


def _init_worker(tokenizer: Tokenizer, sources: list[Source], pooled: bool, text_key: str) -> None:
    """`tokenizer`: the driver's, inherited through fork rather than read again (0.7 CPU-s per worker)."""
    global _TOKENIZER, _SOURCES, _TEXT_KEY
    if pooled:  # one thread per worker process: the pool already fills the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    _TOKENIZER, _SOURCES, _TEXT_KEY = tokenizer, sources, text_key


def _encode(texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    ids = _TOKENIZER.encode_batch(texts)
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lens.sum()))
    flat = np.insert(flat, np.cumsum(lens), _TOKENIZER.identity.eod_id).astype(dtype, copy=False)
    return flat, (lens + 1).astype(np.int32)


def _run_unit(unit: Unit) -> UnitResult:
    src = _SOURCES[unit.source]
    dtype = token_dtype(_TOKENIZER.identity.vocab_size)
    toks, lens, batch, chars, doc_rows = [], [], [], 0, []
    res = UnitResult(np.zeros(0, dtype), np.zeros(0, np.int32), 0, np.zeros(0, np.int64))
    try:
        for res.lines, (text, kind, detail) in enumerate(rows(src, unit, _TEXT_KEY), 1):
            if text is None:
                res.bad.append(jsonl.BadLine(res.lines, kind, detail))
            elif text:
                batch.append(text)
                doc_rows.append(res.lines)
                chars += len(text)
                if chars >= BATCH_CHARS:
                    t, l = _encode(batch, dtype)
                    toks.append(t), lens.append(l)
                    batch, chars = [], 0
    except jsonl.Truncated as e:
        res.truncated = str(e)
        res.bad.append(jsonl.BadLine(res.lines + 1, "truncated", str(e)))
    if batch:
        t, l = _encode(batch, dtype)
        toks.append(t), lens.append(l)
    if toks:
        res.tokens, res.lengths = np.concatenate(toks), np.concatenate(lens)
        res.doc_rows = np.asarray(doc_rows, np.int64)
    return res


# --- driver side -----------------------------------------------------------------------------
@dataclass
class _Open:
    writer: ShardWriter
    line0: int = 0
    skipped: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)


def _tokenize(sources, units, tokenizer, out_dir, workers, strict, rank, text_key="text",
              budget: int | None = None, cap: dict | None = None) -> list[str]:
    """Run the units in order and write the shards; returns the one-line reports (bad rows, the token cap).
    `budget`: write whole documents while the tokens stay within it, then stop; `cap`: the run's --max-tokens
    and rank count, recorded in every sidecar it writes (what a rerun must match to keep the shard)."""
    dtype = token_dtype(tokenizer.identity.vocab_size)
    initargs = (tokenizer, sources, workers > 1, text_key)
    if workers > 1:
        pool = mp.get_context("fork").Pool(workers, _init_worker, initargs)
        results = pool.imap(_run_unit, units)
    else:
        pool = None
        _init_worker(*initargs)
        results = map(_run_unit, units)
    bar = tqdm(total=sum(u.nbytes for u in units), unit="B", unit_scale=True, desc=f"tokenize[{rank}]",
               disable=None, file=sys.stderr)
    t0, docs, toks, reports, opened = time.perf_counter(), 0, 0, [], None
    try:
        for unit, res in zip(units, results):
            src = sources[unit.source]
            if unit.part == 0:
                opened = _Open(ShardWriter(out_dir / src.name, dtype))
            stop = budget is not None and toks + len(res.tokens) > budget
            if stop:  # whole documents up to the cap; bad rows after the last kept one were never reached
                keep = int(np.searchsorted(np.cumsum(res.lengths), budget - toks, side="right"))
                if keep == 0 and unit.part == 0:  # the cap fell between sources: no empty shard
                    opened.writer.abort()
                    opened = None
                    left = len({u.source for u in units}) - unit.source
                    reports.append(f"stopped at --max-tokens: {toks:,} tokens; {left} source(s) not read, from "
                                   f"{src.name}")
                    break
                last_row = int(res.doc_rows[keep - 1]) if keep else 0
                res.tokens, res.lengths = res.tokens[: int(res.lengths[:keep].sum())], res.lengths[:keep]
                res.bad = [b for b in res.bad if b.line < last_row]
                res.lines = last_row
            row = "" if src.kind == "jsonl" else "row "
            for b in res.bad:
                where = f"{src.describe()}:{row}{opened.line0 + b.line}: {b.kind.replace('_', ' ')}"
                if strict:
                    raise UsageError(f"{where} ({b.detail}); fix the input or drop --strict to skip such rows")
                opened.skipped[b.kind] = opened.skipped.get(b.kind, 0) + 1
                if len(opened.examples) < MAX_EXAMPLES:
                    opened.examples.append(where)
            # a damaged page ends a unit early: later rows keep their numbers where the format knows the count
            opened.line0 += unit.rows if unit.rows is not None and res.truncated else res.lines
            opened.writer.add_documents(res.tokens, res.lengths)
            docs, toks = docs + len(res.lengths), toks + len(res.tokens)
            bar.update(unit.nbytes)
            el = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{docs / el:,.0f} docs/s {toks / el:,.0f} tok/s", refresh=False)
            if unit.part == unit.parts - 1 or stop:
                info = opened.writer.commit()
                meta = {
                    "tokenizer": tokenizer.identity.to_dict(), "dtype": dtype.name,
                    "source": src.describe(), "source_bytes": src.size, "domain": src.domain,
                    "skipped": opened.skipped, "skipped_examples": opened.examples, **info,
                }
                if cap is not None:
                    meta["max_tokens_run"] = cap
                if stop:
                    meta["stopped_at"] = {"row": opened.line0}
                atomic_write_json(meta_path(out_dir / src.name), meta)
                if not info["documents"]:
                    reports.append(f"{src.name}: warning: {src.describe()} holds no documents (an empty shard)")
                if opened.skipped:
                    reports.append(f"{src.name}: skipped {opened.skipped} (first: {opened.examples[0]})")
                opened = None
            if stop:
                left = len({u.source for u in units if u.source > unit.source})
                reports.append(f"stopped at --max-tokens: {toks:,} tokens; {src.name} holds {src.describe()} up to "
                               f"{row or 'line '}{meta['stopped_at']['row']}, {left} more source(s) not read")
                break
    finally:
        if opened is not None:
            opened.writer.abort()
        if pool is not None:
            pool.terminate()
        bar.close()
    return reports


def _remove_stale_temps(out_dir: Path, names: set[str]) -> None:
    """What a killed run of these shards left (`.NAME.bin.tmp-PID`, `.NAME.idx...`, `.NAME.meta.json...`): the shards
    are this rank's alone. One listing of the dir, not one per shard (thousands of files on a parallel file system)."""
    for tmp in out_dir.glob(".*.tmp-*"):
        written = tmp.name[1:tmp.name.rfind(".tmp-")]
        shard = next((written.removesuffix(x) for x in (".bin", ".idx", META_SUFFIX) if written.endswith(x)), None)
        if shard in names:
            tmp.unlink(missing_ok=True)


def _complete(prefix: Path, src: Source, cap: dict | None) -> dict | None:
    """The sidecar of a finished shard of `src`, written by a run of the same --max-tokens and rank count (`cap`,
    None when uncapped): under another cap the tokens before it, and so the shard, may differ."""
    m = read_meta(prefix)
    if m is None or m.get("source_bytes") != src.size or m.get("max_tokens_run") != cap:
        return None
    return m


def preprocess(
    inputs: list[str],
    output_dir: str | Path,
    tokenizer_path: str | Path,
    workers: int = 1,
    strict: bool = False,
    eod_token: str | None = None,
    domain: str | None = None,
    fast_bpe: bool = True,
    text_key: str = "text",
    max_tokens: int | None = None,
) -> dict:
    """Tokenize `inputs` into `output_dir`; returns the manifest (rank 0) or {} (other ranks).
    `fast_bpe`: tiktoken for byte-level BPE where it gives the same ids (megatron_ast/data/fast_bpe.py).
    `max_tokens`: stop at the document boundary where the run's tokens would pass it; each of N MPI ranks
    takes 1/N of it for its own sources. A rerun keeps the shards of a run with the same cap and rank count
    (a killed run resumes) and redoes the others."""
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}")
    comm, rank, size = mpi.world()
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output-dir {out_dir} is a file: give a directory (new, or one holding shards)")
    error, made = "", []
    try:
        tokenizer = Tokenizer.load(tokenizer_path, eod_token, fast_bpe)
        sources = find_sources(inputs, domain, text_key)
        made = make_dirs(out_dir)
        check_tokenizer(out_dir, tokenizer.identity)
        mine = assign_to_ranks(sources, size)[rank]
        _remove_stale_temps(out_dir, {s.name for s in mine})
        cap = None if max_tokens is None else {"max_tokens": max_tokens, "ranks": size}
        done = {s.name: m for s in mine if (m := _complete(out_dir / s.name, s, cap)) is not None}
        todo = [s for s in mine if s.name not in done]
        for s in todo:  # a shard another run wrote (another cap, a changed source) goes before this run decides
            for f in (meta_path(out_dir / s.name), bin_path(out_dir / s.name), idx_path(out_dir / s.name)):
                f.unlink(missing_ok=True)
        if done:
            print(f"[rank {rank}] {len(done)} shard(s) already complete, skipping", file=sys.stderr)
        budget = None
        if max_tokens is not None:
            budget = max_tokens // size + (rank < max_tokens % size) - sum(m["tokens"] for m in done.values())
            if budget <= 0 or any("stopped_at" in m for m in done.values()):
                print(f"[rank {rank}] --max-tokens reached by an earlier run; {len(todo)} source(s) not read",
                      file=sys.stderr)
                todo = []
        for line in _tokenize(todo, plan_units(todo, workers), tokenizer, out_dir, workers, strict, rank, text_key,
                              budget, cap):
            print(f"[rank {rank}] {line}", file=sys.stderr)
    except UsageError as e:
        error = str(e)
    except Exception as e:  # a full disk: every rank hears of it (the others would wait in allgather)
        if not out_of_space(e):
            raise
        error = str(no_space(out_dir))
    if comm is not None:
        errors = comm.allgather(error)
        error = next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), "")
    if error:  # every rank has stopped writing: the dirs a rank made go if nothing is in them
        remove_empty(made)
        raise UsageError(error)
    manifest = write_manifest(out_dir) if rank == 0 else {}
    if comm is not None:
        comm.Barrier()
    return manifest

"""RedPajama jsonl -> Megatron token shards, one shard per input file.

Parallelism: `workers` processes on one node tokenize work units (a file, or
a byte range of a large plain file) with the tokenizer's native batch
encoder; across nodes each MPI rank takes a disjoint set of files. Output is
the same whatever the worker or rank count. Finished shards are skipped, so a
killed run resumes where it stopped.
"""
from __future__ import annotations

import contextlib
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
from megatron_ast import mpi
from megatron_ast.data.indexed import ShardWriter, token_dtype
from megatron_ast.data.manifest import META_SUFFIX, check_tokenizer, meta_path, read_meta, write_manifest
from megatron_ast.data.tokenizer import Tokenizer
from megatron_ast.errors import UsageError
from megatron_ast.fsutil import atomic_write_json, no_space, out_of_space

UNIT_BYTES = 2 << 20  # a work unit is at most this much of a plain file
BATCH_CHARS = 1 << 20  # texts per native encode call
MAX_EXAMPLES = 20  # bad lines listed by location per shard


@dataclass
class Source:
    path: Path
    name: str  # output shard name
    domain: str
    size: int


@dataclass
class Unit:
    source: int  # index into the source list
    part: int
    parts: int
    start: int
    end: int | None


@dataclass
class UnitResult:
    tokens: np.ndarray
    lengths: np.ndarray
    lines: int
    bad: list[jsonl.BadLine] = field(default_factory=list)
    truncated: str = ""


def find_sources(inputs: list[str], domain: str | None = None) -> list[Source]:
    """Expand files and directories into jsonl sources; shard name = `<domain>__<stem>`."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and jsonl.is_jsonl(f))
            if not found:
                raise UsageError(f"no .jsonl/.jsonl.gz/.jsonl.zst files under {p}: check --input")
            files += found
        elif p.is_file():
            if not jsonl.is_jsonl(p):
                raise UsageError(f"{p} is not a .jsonl, .jsonl.gz or .jsonl.zst file: check --input")
            files.append(p)
        else:
            raise UsageError(f"input {p} does not exist: check --input")
    sources, seen = [], {}
    for f in dict.fromkeys(f.resolve() for f in files):
        dom = domain or f.parent.name
        name = f"{dom}__{jsonl.stem(f)}"
        if name in seen:
            raise UsageError(f"{f} and {seen[name]} would both write shard {name!r}: rename one of them")
        seen[name] = f
        sources.append(Source(f, name, dom, f.stat().st_size))
    return sources


def plan_units(sources: list[Source], workers: int) -> list[Unit]:
    """Split plain files into byte ranges so one large file keeps every worker busy."""
    units = []
    for i, s in enumerate(sources):
        n = 1
        if jsonl.splittable(s.path) and s.size > UNIT_BYTES // 4:
            n = max(-(-s.size // UNIT_BYTES), min(workers, s.size // (UNIT_BYTES // 4)))
        bounds = [s.size * k // n for k in range(n + 1)]
        units += [Unit(i, k, n, bounds[k], bounds[k + 1] if k + 1 < n else None) for k in range(n)]
    return units


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


def _init_worker(tokenizer: Tokenizer, sources: list[Source], pooled: bool) -> None:
    """`tokenizer`: the driver's, inherited through fork rather than read again (0.7 CPU-s per worker)."""
    global _TOKENIZER, _SOURCES
    if pooled:  # one thread per worker process: the pool already fills the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    _TOKENIZER = tokenizer
    _SOURCES = sources


def _encode(texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    ids = _TOKENIZER.encode_batch(texts)
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lens.sum()))
    flat = np.insert(flat, np.cumsum(lens), _TOKENIZER.identity.eod_id).astype(dtype, copy=False)
    return flat, (lens + 1).astype(np.int32)


def _run_unit(unit: Unit) -> UnitResult:
    src = _SOURCES[unit.source]
    dtype = token_dtype(_TOKENIZER.identity.vocab_size)
    toks, lens, batch, chars = [], [], [], 0
    res = UnitResult(np.zeros(0, dtype), np.zeros(0, np.int32), 0)
    try:
        for res.lines, raw in enumerate(jsonl.raw_lines(src.path, unit.start, unit.end), 1):
            text, kind, detail = jsonl.parse_line(raw)
            if text is None:
                res.bad.append(jsonl.BadLine(res.lines, kind, detail))
            elif text:
                batch.append(text)
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
    return res


# --- driver side -----------------------------------------------------------------------------
@dataclass
class _Open:
    writer: ShardWriter
    line0: int = 0
    skipped: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)


def _tokenize(sources, units, tokenizer, out_dir, workers, strict, rank) -> list[str]:
    """Run the units in order and write the shards; returns the one-line reports of bad lines."""
    dtype = token_dtype(tokenizer.identity.vocab_size)
    initargs = (tokenizer, sources, workers > 1)
    if workers > 1:
        pool = mp.get_context("fork").Pool(workers, _init_worker, initargs)
        results = pool.imap(_run_unit, units)
    else:
        pool = None
        _init_worker(*initargs)
        results = map(_run_unit, units)
    total = sum(u.end if u.end is not None else sources[u.source].size for u in units) - sum(u.start for u in units)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenize[{rank}]", disable=None, file=sys.stderr)
    t0, docs, toks, reports, opened = time.perf_counter(), 0, 0, [], None
    try:
        for unit, res in zip(units, results):
            src = sources[unit.source]
            if unit.part == 0:
                opened = _Open(ShardWriter(out_dir / src.name, dtype))
            for b in res.bad:
                where = f"{src.path}:{opened.line0 + b.line}: {b.kind.replace('_', ' ')}"
                if strict:
                    raise UsageError(f"{where} ({b.detail}); fix the input or drop --strict to skip such lines")
                opened.skipped[b.kind] = opened.skipped.get(b.kind, 0) + 1
                if len(opened.examples) < MAX_EXAMPLES:
                    opened.examples.append(where)
            opened.line0 += res.lines
            opened.writer.add_documents(res.tokens, res.lengths)
            docs, toks = docs + len(res.lengths), toks + len(res.tokens)
            bar.update((unit.end if unit.end is not None else src.size) - unit.start)
            el = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{docs / el:,.0f} docs/s {toks / el:,.0f} tok/s", refresh=False)
            if unit.part == unit.parts - 1:
                info = opened.writer.commit()
                meta = {
                    "tokenizer": tokenizer.identity.to_dict(), "dtype": dtype.name,
                    "source": str(src.path), "source_bytes": src.size, "domain": src.domain,
                    "skipped": opened.skipped, "skipped_examples": opened.examples, **info,
                }
                atomic_write_json(meta_path(out_dir / src.name), meta)
                if not info["documents"]:
                    reports.append(f"{src.name}: warning: {src.path} holds no documents (an empty shard)")
                if opened.skipped:
                    reports.append(f"{src.name}: skipped {opened.skipped} (first: {opened.examples[0]})")
                opened = None
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


def preprocess(
    inputs: list[str],
    output_dir: str | Path,
    tokenizer_path: str | Path,
    workers: int = 1,
    strict: bool = False,
    eod_token: str | None = None,
    domain: str | None = None,
    fast_bpe: bool = True,
) -> dict:
    """Tokenize `inputs` into `output_dir`; returns the manifest (rank 0) or {} (other ranks).
    `fast_bpe`: tiktoken for byte-level BPE where it gives the same ids (megatron_ast/data/fast_bpe.py)."""
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    comm, rank, size = mpi.world()
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output-dir {out_dir} is a file: give a directory (new, or one holding shards)")
    created = not out_dir.exists()
    error = ""
    try:
        tokenizer = Tokenizer.load(tokenizer_path, eod_token, fast_bpe)
        sources = find_sources(inputs, domain)
        out_dir.mkdir(parents=True, exist_ok=True)
        check_tokenizer(out_dir, tokenizer.identity)
        mine = assign_to_ranks(sources, size)[rank]
        _remove_stale_temps(out_dir, {s.name for s in mine})
        todo = [s for s in mine if (m := read_meta(out_dir / s.name)) is None or m.get("source_bytes") != s.size]
        if len(todo) < len(mine):
            print(f"[rank {rank}] {len(mine) - len(todo)} shard(s) already complete, skipping", file=sys.stderr)
        for line in _tokenize(todo, plan_units(todo, workers), tokenizer, out_dir, workers, strict, rank):
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
    if error:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            with contextlib.suppress(OSError):  # another rank's rmdir came first
                out_dir.rmdir()  # an error found early leaves no empty output dir behind
        raise UsageError(error)
    manifest = write_manifest(out_dir) if rank == 0 else {}
    if comm is not None:
        comm.Barrier()
    return manifest

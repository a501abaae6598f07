"""Documents of the formats users hold: jsonl (plain, .gz, .zst), parquet, Arrow, local Hugging Face datasets.

A `Source` is one input that becomes one token shard: a file, or one split of a Hugging Face dataset dir. Its
`units` are the pieces that workers read independently and that are written back in order:

- jsonl: byte ranges of a plain file (a line belongs to the range holding its first byte), or the whole file;
- parquet: runs of row groups (`pyarrow.parquet`, one column, in record batches);
- Arrow (`Dataset.save_to_disk`, IPC stream or file): runs of record batches, memory-mapped;
- a local Hugging Face dataset dir (a README.md card with `configs:`/`dataset_info:`): `datasets` resolves its
  configs, splits and data files (offline); each data file is then a source, read as above when it is parquet,
  Arrow or jsonl, else through `datasets.load_dataset(DIR, config, split=..., streaming=True)`, one data file
  (dataset shard) per unit.

No format is read whole into memory. A row whose text is missing, null, not a string or blank is a bad row:
counted and skipped, or an error under --strict (data_tools/preprocess.py).
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from megatron_ast.data import jsonl
from megatron_ast.errors import UsageError

PARQUET, ARROW = (".parquet",), (".arrow",)
UNIT_BYTES = 2 << 20  # a work unit is about this much of a file
_BATCH_ROWS = 1024
Row = tuple  # (text or None, bad kind, detail), as jsonl.parse_line


@dataclass
class Source:
    path: Path
    name: str  # output shard name
    domain: str
    size: int  # bytes on disk: what resume compares
    kind: str  # jsonl | parquet | arrow | hf
    split: str = ""  # hf only: the split (and config) that load_dataset streams
    config: str | None = None

    def describe(self) -> str:
        return f"{self.path}[{self.config + ':' if self.config else ''}{self.split}]" if self.split else str(self.path)


@dataclass
class Unit:
    source: int  # index into the source list
    part: int
    parts: int
    start: int  # jsonl: byte offset; parquet: row group; arrow: record batch; hf: dataset shard
    end: int | None
    nbytes: int  # for progress
    rows: int | None = None  # parquet, arrow: the rows it holds, known from the metadata


def kind_of(path: Path) -> str | None:
    if jsonl.is_jsonl(path):
        return "jsonl"
    if path.name.endswith(PARQUET):
        return "parquet"
    if path.name.endswith(ARROW):
        return "arrow"
    return None


def is_hf_dataset_dir(path: Path) -> bool:
    """A dataset card whose YAML header declares configs or dataset_info: what `load_dataset(DIR)` reads."""
    card = path / "README.md"
    if not card.is_file():
        return False
    head = card.read_text(encoding="utf-8", errors="replace")
    if not head.startswith("---"):
        return False
    header = head[3:].split("\n---", 1)[0]
    return any(line.startswith(("configs:", "dataset_info:")) for line in header.splitlines())


def _arrow_files(path: Path) -> list[Path]:
    """A save_to_disk dir lists its data files in state.json (other .arrow files there are caches)."""
    state = path / "state.json"
    if state.is_file():
        files = json.loads(state.read_text()).get("_data_files", [])
        return [path / f["filename"] for f in files]
    return []


def _files_under(p: Path) -> list[Path]:
    if (p / "state.json").is_file():
        return _arrow_files(p)
    found = []
    for f in sorted(p.rglob("*")):
        if f.is_file() and kind_of(f) and not (f.suffix == ".arrow" and (f.parent / "state.json").is_file()):
            found.append(f)
    for st in sorted(p.rglob("state.json")):  # DatasetDict: one save_to_disk dir per split
        found += _arrow_files(st.parent)
    return sorted(set(found))


def _hf_files(path: Path) -> dict[tuple[str | None, str], list[Path]]:
    """(config, split) -> data files of a local dataset dir, as `datasets` resolves its card (offline)."""
    from datasets import get_dataset_config_names, load_dataset_builder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        configs = get_dataset_config_names(str(path))
        out = {}
        for c in configs:
            files = load_dataset_builder(str(path), c).config.data_files or {}
            out.update({(c if len(configs) > 1 else None, split): [Path(str(f)) for f in fs] for split, fs in files.items()})
        return out
    except Exception as e:
        raise UsageError(f"{path} is not a loadable Hugging Face dataset dir ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}): check its README.md configs") from None


def _hf_sources(p: Path, domain: str | None) -> list[Source]:
    """A dataset dir's data files as sources `<dom>[__<config>]__<split>[-<k>]`; files of a format read here
    natively are read so (record batches, row groups, byte ranges), the rest through `datasets` streaming."""
    dom = domain or p.resolve().name
    out = []
    for (config, split), files in _hf_files(p).items():
        base = f"{dom}__{config + '__' if config else ''}{split}"
        if not all(kind_of(f) for f in files):
            out.append(Source(p.resolve(), base, dom, sum(f.stat().st_size for f in files), "hf", split, config))
            continue
        for k, f in enumerate(files):
            out.append(Source(f, base if len(files) == 1 else f"{base}-{k:05d}", dom, f.stat().st_size, kind_of(f)))
    return out


def find_sources(inputs: list[str], domain: str | None = None, text_key: str = "text") -> list[Source]:
    """Expand files and directories into sources; shard name = `<domain>__<stem>` (a Hugging Face dataset dir's:
    `<domain>__<split>`, its domain the dir's name). Two files of one name in other dirs: `<domain>__<dir>-<stem>`.
    The text column is checked here."""
    files: list[Path] = []
    named: list[Source] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and is_hf_dataset_dir(p):
            named += _hf_sources(p, domain)
        elif p.is_dir():
            found = _files_under(p)
            if not found:
                raise UsageError(f"no .jsonl(.gz/.zst), .parquet or .arrow files under {p}: check --input")
            files += found
        elif p.is_file():
            if kind_of(p) is None:
                raise UsageError(f"{p} is not a .jsonl(.gz/.zst), .parquet or .arrow file: check --input")
            files.append(p)
        else:
            raise UsageError(f"input {p} does not exist: check --input")
    sources, seen = [], {}
    for f in dict.fromkeys(f.resolve() for f in files):
        kind = kind_of(f)
        dom = domain or f.parent.name
        stem = jsonl.stem(f) if kind == "jsonl" else f.name.rsplit(".", 1)[0]
        name = f"{dom}__{stem}"
        if name in seen or any(s.name == name for s in named):  # save_to_disk dirs all name theirs data-00000-of-...
            name = f"{dom}__{f.parent.name}-{stem}"
        seen[name] = f
        sources.append(Source(f, name, dom, f.stat().st_size, kind))
    seen = {}
    for s in sources + named:
        if s.name in seen:
            raise UsageError(f"{s.describe()} and {seen[s.name]} would both write shard {s.name!r}: rename one of them")
        seen[s.name] = s.describe()
        check_text_key(s, text_key)
    return sources + named


def _missing(s: Source, text_key: str, columns: list[str]) -> UsageError:
    return UsageError(f"{s.describe()} has no column {text_key!r} (columns: {', '.join(columns) or 'none'}): "
                      f"pass --text-key with one of them")


def check_text_key(s: Source, text_key: str) -> None:
    """The text column exists (jsonl: in the first non-blank line, when it is a JSON object)."""
    if s.kind == "parquet":
        names = _parquet(s.path).schema_arrow.names
    elif s.kind == "arrow":
        names = _arrow_schema(s.path).names
    elif s.kind == "hf":
        try:
            first = next(iter(_hf_dataset(s)), None)
        except Exception as e:  # what `datasets` raises on a damaged file
            raise UsageError(f"{s.describe()}: `datasets` cannot read it ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        names = list(first) if first is not None else [text_key]
    else:
        names = _first_jsonl_keys(s.path, text_key)
    if text_key not in names:
        raise _missing(s, text_key, names)


def _first_jsonl_keys(path: Path, text_key: str) -> list[str]:
    try:
        for raw in jsonl.raw_lines(path):
            if raw.strip():
                obj = json.loads(raw)
                return list(obj) if isinstance(obj, dict) else [text_key]
    except (ValueError, jsonl.Truncated):  # a bad first line is counted like any other bad line
        pass
    return [text_key]


# --- readers ---------------------------------------------------------------------------------------------------
def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path, memory_map=True)
    except Exception as e:
        raise UsageError(f"{path} is not a readable parquet file ({type(e).__name__}: {e}): re-download or "
                         "re-export it") from None


def _open_arrow(path: Path):
    """(reader, is_file_format): datasets writes the IPC stream format; pyarrow users may write the file format."""
    import pyarrow as pa

    try:
        try:
            return pa.ipc.open_file(pa.memory_map(str(path))), True
        except pa.ArrowInvalid:
            return pa.ipc.open_stream(pa.memory_map(str(path))), False
    except Exception as e:
        raise UsageError(f"{path} is not a readable Arrow file ({type(e).__name__}: {e}): re-create it with "
                         "Dataset.save_to_disk") from None


def _arrow_schema(path: Path):
    return _open_arrow(path)[0].schema


def _arrow_batches(path: Path) -> list[tuple[int, int]]:
    """(bytes, rows) of each record batch: memory-mapped, zero-copy, no data read."""
    reader, is_file = _open_arrow(path)
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if is_file else reader
    return [(b.nbytes, b.num_rows) for b in batches]


def _hf_dataset(s: Source, shard: int | None = None, shards: int = 1):
    from datasets import load_dataset

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ds = load_dataset(str(s.path), s.config, split=s.split, streaming=True)
    return ds if shard is None else ds.shard(num_shards=shards, index=shard)


def _runs(pieces: list[tuple[int, int]], workers: int) -> list[tuple[int, int, int, int]]:
    """Consecutive pieces (row groups, batches: bytes, rows) grouped into about UNIT_BYTES each, at least
    `workers` runs when there are as many pieces: (start, end, bytes, rows)."""
    total = sum(b for b, _ in pieces)
    target = max(1, min(UNIT_BYTES, total // max(workers, 1)))
    runs, start, acc, rows = [], 0, 0, 0
    for i, (b, r) in enumerate(pieces):
        acc, rows = acc + b, rows + r
        if acc >= target or i == len(pieces) - 1:
            runs.append((start, i + 1, acc, rows))
            start, acc, rows = i + 1, 0, 0
    return runs or [(0, 0, 0, 0)]


def plan_units(sources: list[Source], workers: int) -> list[Unit]:
    """Each source's units, in order, sized so that one large file keeps every worker busy."""
    units = []
    for i, s in enumerate(sources):
        if s.kind == "jsonl":
            n = 1
            if jsonl.splittable(s.path) and s.size > UNIT_BYTES // 4:
                n = max(-(-s.size // UNIT_BYTES), min(workers, s.size // (UNIT_BYTES // 4)))
            b = [s.size * k // n for k in range(n + 1)]
            runs = [(b[k], b[k + 1] if k + 1 < n else None, b[k + 1] - b[k], None) for k in range(n)]
        elif s.kind == "parquet":
            md = _parquet(s.path).metadata
            runs = _runs([(sum(md.row_group(g).column(c).total_compressed_size for c in range(md.num_columns)),
                           md.row_group(g).num_rows) for g in range(md.num_row_groups)], workers)
        elif s.kind == "arrow":
            runs = _runs(_arrow_batches(s.path), workers)
        else:
            n = _hf_dataset(s).num_shards
            runs = [(k, k + 1, s.size // n, None) for k in range(n)]
        units += [Unit(i, k, len(runs), a, e, nb, r) for k, (a, e, nb, r) in enumerate(runs)]
    return units


def classify(text, text_key: str = "text") -> Row:
    """A table row's text value as (text, bad kind, detail)."""
    if text is None:
        return None, "missing_text", f"{text_key!r} is null"
    if isinstance(text, bytes):  # a binary column of UTF-8 text, as some writers store it
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, "invalid_utf8", str(e)
    if not isinstance(text, str):
        return None, "missing_text", f"{text_key!r} is a {type(text).__name__}, not a string"
    if not text.strip():
        return None, "empty_document", f"{text_key!r} is empty"
    return text, "", ""


def rows(s: Source, unit: Unit | None = None, text_key: str = "text") -> Iterator[Row]:
    """The rows of a source (or of one of its units) as (text, bad kind, detail); jsonl may raise Truncated."""
    if s.kind == "jsonl":
        start, end = (unit.start, unit.end) if unit else (0, None)
        for raw in jsonl.raw_lines(s.path, start, end):
            yield jsonl.parse_line(raw, text_key)
        return
    if s.kind == "parquet":
        pf = _parquet(s.path)
        groups = list(range(unit.start, unit.end)) if unit else None
        if groups == []:
            return
        batches = pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups, columns=[text_key])
    elif s.kind == "arrow":
        reader, is_file = _open_arrow(s.path)
        lo, hi = (unit.start, unit.end) if unit else (0, None)
        if is_file:
            batches = (reader.get_batch(i) for i in range(lo, reader.num_record_batches if hi is None else hi))
        else:
            batches = itertools.islice(reader, lo, hi)
        batches = (b.select([text_key]) for b in batches)
    else:
        ds = _hf_dataset(s, unit.start, unit.parts) if unit else _hf_dataset(s)
        try:
            for batch in ds.iter(batch_size=_BATCH_ROWS):
                yield from (classify(t, text_key) for t in batch[text_key])
        except Exception as e:  # a damaged data file: the rows before it stand
            raise jsonl.Truncated(f"`datasets` stopped reading: {type(e).__name__}: {e}") from e
        return
    import pyarrow as pa

    try:
        for b in batches:
            yield from (classify(t, text_key) for t in b.column(0).to_pylist())
    except (pa.ArrowException, OSError) as e:  # a damaged page: the rows before it stand, like a cut jsonl.gz
        raise jsonl.Truncated(f"unreadable {s.kind} data: {e}") from e

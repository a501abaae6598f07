"""Reading RedPajama jsonl (plain, .gz, .zst) into documents, with bad lines classified.

Plain files can be read by byte range, so one large file is tokenized by many
workers; a line belongs to the range holding its first byte.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
BAD_KINDS = ("malformed_json", "missing_text", "invalid_utf8", "empty_document", "truncated")
_BLOCK = 1 << 20


def is_jsonl(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def stem(path: Path) -> str:
    for s in SUFFIXES:
        if path.name.endswith(s):
            return path.name[: -len(s)]
    return path.stem


def splittable(path: Path) -> bool:
    """Only uncompressed files can be read from an arbitrary byte offset."""
    return path.name.endswith(".jsonl")


@dataclass
class BadLine:
    line: int  # 1-based, relative to the start of the range that was read
    kind: str
    detail: str


class Truncated(Exception):
    """The compressed stream ended before its end marker."""


def _plain_chunks(path: Path, start: int, end: int | None) -> Iterator[bytes]:
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the line that began before `start` belongs to the previous range
        pos = f.tell()
        while end is None or pos < end:
            block = f.read(_BLOCK if end is None else min(_BLOCK, end - pos))
            if not block:
                return
            pos += len(block)
            if end is not None and pos >= end and not block.endswith(b"\n"):
                block += f.readline()  # finish the line that straddles `end`
            yield block


def _decompressed_chunks(path: Path, new_decompressor, errors: tuple) -> Iterator[bytes]:
    """Stream-decompress `path` (concatenated members/frames allowed), yielding data as it
    comes, so a truncated file still gives every complete line before the cut."""
    dobj = new_decompressor()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            while block:
                try:
                    out = dobj.decompress(block)
                except errors as e:
                    raise Truncated(f"corrupt compressed stream: {e}") from e
                if out:
                    yield out
                block = b""
                if dobj.eof and dobj.unused_data:  # next member/frame
                    block = dobj.unused_data
                    dobj = new_decompressor()
    if not dobj.eof:
        raise Truncated("compressed stream ended before its end marker")


def _gz_chunks(path: Path) -> Iterator[bytes]:
    return _decompressed_chunks(path, lambda: zlib.decompressobj(wbits=31), (zlib.error,))


def _zst_chunks(path: Path) -> Iterator[bytes]:
    import zstandard

    return _decompressed_chunks(path, lambda: zstandard.ZstdDecompressor().decompressobj(), (zstandard.ZstdError,))


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a byte stream into lines; a trailing partial line is held back until the stream ends cleanly."""
    rest = b""
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def raw_lines(path: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Raw lines of `path` (of the byte range [start, end) for plain files); may raise Truncated."""
    if path.name.endswith(".gz"):
        return _lines(_gz_chunks(path))
    if path.name.endswith(".zst"):
        return _lines(_zst_chunks(path))
    return _lines(_plain_chunks(path, start, end))


def parse_line(raw: bytes, text_key: str = "text") -> tuple[str | None, str, str]:
    """Return (text, bad_kind, detail); text is None for a bad line, ("", "", "") for a blank one."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, "invalid_utf8", str(e)
    if not s.strip():
        return "", "", ""
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        return None, "malformed_json", str(e)
    if not isinstance(obj, dict):
        return None, "malformed_json", "line is not a JSON object"
    text = obj.get(text_key)
    if not isinstance(text, str):
        return None, "missing_text", f"no string field {text_key!r}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates from \\ud800-style escapes
        return None, "invalid_utf8", str(e)
    if not text.strip():
        return None, "empty_document", f"{text_key!r} is empty"
    return text, "", ""

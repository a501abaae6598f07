"""Megatron-LM's IndexedDataset on-disk format (`.bin` + `.idx`), read and written.

`.bin`: the tokens of every sequence, back to back, in one dtype.
`.idx` (little endian):
    b"MMIDIDX\\x00\\x00"          magic
    <Q version = 1
    <B dtype code                 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    <Q sequence_count             S
    <Q document_count             D + 1
    int32[S]  sequence lengths (tokens)
    int64[S]  sequence pointers (byte offsets into .bin)
    int64[D+1] document indices   0, then the sequence count at the end of each document

Our shards hold one sequence per document (EOD appended), as Megatron's
preprocess script writes them, so megatron-core's `IndexedDataset` reads them.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from megatron_ast.errors import UsageError
from megatron_ast.fsutil import sha256_file, tmp_name

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (Megatron's rule: vocab < 65500), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


META_SUFFIX = ".meta.json"


def meta_path(prefix: Path | str) -> Path:
    """The shard's sidecar (data/manifest.py): its source, counts and the sha256 of its `.bin`."""
    return Path(f"{prefix}{META_SUFFIX}")


def idx_path(prefix: Path | str) -> Path:
    return Path(f"{prefix}.idx")


def bin_path(prefix: Path | str) -> Path:
    return Path(f"{prefix}.bin")


def write_index(path: Path, dtype: np.dtype, lengths: np.ndarray, document_indices: np.ndarray) -> None:
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    docs = np.asarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", CODE_OF[np.dtype(dtype)]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(docs)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(docs.tobytes(order="C"))


class ShardWriter:
    """Streams documents into `<prefix>.bin`/`.idx` under temporary names.

    `commit()` renames both into place (`.bin` first, `.idx` last); until then a
    reader sees nothing, and `abort()` (or an exception in a `with` block)
    removes the temporaries.
    """

    def __init__(self, prefix: Path, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self._bin_tmp = tmp_name(bin_path(prefix))
        self._idx_tmp = tmp_name(idx_path(prefix))
        self._bin = open(self._bin_tmp, "wb")
        self._sha = hashlib.sha256()
        self._seq_lengths: list[np.ndarray] = []
        self._doc_ends: list[np.ndarray] = []  # sequence count at the end of each document
        self._sequences = 0
        self.documents = 0
        self.tokens = 0

    def _write(self, tokens: np.ndarray) -> None:
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._bin.write(data)
        self._sha.update(data)
        self.tokens += len(tokens)

    def _index(self, seq_lengths: np.ndarray, doc_ends: np.ndarray) -> None:
        self._seq_lengths.append(np.asarray(seq_lengths, dtype=np.int32))
        self._doc_ends.append(self._sequences + np.asarray(doc_ends, dtype=np.int64))
        self._sequences += len(seq_lengths)
        self.documents += len(doc_ends)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (one sequence each) given as one flat token array and their lengths."""
        self._write(tokens)
        self._index(lengths, np.arange(1, len(lengths) + 1))

    def add_shard(self, shard: "IndexedShard", block: int = 1 << 24) -> None:
        """Append a whole shard, keeping its sequence and document structure (Megatron's add_index)."""
        if shard.dtype != self.dtype:
            raise ValueError(f"{shard.prefix} holds {shard.dtype} tokens, this shard {self.dtype}")
        for i in range(0, shard.num_tokens, block):
            self._write(shard.tokens[i : i + block])
        self._index(shard.sequence_lengths, shard.document_indices[1:])

    def commit(self) -> dict:
        """Finish the shard; returns its counts and checksums."""
        self._bin.close()
        lengths = np.concatenate(self._seq_lengths) if self._seq_lengths else np.zeros(0, np.int32)
        docs = np.concatenate([np.zeros(1, np.int64), *self._doc_ends])
        write_index(self._idx_tmp, self.dtype, lengths, docs)
        info = {
            "documents": self.documents,
            "tokens": self.tokens,
            "bin_bytes": self.tokens * self.dtype.itemsize,
            "sha256": self._sha.hexdigest(),
        }
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))
        return info

    def abort(self) -> None:
        self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            p.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class CorruptShard(UsageError):
    """A shard whose files disagree with each other or with its sidecar: never read past it."""

    def __init__(self, prefix: Path, problem: str, source: object = None):
        again = f" ({source})" if isinstance(source, str) else ""
        super().__init__(f"token shard {prefix}: {problem}; it is damaged or was cut short: re-run "
                         f"`megatron-ast preprocess` on its source{again}")


class IndexedShard:
    """Read-only view of one `.bin/.idx` pair; tokens are memory-mapped.

    Opening costs O(1) and checks what O(1) can: the index's size against its header, the `.bin`'s size against
    the index's last pointer, and, given the shard's sidecar (`meta`), its byte, token and document counts.
    `verify()` reads everything: every pointer and document index, and the `.bin`'s sha256."""

    def __init__(self, prefix: Path | str, meta: dict | None = None):
        self.prefix, self.meta = Path(prefix), meta
        ip, bp = idx_path(prefix), bin_path(prefix)
        for p in (ip, bp):
            if not p.is_file():
                raise UsageError(f"{p} does not exist: give a shard prefix (without .bin/.idx) whose files both exist")
        with open(ip, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
            self._fail(f"{ip.name} is not a Megatron IndexedDataset index ({len(head)}-byte header, bad magic)"
                       if head[: len(MAGIC)] != MAGIC else f"{ip.name} is cut short ({len(head)} bytes)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != 1:
            raise UsageError(f"{ip}: unsupported index version {version} (Megatron's format has version 1)")
        if code not in DTYPE_CODES:
            self._fail(f"{ip.name} names dtype code {code}, not one of {sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expect = HEADER_BYTES + 12 * n_seq + 8 * n_doc
        if (size := ip.stat().st_size) != expect:
            self._fail(f"{ip.name} holds {size} bytes, its header ({n_seq} sequences, {n_doc - 1} documents) "
                       f"promises {expect}")
        offset = HEADER_BYTES
        idx = np.memmap(ip, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(idx, np.int32, n_seq, offset)
        offset += 4 * n_seq
        self.sequence_pointers = np.frombuffer(idx, np.int64, n_seq, offset)
        offset += 8 * n_seq
        self.document_indices = np.frombuffer(idx, np.int64, n_doc, offset)
        size = bp.stat().st_size
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if n_seq else 0
        if size != end or size % self.dtype.itemsize:
            self._fail(f"{bp.name} holds {size} bytes, its index ends at byte {end} ({self.dtype} tokens)")
        if n_doc < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            self._fail(f"{ip.name}'s document indices do not run from 0 to its {n_seq} sequences")
        self.tokens = np.memmap(bp, mode="r", dtype=self.dtype) if size else np.zeros(0, self.dtype)
        if meta is not None:
            found = {"bin_bytes": size, "tokens": self.num_tokens, "documents": self.num_documents}
            for key, value in found.items():
                if key in meta and meta[key] != value:
                    self._fail(f"{key} {value}, its sidecar {meta_path(self.prefix).name} says {meta[key]}")

    def _fail(self, problem: str):
        raise CorruptShard(self.prefix, problem, (self.meta or {}).get("source"))

    def verify(self, block: int = 1 << 22) -> None:
        """Every pointer, length and document index, and (given a sidecar) the sha256 of the `.bin`: O(size)."""
        itemsize, n = self.dtype.itemsize, len(self.sequence_lengths)
        expected_start = 0
        for i in range(0, n, block):
            lengths = self.sequence_lengths[i : i + block].astype(np.int64)
            if (lengths < 0).any():
                self._fail(f"sequence {i + int(np.argmax(lengths < 0))} has a negative length")
            starts = expected_start + np.concatenate([[0], np.cumsum(lengths[:-1] * itemsize)])
            wrong = np.flatnonzero(self.sequence_pointers[i : i + block] != starts)
            if len(wrong):
                self._fail(f"sequence {i + int(wrong[0])} starts at byte {int(self.sequence_pointers[i + wrong[0]])}, "
                           f"not {int(starts[wrong[0]])}, right after the one before it")
            expected_start = int(starts[-1] + lengths[-1] * itemsize)
        docs = self.document_indices
        for i in range(0, len(docs) - 1, block):
            step = np.diff(docs[i : i + block + 1])
            if (step < 0).any():
                self._fail(f"document index {i + int(np.argmax(step < 0)) + 1} decreases")
        if self.meta is not None and "sha256" in self.meta:
            if sha256_file(bin_path(self.prefix)) != self.meta["sha256"]:
                self._fail(f"{bin_path(self.prefix).name}'s sha256 differs from its sidecar's")

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i (all its sequences)."""
        first, last = self.document_indices[i], self.document_indices[i + 1]
        if first == last:
            return np.zeros(0, self.dtype)
        start = self.sequence_pointers[first] // self.dtype.itemsize
        end = self.sequence_pointers[last - 1] // self.dtype.itemsize + self.sequence_lengths[last - 1]
        return np.asarray(self.tokens[start:end])

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

from megatron_ast.fsutil import tmp_name

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (Megatron's rule: vocab < 65500), else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


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


class IndexedShard:
    """Read-only view of one `.bin/.idx` pair; tokens are memory-mapped."""

    def __init__(self, prefix: Path | str):
        self.prefix = Path(prefix)
        with open(idx_path(prefix), "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError(f"{idx_path(prefix)}: not a Megatron IndexedDataset index")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != 1:
                raise ValueError(f"{idx_path(prefix)}: unsupported index version {version}")
            (code,) = struct.unpack("<B", f.read(1))
            (n_seq,) = struct.unpack("<Q", f.read(8))
            (n_doc,) = struct.unpack("<Q", f.read(8))
            offset = f.tell()
        self.dtype = np.dtype(DTYPE_CODES[code])
        idx = np.memmap(idx_path(prefix), mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(idx, np.int32, n_seq, offset)
        offset += 4 * n_seq
        self.sequence_pointers = np.frombuffer(idx, np.int64, n_seq, offset)
        offset += 8 * n_seq
        self.document_indices = np.frombuffer(idx, np.int64, n_doc, offset)
        size = os.path.getsize(bin_path(prefix))
        self.tokens = (
            np.memmap(bin_path(prefix), mode="r", dtype=self.dtype) if size else np.zeros(0, self.dtype)
        )

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

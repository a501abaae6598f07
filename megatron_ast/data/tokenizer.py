"""Tokenizers for preprocessing: Hugging Face fast tokenizers and SentencePiece models.

Both are driven through their native batch encoders (no per-document Python
round trip) and carry an identity (name + hash of the vocabulary) that the
shard manifest records, so shards and models can be checked to agree.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_ast.data.fast_bpe import ByteLevelBPE
from megatron_ast.errors import UsageError

CHECK_CHARS = 1 << 16  # the first texts a tokenizer encodes, compared between the fast path and tokenizers


@dataclass(frozen=True)
class TokenizerIdentity:
    name: str
    kind: str  # "hf" | "sentencepiece"
    vocab_size: int
    vocab_sha256: str
    eod_id: int

    def to_dict(self) -> dict:
        return asdict(self)

    def same_vocab(self, other: dict) -> bool:
        """Shards are interchangeable when vocabulary and EOD agree (names may differ)."""
        return other.get("vocab_sha256") == self.vocab_sha256 and other.get("eod_id") == self.eod_id


def _vocab_hash(pieces: list[str]) -> str:
    return hashlib.sha256(json.dumps(pieces, ensure_ascii=False).encode()).hexdigest()


class Tokenizer:
    """Batch encoder with an EOD id; load with `Tokenizer.load(path)`."""

    identity: TokenizerIdentity

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    @staticmethod
    def load(path: str | Path, eod_token: str | None = None, fast_bpe: bool = True) -> "Tokenizer":
        """`path`: an HF tokenizer dir (tokenizer.json), a SentencePiece `.model`, or a dir holding one.
        `fast_bpe`: encode byte-level BPE with tiktoken where it gives the same ids (data/fast_bpe.py)."""
        p = Path(path)
        if p.is_dir() and (p / "tokenizer.json").is_file():
            return HFTokenizer(p, eod_token, fast_bpe)
        if p.is_file() and p.suffix == ".model":
            return SentencePieceTokenizer(p, eod_token)
        if p.is_dir() and (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model", eod_token)
        raise UsageError(
            f"cannot read a tokenizer at {path}: pass a Hugging Face tokenizer dir "
            "(with tokenizer.json) or a SentencePiece .model file"
        )


class HFTokenizer(Tokenizer):
    def __init__(self, path: Path, eod_token: str | None, fast_bpe: bool = True):
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tok = RustTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust side raises its own exception type
            raise UsageError(f"unreadable tokenizer {path / 'tokenizer.json'}: {e}; re-export it") from e
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if eod_token is None:
            eod_token = _config_eos(path)
        if eod_token is None or eod_token not in vocab:
            raise UsageError(
                f"tokenizer {path} has no end-of-document token {eod_token!r}; pass --eod-token"
            )
        pieces = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        self.identity = TokenizerIdentity(
            path.name, "hf", len(vocab), _vocab_hash(pieces), vocab[eod_token]
        )
        self._fast = ByteLevelBPE.build(json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))) \
            if fast_bpe else None
        self._unchecked = True  # the first texts go through both encoders

    @property
    def engine(self) -> str:
        """Which encoder runs: 'tiktoken' (byte-level BPE fast path, data/fast_bpe.py) or 'tokenizers'."""
        return "tiktoken" if self._fast is not None else "tokenizers"

    def _hf_encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is None:
            return self._hf_encode(texts)
        ids = self._fast.encode_batch(texts, self._hf_encode)
        if self._unchecked:
            self._unchecked = False
            n = next((k for k, c in enumerate(itertools.accumulate(map(len, texts))) if c >= CHECK_CHARS), len(texts))
            if ids[: n + 1] != self._hf_encode(texts[: n + 1]):
                print(f"[tokenizer] {self.identity.name}: the tiktoken fast path differs from tokenizers on this "
                      "input; using tokenizers", file=sys.stderr)
                self._fast = None
                return self._hf_encode(texts)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=False)


def _config_eos(path: Path) -> str | None:
    cfg = path / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    eos = json.loads(cfg.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, eod_token: str | None):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise UsageError(f"unreadable SentencePiece model {path}: {e}; re-train or re-download it") from e
        n = self._sp.get_piece_size()
        eod = self._sp.piece_to_id(eod_token) if eod_token else self._sp.eos_id()
        if eod < 0 or (eod_token and self._sp.id_to_piece(eod) != eod_token):
            raise UsageError(f"SentencePiece model {path} has no end-of-document token; pass --eod-token")
        pieces = [self._sp.id_to_piece(i) for i in range(n)]
        self.identity = TokenizerIdentity(path.stem, "sentencepiece", n, _vocab_hash(pieces), eod)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(map(int, ids)))

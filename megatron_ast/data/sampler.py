"""Deterministic blended sampling of fixed-length training sequences from token shards.

Each domain's shards are read as one token stream cut into non-overlapping
windows of `seq_len`; windows are visited in a fresh seeded permutation every
epoch. Which domain sample i comes from is Megatron's greedy blending rule
(the domain furthest behind its weight's share), so the mix is exact at every
prefix and needs no random state. The whole position is a few integers:
`state_dict()` / `load_state_dict()` restore the exact next sample.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_ast.data.blend import BlendSpec, default_blend
from megatron_ast.data.indexed import IndexedShard
from megatron_ast.data.manifest import read_manifest
from megatron_ast.data.tokenizer import TokenizerIdentity
from megatron_ast.errors import UsageError


class DomainStream:
    """The tokens of several shards, concatenated, read as windows of `seq_len`."""

    def __init__(self, shards: list[IndexedShard], seq_len: int):
        self.shards = shards
        self.seq_len = seq_len
        self.offsets = np.cumsum([0] + [s.num_tokens for s in shards])
        self.num_tokens = int(self.offsets[-1])
        self.num_windows = self.num_tokens // seq_len

    def window(self, k: int) -> np.ndarray:
        start, end = k * self.seq_len, (k + 1) * self.seq_len
        out = []
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while start < end:
            lo = start - self.offsets[i]
            take = min(end - start, self.shards[i].num_tokens - lo)
            out.append(self.shards[i].tokens[lo : lo + take])
            start += take
            i += 1
        return np.concatenate(out).astype(np.int64)


def load_domains(
    shard_dirs: list[str | Path], seq_len: int, tokenizer: TokenizerIdentity | None = None
) -> dict[str, DomainStream]:
    """Group the shards of one or more shard dirs by domain; check they match the model's tokenizer."""
    by_domain: dict[str, list[IndexedShard]] = {}
    seen_tok = None
    for d in shard_dirs:
        manifest = read_manifest(d)
        tok = manifest["tokenizer"]
        if tokenizer is not None and not tokenizer.same_vocab(tok):
            raise UsageError(
                f"shards in {d} were made with tokenizer {tok['name']!r}, not the model's {tokenizer.name!r}: "
                "re-run `megatron-ast preprocess --tokenizer MODEL_DIR`"
            )
        if seen_tok is not None and seen_tok["vocab_sha256"] != tok["vocab_sha256"]:
            raise UsageError(f"shard dirs {list(map(str, shard_dirs))} were made with different tokenizers")
        seen_tok = tok
        for name, meta in sorted(manifest["shards"].items()):
            by_domain.setdefault(meta["domain"], []).append(IndexedShard(Path(d) / name))
    streams = {dom: DomainStream(sh, seq_len) for dom, sh in sorted(by_domain.items())}
    for dom, s in streams.items():
        if s.num_windows == 0:
            raise UsageError(f"domain {dom!r} has {s.num_tokens} tokens, fewer than one sequence of {seq_len}")
    return streams


class BlendedSampler:
    """Yields int64 arrays of `seq_len` tokens from a weighted blend of domains."""

    def __init__(
        self,
        shard_dirs: list[str | Path],
        seq_len: int,
        seed: int = 1234,
        blend: BlendSpec | None = None,
        tokenizer: TokenizerIdentity | None = None,
    ):
        if seq_len < 2:
            raise UsageError(f"seq_len must be at least 2, got {seq_len}")
        streams = load_domains(shard_dirs, seq_len, tokenizer)
        weights = (blend or default_blend(list(streams))).resolve(list(streams))
        self.domains = list(weights)
        self.weights = np.array([weights[d] for d in self.domains])
        self.streams = [streams[d] for d in self.domains]
        self.seq_len, self.seed = seq_len, seed
        self.sample = 0
        self.drawn = np.zeros(len(self.domains), dtype=np.int64)
        self._perm: dict[int, tuple[int, np.ndarray]] = {}

    def _window_index(self, d: int, k: int) -> int:
        n = self.streams[d].num_windows
        epoch, pos = divmod(k, n)
        if self._perm.get(d, (None,))[0] != epoch:
            rng = np.random.default_rng([self.seed, d, epoch])
            self._perm[d] = (epoch, rng.permutation(n))
        return int(self._perm[d][1][pos])

    def __iter__(self) -> "BlendedSampler":
        return self

    def __next__(self) -> np.ndarray:
        d = int(np.argmax(self.weights * (self.sample + 1) - self.drawn))
        k = int(self.drawn[d])
        self.sample += 1
        self.drawn[d] += 1
        return self.streams[d].window(self._window_index(d, k))

    def next_batch(self, n: int) -> np.ndarray:
        return np.stack([next(self) for _ in range(n)])

    def state_dict(self) -> dict:
        return {
            "seed": self.seed, "seq_len": self.seq_len,
            "domains": self.domains, "weights": self.weights.tolist(),
            "sample": self.sample, "drawn": self.drawn.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "domains"):
            if state[key] != mine[key]:
                raise UsageError(f"sampler state has {key}={state[key]!r} but this run has {mine[key]!r}")
        if not np.allclose(state["weights"], self.weights):
            raise UsageError(f"sampler state has blend weights {state['weights']}, this run {self.weights.tolist()}")
        self.sample = int(state["sample"])
        self.drawn = np.array(state["drawn"], dtype=np.int64)

"""Deterministic blended sampling of fixed-length training sequences from token shards.

Each domain's shards are read as one token stream cut into non-overlapping
windows of `seq_len`; windows are visited in a fresh seeded permutation every
epoch, computed entry by entry (`permuted`: no index held in memory). Which domain sample i comes from is Megatron's greedy blending rule
(the domain furthest behind its weight's share), so the mix is exact at every
prefix and needs no random state. The whole position is a few integers:
`state_dict()` / `load_state_dict()` restore the exact next sample.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_ast.data.blend import BlendSpec, default_blend
from megatron_ast.data.streams import load_domains
from megatron_ast.data.tokenizer import TokenizerIdentity
from megatron_ast.errors import UsageError


ORDER = "feistel-1"  # how epochs are ordered, in the sampler's state: a checkpoint continues only on its own
_M64 = (1 << 64) - 1
_ROUNDS = 6


def _mix(z: int) -> int:
    """splitmix64's finalizer: a 64-bit hash, the Feistel rounds' function."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def permuted(i: int, n: int, keys: list[int]) -> int:
    """Entry i of a keyed pseudo-random permutation of range(n), with no table: a Feistel network over the
    smallest power of four >= n (a bijection for any round function), walked along its cycle until it lands in
    range(n) (fewer than 4 steps on average). A shuffled index of RedPajama's common_crawl at sequence 8k would
    be 107M int64s, 0.9 GB on every rank."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        x = (left << half) | right
        if x < n:
            return x


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
        self._keys: dict[int, tuple[int, list[int]]] = {}  # domain: (epoch, its permutation's round keys)

    def _window_index(self, d: int, k: int) -> int:
        n = self.streams[d].num_windows
        epoch, pos = divmod(k, n)
        if self._keys.get(d, (None,))[0] != epoch:
            self._keys[d] = (epoch, np.random.default_rng([self.seed, d, epoch]).integers(0, 2**63, _ROUNDS).tolist())
        return permuted(pos, n, self._keys[d][1])

    def __iter__(self) -> "BlendedSampler":
        return self

    def _advance(self) -> tuple[int, int]:
        """The next sample's (domain, draw number in it), by the greedy rule: integers only, no data read."""
        d = int(np.argmax(self.weights * (self.sample + 1) - self.drawn))
        k = int(self.drawn[d])
        self.sample += 1
        self.drawn[d] += 1
        return d, k

    def __next__(self) -> np.ndarray:
        d, k = self._advance()
        return self.streams[d].window(self._window_index(d, k))

    def next_batch(self, n: int, rows: range | list[int] | None = None) -> np.ndarray:
        """The next `n` samples, or of them only `rows` (this rank's share of a global batch): the position moves
        by `n` either way, and only the windows of `rows` are read."""
        keep = set(range(n) if rows is None else rows)
        out = []
        for i in range(n):
            d, k = self._advance()
            if i in keep:
                out.append(self.streams[d].window(self._window_index(d, k)))
        return np.stack(out)

    def state_dict(self) -> dict:
        return {
            "order": ORDER, "seed": self.seed, "seq_len": self.seq_len,
            "domains": self.domains, "weights": self.weights.tolist(),
            "sample": self.sample, "drawn": self.drawn.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        if state.get("order") != ORDER:
            raise UsageError("the checkpoint's sampler shuffled each epoch with a stored permutation (a megatron-ast from "
                             "before 2026-12-02); this one computes the order without a table, so the run would not "
                             "continue on the same windows: resume it with the version that wrote it")
        for key in ("seed", "seq_len", "domains"):
            if state[key] != mine[key]:
                raise UsageError(f"sampler state has {key}={state[key]!r} but this run has {mine[key]!r}")
        if not np.allclose(state["weights"], self.weights):
            raise UsageError(f"sampler state has blend weights {state['weights']}, this run {self.weights.tolist()}")
        self.sample = int(state["sample"])
        self.drawn = np.array(state["drawn"], dtype=np.int64)

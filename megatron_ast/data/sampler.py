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
from megatron_ast.data.streams import load_domains
from megatron_ast.data.tokenizer import TokenizerIdentity
from megatron_ast.errors import UsageError


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

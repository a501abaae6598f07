"""Calibration sequences: seeded, non-overlapping windows of `seqlen` tokens from shards or text."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_ast.data.streams import token_streams
from megatron_ast.data.tokenizer import Tokenizer
from megatron_ast.errors import UsageError


READ_FACTOR = 16  # documents are tokenized until each domain holds this many times the tokens drawn


def calibration_samples(data: list[str], tokenizer_dir: str | Path, nsamples: int, seqlen: int, seed: int = 0,
                        text_key: str = "text") -> torch.Tensor:
    """(nsamples, seqlen) int64 token ids, windows drawn uniformly without replacement over all domains. Raw
    documents are read only until a domain holds READ_FACTOR x nsamples x seqlen tokens (not a whole dataset)."""
    streams = list(token_streams(data, Tokenizer.load(tokenizer_dir), seqlen, text_key,
                                 READ_FACTOR * nsamples * seqlen).values())
    counts = np.array([s.num_windows for s in streams])
    if counts.sum() < nsamples:
        tokens = sum(s.num_tokens for s in streams)
        raise UsageError(f"calibration data has {tokens} tokens = {counts.sum()} windows of {seqlen}, fewer than "
                         f"--nsamples {nsamples}: add calibration data or lower --nsamples/--seqlen")
    picks = np.random.default_rng(seed).choice(int(counts.sum()), nsamples, replace=False)
    starts = np.cumsum(counts) - counts
    rows = []
    for g in picks:
        i = int(np.searchsorted(starts, g, side="right") - 1)
        rows.append(streams[i].window(int(g - starts[i])))
    return torch.from_numpy(np.stack(rows).astype(np.int64))

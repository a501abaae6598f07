"""Perplexity over non-overlapping windows of each domain's token stream.

Every window is scored independently (no context carried across windows), so
the figure depends only on the model, the tokens and `seq_len`: the usual
"strided = seq_len" perplexity of the literature.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_ast.data.streams import token_streams
from megatron_ast.data.tokenizer import Tokenizer
from megatron_ast.errors import UsageError


def pick_windows(tokens_or_stream, seq_len: int, max_windows: int | None) -> np.ndarray:
    """Evenly spaced window indices over a stream or a token count (all of them when max_windows is None)."""
    n = tokens_or_stream // seq_len if isinstance(tokens_or_stream, int) else tokens_or_stream.num_windows
    if max_windows is None or max_windows >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_windows).round().astype(np.int64))


def token_windows(data: list[str], tokenizer_dir: str | Path, seq_len: int, max_windows: int | None,
                  text_key: str = "text") -> dict[str, np.ndarray]:
    """domain -> int64 (n, seq_len) evenly spaced windows, from shard dirs and/or jsonl/text files."""
    out = {}
    for dom, stream in token_streams(data, Tokenizer.load(tokenizer_dir), seq_len, text_key).items():
        idx = pick_windows(stream, seq_len, max_windows)
        if len(idx) == 0:
            raise UsageError(f"eval data of domain {dom!r} has {stream.num_tokens} tokens, fewer than --seq-len {seq_len}")
        out[dom] = np.stack([stream.window(int(k)) for k in idx]).astype(np.int64)
    return out


def window_nll(model, windows: dict[str, np.ndarray], batch_size: int = 4, desc: str = "nll") -> dict[str, np.ndarray]:
    """domain -> float64 (n,) summed next-token NLL of each window: what `perplexity` pools, kept per window so
    that two models scored on the same windows can be compared pairwise (bench/recovery.py heldout)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = {}
    bar = tqdm(total=sum(-(-len(w) // batch_size) for w in windows.values()), desc=desc, disable=None, file=sys.stderr)
    with torch.inference_mode():
        for dom, w in windows.items():
            nll = []
            for i in range(0, len(w), batch_size):
                x = torch.from_numpy(w[i : i + batch_size]).to(device)
                logits = model(input_ids=x).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                         reduction="none")  # (N, C): (N, C, L) is less exact on CPU
                nll.append(loss.view(len(x), -1).double().sum(dim=1).cpu().numpy())
                bar.update(1)
            out[dom] = np.concatenate(nll)
    bar.close()
    return out


def pooled(nll: dict[str, np.ndarray], seq_len: int) -> dict:
    """Per-domain and overall perplexity of per-window NLL sums (each window predicts seq_len - 1 tokens)."""
    result, total_nll, total_n = {}, 0.0, 0
    for dom, v in nll.items():
        n = len(v) * (seq_len - 1)
        result[dom] = {"ppl": math.exp(float(v.sum()) / n), "tokens": n, "windows": len(v)}
        total_nll, total_n = total_nll + float(v.sum()), total_n + n
    result["all"] = {"ppl": math.exp(total_nll / total_n), "tokens": total_n, "windows": sum(len(v) for v in nll.values())}
    return result


def perplexity(model, windows: dict[str, np.ndarray], batch_size: int = 4, desc: str = "ppl") -> dict:
    """Per-domain and overall perplexity; each window predicts its tokens 2..seq_len."""
    seq_len = next(iter(windows.values())).shape[1]
    return pooled(window_nll(model, windows, batch_size, desc), seq_len)

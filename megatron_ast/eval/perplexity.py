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

from megatron_ast.data import jsonl
from megatron_ast.data.sampler import load_domains
from megatron_ast.data.tokenizer import Tokenizer
from megatron_ast.errors import UsageError


def pick_windows(tokens_or_stream, seq_len: int, max_windows: int | None) -> np.ndarray:
    """Evenly spaced window indices over the stream (all of them when max_windows is None)."""
    n = tokens_or_stream // seq_len if isinstance(tokens_or_stream, int) else tokens_or_stream.num_windows
    if max_windows is None or max_windows >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_windows).round().astype(np.int64))


def _text_documents(path: Path) -> tuple[str, list[str]]:
    """(domain, documents) of a jsonl or plain text file; the domain is its parent dir's name."""
    if jsonl.is_jsonl(path):
        docs = [t for raw in jsonl.raw_lines(path) if (t := jsonl.parse_line(raw)[0])]
    else:
        docs = [path.read_text(encoding="utf-8")]
    return path.parent.name, docs


def token_windows(data: list[str], tokenizer_dir: str | Path, seq_len: int, max_windows: int | None) -> dict[str, np.ndarray]:
    """domain -> int64 (n, seq_len) windows, from shard dirs (with a manifest) and/or jsonl/text files."""
    tok = Tokenizer.load(tokenizer_dir)
    shard_dirs = [d for d in data if Path(d, "manifest.json").is_file()]
    out: dict[str, list[np.ndarray]] = {}
    for dom, stream in load_domains(shard_dirs, seq_len, tok.identity).items() if shard_dirs else []:
        out.setdefault(dom, []).extend(stream.window(int(k)) for k in pick_windows(stream, seq_len, max_windows))
    texts: dict[str, list[str]] = {}
    for d in data:
        p = Path(d)
        if d in shard_dirs:
            continue
        if not p.is_file():
            raise UsageError(f"eval data {p} is neither a token-shard dir (with manifest.json) nor a text/jsonl file")
        dom, docs = _text_documents(p)
        texts.setdefault(dom, []).extend(docs)
    for dom, docs in texts.items():
        ids = [t + [tok.identity.eod_id] for t in tok.encode_batch(docs)]
        flat = np.fromiter((i for t in ids for i in t), np.int64)
        idx = pick_windows(len(flat), seq_len, max_windows)
        if len(idx) == 0:
            raise UsageError(f"eval data of domain {dom!r} has {len(flat)} tokens, fewer than --seq-len {seq_len}")
        out.setdefault(dom, []).extend(flat[k * seq_len : (k + 1) * seq_len] for k in idx)
    return {dom: np.stack(w) for dom, w in out.items()}


def perplexity(model, windows: dict[str, np.ndarray], batch_size: int = 4, desc: str = "ppl") -> dict:
    """Per-domain and overall perplexity; each window predicts its tokens 2..seq_len."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    result, total_nll, total_n = {}, 0.0, 0
    n_batches = sum(-(-len(w) // batch_size) for w in windows.values())
    bar = tqdm(total=n_batches, desc=desc, disable=None, file=sys.stderr)
    with torch.inference_mode():
        for dom, w in windows.items():
            nll, n = 0.0, 0
            for i in range(0, len(w), batch_size):
                x = torch.from_numpy(w[i : i + batch_size]).to(device)
                logits = model(input_ids=x).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
                )
                nll += loss.item()
                n += x[:, 1:].numel()
                bar.update(1)
            result[dom] = {"ppl": math.exp(nll / n), "tokens": n, "windows": len(w)}
            total_nll, total_n = total_nll + nll, total_n + n
    bar.close()
    result["all"] = {"ppl": math.exp(total_nll / total_n), "tokens": total_n,
                     "windows": sum(len(w) for w in windows.values())}
    return result

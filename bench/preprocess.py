"""Tokenization throughput: our preprocess vs the way Megatron-LM's tools/preprocess_data.py does it.

Both tokenize the same >= 50 MB jsonl (the reference corpus repeated) with the same
number of worker processes and the same tokenizer, each in its own child process:
- baseline: a multiprocessing pool mapping a per-document encoder over lines
  (json.loads + HF tokenizer call per document, chunksize 32), megatron-core's
  IndexedDatasetBuilder writing, as in Megatron-LM's script;
- ours: `data_tools.preprocess` (byte-range work units, native batch encoding).
Prints tokens/s, MB/s, peak RSS and the speed ratio; checks the outputs are
byte-identical; writes bench/results/preprocess-<host>.json.

    python bench/preprocess.py [--mb 50] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, peak_rss_of  # noqa: E402

_TOK = None
_EOD = None


def _baseline_init(tok_dir: str) -> None:
    global _TOK, _EOD
    from transformers import AutoTokenizer

    _TOK = AutoTokenizer.from_pretrained(tok_dir)
    _EOD = _TOK.eos_token_id


def _baseline_encode(line: str):
    text = json.loads(line)["text"]
    ids = _TOK(text, add_special_tokens=False).input_ids + [_EOD]
    return ids, len(line)


def run_baseline(src: str, prefix: str, tok_dir: str, workers: int) -> dict:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    t0 = time.perf_counter()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    tokens = 0
    with open(src, encoding="utf-8") as fin, mp.get_context("fork").Pool(workers, _baseline_init, (tok_dir,)) as pool:
        for ids, _ in pool.imap(_baseline_encode, fin, 32):
            builder.add_document(torch.tensor(ids), [len(ids)])
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return {"seconds": time.perf_counter() - t0, "tokens": tokens}


def run_ours(src: str, out_dir: str, tok_dir: str, workers: int) -> dict:
    from data_tools.preprocess import preprocess

    t0 = time.perf_counter()
    m = preprocess([src], out_dir, tok_dir, workers=workers)
    return {"seconds": time.perf_counter() - t0, "tokens": m["tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    from megatron_ast.assets import ensure_assets

    a = ensure_assets()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "bench" / "corpus.jsonl"
        src.parent.mkdir()
        parts = [Path(a["corpus"][d]["train"]).read_bytes() for d in ("book", "github")]
        with open(src, "wb") as f:
            while f.tell() < args.mb * 1e6:
                for p in parts:
                    f.write(p)
        size = src.stat().st_size
        print(f"input: {size / 1e6:.1f} MB jsonl, {args.workers} workers, tokenizer {a['tokenizer']}")
        base, base_rss, base_one = peak_rss_of((str(src), f"{tmp}/baseline", a["tokenizer"], args.workers), run_baseline)
        ours, our_rss, our_one = peak_rss_of((str(src), f"{tmp}/ours", a["tokenizer"], args.workers), run_ours)
        ours_prefix = f"{tmp}/ours/bench__corpus"
        identical = {ext: Path(f"{tmp}/baseline{ext}").read_bytes() == Path(ours_prefix + ext).read_bytes()
                     for ext in (".bin", ".idx")}
    rows = {}
    for name, r, rss, one in (("baseline (Megatron-LM style)", base, base_rss, base_one), ("ours", ours, our_rss, our_one)):
        rows[name] = {"seconds": round(r["seconds"], 2), "tokens": r["tokens"],
                      "tokens_per_s": round(r["tokens"] / r["seconds"]), "mb_per_s": round(size / 1e6 / r["seconds"], 2),
                      "peak_rss_gib_tree": round(rss, 3), "peak_rss_gib_max_process": round(one, 3)}
        print(f"{name:30s} {rows[name]['tokens_per_s']:>10,} tok/s {rows[name]['mb_per_s']:>7.2f} MB/s "
              f"peak RSS {rss:.2f} GiB (tree), {one:.2f} GiB (largest process)")
    speedup = base["seconds"] / ours["seconds"]
    print(f"speedup (ours / baseline tokens/s): {speedup:.2f}x   byte-identical output: {identical}")
    result = {"input_mb": round(size / 1e6, 1), "workers": args.workers, "runs": rows,
              "speedup": round(speedup, 2), "identical_output": identical, "machine": machine_info(),
              "date": time.strftime("%Y-%m-%d")}
    out = Path(__file__).resolve().parent / "results" / f"preprocess-{platform.node() or 'host'}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

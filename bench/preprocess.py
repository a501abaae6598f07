"""Tokenization to Megatron .bin/.idx: `megatron-ast preprocess` vs NVIDIA/Megatron-LM's own tools/preprocess_data.py.

Both run as whole processes, start-up included, one after the other on the same RedPajama-style
jsonl (the reference corpus repeated to --mb), with the same worker count, the same SmolLM2
tokenizer and an end-of-document token after each document (Megatron: `--append-eod`), the
file already in the page cache. Megatron-LM runs from a checkout (`--megatron-lm`, e.g. the
`fetch` tool's copy or a `git clone`) through bench/megatron_preprocess.py (two import shims
for Python 3.11 and a CPU torch, nothing on the tokenizing path). Prints wall seconds, tokens/s
and the peak RSS of each process tree; checks both outputs are the same tokens in the same
documents, byte for byte; writes bench/results/preprocess-<name>.json.

    python bench/preprocess.py --megatron-lm DIR [--mb 63 500] [--workers 2] [--tokenizer llama3-style] [--name vm]

`--tokenizer llama3-style`: a 32k tokenizer of Llama-3's exact structure trained on the corpus
(megatron_ast/assets.py), which takes the fast path's Split + ByteLevel shape; `--tokenizer llama2-sp`: a
SentencePiece BPE model of Llama-2's settings trained there too (Megatron-LM: `--tokenizer-type Llama2Tokenizer`).

`--format parquet`: the same jsonl rewritten as two parquet files (snappy, row groups of 4096 rows, as FineWeb
ships), against datatrove's ParquetReader + MegatronDocumentTokenizer (`pip install datatrove`; it parallelizes by
file, hence two files), outputs compared file by file; then ours alone on the two files joined into one, for the
peak RSS of one file of that size (it is read in record batches, never whole):

    python bench/preprocess.py --format parquet --mb 1250 --repeat 1 --name vm-parquet
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from machine import run_process, write_result  # noqa: E402
from megatron_preprocess import triton_modules  # noqa: E402


def corpus(work: Path, mb: float, parts: list[Path]) -> Path:
    """A jsonl of about `mb` MB (whole documents): the reference corpus' files repeated (made once, kept under
    `work`)."""
    src = work / f"corpus-{mb:g}MB.jsonl"
    if not src.is_file():
        lines = [line for p in parts for line in p.read_bytes().splitlines(keepends=True)]
        tmp = src.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for line in itertools.cycle(lines):
                if f.tell() + len(line) > mb * 1e6:
                    break
                f.write(line)
        tmp.rename(src)
    return src


def run_megatron(checkout: Path, src: Path, out: Path, tok: str, workers: int, log: Path) -> dict:
    # the stub list is made here, outside the timed process
    env = {**os.environ, "PYTHONPATH": str(checkout), "MEGATRON_STUBS": ",".join(triton_modules(checkout))}
    cmd = [sys.executable, str(HERE / "megatron_preprocess.py"), str(checkout / "tools" / "preprocess_data.py"),
           "--input", str(src), "--output-prefix", str(out / "megatron"),
           "--tokenizer-type", "Llama2Tokenizer" if tok.endswith(".model") else "HuggingFaceTokenizer",
           "--tokenizer-model", tok, "--workers", str(workers), "--append-eod", "--log-interval", "1000000"]
    return {**run_process(cmd, log, env), "prefix": str(out / "megatron_text_document")}


def run_ours(src: Path, out: Path, tok: str, workers: int, log: Path) -> dict:
    cli = shutil.which("megatron-ast", path=str(Path(sys.executable).parent)) or "megatron-ast"
    cmd = [cli, "preprocess", "--input", str(src), "--output-dir", str(out / "ours"), "--tokenizer", tok,
           "--workers", str(workers), "--domain", "bench"]
    return {**run_process(cmd, log), "prefix": str(out / "ours" / f"bench__{src.stem}")}


def parquet_corpus(work: Path, src: Path, files: int) -> Path:
    """`src` (jsonl) as `files` parquet files of consecutive documents in one dir (made once, kept)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = work / f"{src.stem}-parquet{files}"
    if (out / "done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    with open(src, "rb") as f:
        n = sum(1 for _ in f)
    schema = pa.schema([("text", pa.string())])
    with open(src, "rb") as f:
        for k in range(files):  # consecutive documents, an equal count per file
            with pq.ParquetWriter(out / f"part-{k}.parquet", schema, compression="snappy") as w:
                rows = n * (k + 1) // files - n * k // files
                for start in range(0, rows, 4096):
                    batch = [json.loads(next(f))["text"] for _ in range(min(4096, rows - start))]
                    w.write_table(pa.table({"text": batch}, schema))
    (out / "done").touch()
    return out


DATATROVE = """
import sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import ParquetReader
from datatrove.pipeline.tokens.megatron_tokenizer import MegatronDocumentTokenizer
src, out, tok, eos, workers = sys.argv[1:]
LocalPipelineExecutor(pipeline=[ParquetReader(src, text_key="text", read_metadata=False, glob_pattern="*.parquet"),
                                MegatronDocumentTokenizer(out, tokenizer_name_or_path=tok, eos_token=eos)],
                      tasks=int(workers), workers=int(workers), logging_dir=out + "/logs").run()
"""


def run_datatrove(src: Path, out: Path, tok: str, workers: int, log: Path) -> dict:
    import json

    eos = json.loads((Path(tok) / "tokenizer_config.json").read_text())["eos_token"]
    cmd = [sys.executable, "-c", DATATROVE, str(src), str(out / "datatrove"), str(Path(tok) / "tokenizer.json"), eos,
           str(workers)]
    got = run_process(cmd, log)
    got["cpu_seconds"] = None  # its pool's workers are terminated, not waited for: getrusage never sees them
    return {**got, "prefixes": [str(out / "datatrove" / f"{k:05d}_tokens") for k in range(workers)]}


def run_ours_parquet(src: Path, out: Path, tok: str, workers: int, log: Path) -> dict:
    got = run_ours(src, out, tok, workers, log)
    return {**got, "prefixes": [str(out / "ours" / f"bench__{f.stem}") for f in sorted(src.glob("*.parquet"))]}


def compare_all(a: list[str], b: list[str]) -> dict:
    """compare() file by file, summed."""
    rows = [compare(x, y) for x, y in zip(a, b, strict=True)]
    return {"documents": sum(r["documents"] for r in rows), "tokens": sum(r["tokens"] for r in rows),
            **{k: all(r[k] for r in rows) for k in rows[0] if k not in ("documents", "tokens")}}


def compare(a: str, b: str) -> dict:
    """Same documents of the same tokens (read through our reader), and the same bytes on disk."""
    from megatron_ast.data.indexed import IndexedShard

    x, y = IndexedShard(a), IndexedShard(b)
    same_docs = x.num_documents == y.num_documents and all(
        (x.document(i) == y.document(i)).all() for i in range(x.num_documents))
    return {"documents": x.num_documents, "tokens": x.num_tokens, "token_identical": bool(same_docs),
            **{f"{ext} byte-identical": Path(a + ext).read_bytes() == Path(b + ext).read_bytes() for ext in (".bin", ".idx")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"), help="a NVIDIA/Megatron-LM checkout")
    ap.add_argument("--mb", type=float, nargs="+", default=[63])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, in alternating order; means compared")
    ap.add_argument("--work", default="runs/bench_preprocess")
    ap.add_argument("--name", default="vm", help="results file suffix: the machine kind")
    ap.add_argument("--tokenizer", default="smollm2", help="smollm2 (GPT-2's shape), llama3-style, llama2-sp (a "
                                                           "SentencePiece .model), or a tokenizer dir or .model")
    ap.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl",
                    help="parquet: two parquet files against datatrove, then one joined file alone (peak RSS)")
    args = ap.parse_args()
    if args.format == "parquet":
        return parquet_main(args)
    if not args.megatron_lm or not (Path(args.megatron_lm) / "tools" / "preprocess_data.py").is_file():
        sys.exit("bench/preprocess.py: give --megatron-lm DIR (a NVIDIA/Megatron-LM checkout with tools/preprocess_data.py)")
    from megatron_ast.assets import ensure_assets

    a = ensure_assets()
    if args.tokenizer in ("llama3-style", "llama2-sp"):
        from megatron_ast.assets import llama2_style_sentencepiece, llama3_style_tokenizer

        make = llama3_style_tokenizer if args.tokenizer == "llama3-style" else llama2_style_sentencepiece
        a["tokenizer"] = str(make())
    elif args.tokenizer != "smollm2":
        a["tokenizer"] = args.tokenizer
    checkout, work = Path(args.megatron_lm).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for mb in args.mb:
        src = corpus(work, mb, [Path(a["corpus"][d]["train"]) for d in ("book", "github")])
        size = src.stat().st_size
        src.read_bytes()  # into the page cache: both runs read it warm
        print(f"input: {size / 1e6:.1f} MB jsonl, {args.workers} workers, tokenizer {a['tokenizer']}")
        tools = {"megatron-lm": functools.partial(run_megatron, checkout), "ours": run_ours}
        runs: dict[str, list[dict]] = {name: [] for name in tools}
        for r in range(args.repeat):  # alternating order: a slower second run (a VM's CPU credits) hits both
            for name in (list(tools) if r % 2 == 0 else list(tools)[::-1]):
                out = work / f"out-{mb:g}MB-{name}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                got = tools[name](src, out, a["tokenizer"], args.workers, work / f"{name}.log")
                runs[name].append(got)
                print(f"  {name:12s} run {r + 1}: {got['seconds']:7.2f} s wall, {got['cpu_seconds']:7.2f} CPU-s, peak RSS "
                      f"{got['peak_rss_gib_tree']:.2f} GiB "
                      f"(tree), {got['peak_rss_gib_max_process']:.2f} GiB (largest process)", flush=True)
        same = compare(runs["megatron-lm"][-1]["prefix"], runs["ours"][-1]["prefix"])
        summary = {}
        for name, rs in runs.items():
            mean = sum(r["seconds"] for r in rs) / len(rs)
            cpu = sum(r["cpu_seconds"] for r in rs) / len(rs)
            summary[name] = {"seconds_each": [round(r["seconds"], 2) for r in rs], "seconds_mean": round(mean, 2),
                             "cpu_seconds_each": [round(r["cpu_seconds"], 2) for r in rs],
                             "cpu_us_per_token": round(cpu / same["tokens"] * 1e6, 3),
                             "tokens_per_s": round(same["tokens"] / mean), "mb_per_s": round(size / 1e6 / mean, 2),
                             "peak_rss_gib_tree": round(max(r["peak_rss_gib_tree"] for r in rs), 3),
                             "peak_rss_gib_max_process": round(max(r["peak_rss_gib_max_process"] for r in rs), 3)}
            print(f"  {name:12s} mean {mean:7.2f} s {summary[name]['tokens_per_s']:>10,} tok/s "
                  f"{summary[name]['mb_per_s']:6.2f} MB/s, {summary[name]['cpu_us_per_token']:.2f} CPU-us per token")
        speedup = summary["megatron-lm"]["seconds_mean"] / summary["ours"]["seconds_mean"]
        cpu_ratio = summary["megatron-lm"]["cpu_us_per_token"] / summary["ours"]["cpu_us_per_token"]
        print(f"  ours is {speedup:.2f}x Megatron-LM's wall time, {cpu_ratio:.2f}x its CPU time (means of "
              f"{args.repeat}); {same}")
        rows.append({"input_mb": round(size / 1e6, 1), "workers": args.workers, "runs": summary,
                     "speedup_wall": round(speedup, 2), "speedup_cpu": round(cpu_ratio, 2), **same})
    import subprocess

    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if not commit and (checkout / "COMMIT").is_file():  # an exported tree (git archive) records it beside
        commit = (checkout / "COMMIT").read_text().strip()
    write_result("preprocess", args.name, {"megatron_lm": str(checkout), "megatron_lm_commit": commit or None,
                                           "tokenizer": a["tokenizer"], "rows": rows})

def _summary(runs: list[dict], tokens: int, size: int) -> dict:
    mean = sum(r["seconds"] for r in runs) / len(runs)
    cpu = None if runs[0]["cpu_seconds"] is None else sum(r["cpu_seconds"] for r in runs) / len(runs)
    return {"seconds_each": [round(r["seconds"], 2) for r in runs], "seconds_mean": round(mean, 2),
            "cpu_seconds_each": [None if cpu is None else round(r["cpu_seconds"], 2) for r in runs],
            "cpu_us_per_token": None if cpu is None else round(cpu / tokens * 1e6, 3), "tokens_per_s": round(tokens / mean),
            "mb_per_s": round(size / 1e6 / mean, 2),
            **{k: round(max(r[k] for r in runs), 3) for k in runs[0] if k.startswith("peak_")}}


def parquet_main(args) -> None:
    from importlib import metadata

    from megatron_ast.assets import ensure_assets

    a = ensure_assets()
    tok = a["tokenizer"] if args.tokenizer == "smollm2" else args.tokenizer
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for mb in args.mb:
        jl = corpus(work, mb, [Path(a["corpus"][d]["train"]) for d in ("book", "github")])
        two, one = parquet_corpus(work, jl, 2), parquet_corpus(work, jl, 1)
        sizes = {f.name: f.stat().st_size for f in sorted(two.glob("*.parquet"))}
        size = sum(sizes.values())
        for f in [*two.glob("*.parquet"), *one.glob("*.parquet")]:
            f.read_bytes()  # warm page cache for every run
        print(f"input: {size / 1e6:.1f} MB parquet in {len(sizes)} files ({jl.stat().st_size / 1e6:.0f} MB of jsonl), "
              f"{args.workers} workers, tokenizer {tok}")
        tools = {"datatrove": run_datatrove, "ours": run_ours_parquet}
        runs: dict[str, list[dict]] = {name: [] for name in tools}
        for r in range(args.repeat):
            for name in (list(tools) if r % 2 == 0 else list(tools)[::-1]):
                out = work / f"out-pq-{mb:g}MB-{name}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                got = tools[name](two, out, tok, args.workers, work / f"{name}-parquet.log")
                runs[name].append(got)
                print(f"  {name:10s} run {r + 1}: {got['seconds']:7.2f} s wall, peak "
                      f"RSS {got['peak_rss_gib_tree']:.2f} GiB (tree), {got['peak_rss_gib_max_process']:.2f} GiB "
                      f"(largest process)", flush=True)
        same = compare_all(runs["datatrove"][-1]["prefixes"], runs["ours"][-1]["prefixes"])
        summary = {name: _summary(rs, same["tokens"], size) for name, rs in runs.items()}
        speedup = summary["datatrove"]["seconds_mean"] / summary["ours"]["seconds_mean"]
        print(f"  ours is {speedup:.2f}x datatrove's wall time; {same}")
        out = work / f"out-pq-{mb:g}MB-one"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        single = run_ours_parquet(one, out, tok, args.workers, work / "ours-one-parquet.log")
        one_size = next(one.glob("*.parquet")).stat().st_size
        print(f"  ours on one {one_size / 1e6:.0f} MB file: {single['seconds']:.2f} s, peak RSS "
              f"{single['peak_rss_gib_tree']:.2f} GiB (tree), anon {single['peak_anon_gib_max_process']:.2f} GiB")
        rows.append({"input_mb_parquet": round(size / 1e6, 1), "files": sizes, "input_mb_jsonl": round(jl.stat().st_size / 1e6, 1),
                     "workers": args.workers, "runs": summary, "speedup_wall_vs_datatrove": round(speedup, 2), **same,
                     "ours_one_file": {"file_mb": round(one_size / 1e6, 1),
                                       **_summary([single], same["tokens"], one_size)}})
    write_result("preprocess", args.name, {"peer": f"datatrove {metadata.version('datatrove')}", "tokenizer": tok,
                                           "rows": rows})


if __name__ == "__main__":
    main()

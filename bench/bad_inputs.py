"""Bad inputs and faults, tried as a user would: every case should end with one line and exit 2.

On copies of the real assets (SmolLM2-135M, the Shakespeare and CPython corpus), each case breaks one thing and
runs the CLI in a fresh process. The table says, per case, the exit code, how many stderr lines are not
progress bars or launcher chatter, whether there was a traceback, and the last line. The full-disk cases
need a tmpfs (root); the AST run needs about two minutes on two CPU ranks.

    python bench/bad_inputs.py [--name vm] [--skip-train]     # -> bench/results/bad_inputs-NAME.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.machine import write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_ast.cli", *args]


def deepspeed(*args: str) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = Path(sys.executable).with_name("deepspeed")
    return [str(launcher), "--num_gpus", "2", "--master_port", str(port), str(Path(sys.executable).with_name("megatron-ast")),
            *args]


def tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def run_case(name: str, cmd: list[str], cwd: Path) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=1200)
    ours = [x for x in proc.stderr.splitlines() if x.startswith("megatron-ast: error: ")]
    traceback = "Traceback (most recent call last)" in proc.stderr
    row = {"case": name, "exit": proc.returncode, "error_lines": len(set(ours)), "traceback": traceback,
           "line": (ours[-1] if ours else (proc.stderr.strip().splitlines() or [""])[-1])[:300]}
    ok = proc.returncode == 2 and len(set(ours)) == 1 and not traceback
    row["ok"] = ok
    print(f"{'ok ' if ok else 'BAD'} exit {proc.returncode:>3}  {name}: {row['line'][:160]}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="vm", help="results go to bench/results/bad_inputs-NAME.json")
    ap.add_argument("--skip-train", action="store_true", help="leave out the two-rank AST cases")
    args = ap.parse_args()
    from megatron_ast.assets import ensure_assets

    assets = ensure_assets()
    model, corpus = Path(assets["model"]), assets["corpus"]
    work = Path(tempfile.mkdtemp(prefix="bad_inputs-"))
    rows, mounts = [], []
    try:
        shards = work / "shards"
        for split in ("train", "validation"):
            subprocess.run(cli("preprocess", "--input", corpus["book"][split], "--output-dir", str(shards / split),
                               "--tokenizer", str(model)), check=True, env=ENV, capture_output=True)
        val = shards / "validation"

        def damaged(kind: str) -> Path:
            d = work / f"shards-{kind}"
            shutil.copytree(val, d)
            b, i = d / "book__validation.bin", d / "book__validation.idx"
            {"bin cut": lambda: cut(b, 100_000), "idx cut": lambda: cut(i, i.stat().st_size - 40),
             "bin byte flipped": lambda: flip(b, 50_000)}[kind]()
            return d

        for kind in ("bin cut", "idx cut"):
            d = damaged(kind)
            rows.append(run_case(f"inspect, .{kind}", cli("inspect", str(d)), work))
            rows.append(run_case(f"eval ppl, .{kind}", cli("eval", "ppl", "--model", str(model), "--data", str(d),
                                                           "--max-windows", "2"), work))
            rows.append(run_case(f"merge, .{kind}", cli("merge", "--input", str(d), "--output", str(work / f"m-{kind}" / "x")),
                                 work))
        d = damaged("bin byte flipped")
        rows.append(run_case("inspect --verify, a byte flipped in .bin", cli("inspect", str(d), "--verify"), work))
        rows.append(run_case("merge, a byte flipped in .bin", cli("merge", "--input", str(d), "--output", str(work / "mf" / "x")),
                             work))
        rows.append(run_case("merge into one of its inputs", cli("merge", "--input", str(val / "book__validation"),
                                                                 "--output", str(val / "book__validation")), work))

        broken = {}
        for kind in ("safetensors cut", "config.json malformed"):
            d = work / f"model-{kind.split()[0]}"
            shutil.copytree(model, d)
            if kind == "safetensors cut":
                cut(d / "model.safetensors", 100_000_000)
            else:
                (d / "config.json").write_text((d / "config.json").read_text()[:-30])
            broken[kind] = d
            rows.append(run_case(f"eval ppl, {kind}", cli("eval", "ppl", "--model", str(d), "--data", str(val)), work))
            rows.append(run_case(f"prune, {kind}", cli("prune", "--model", str(d), "--method", "magnitude",
                                                       "--out", str(work / f"p-{kind}")), work))
        pruned = work / "pruned"
        subprocess.run(cli("prune", "--model", str(model), "--method", "magnitude", "--out", str(pruned)), check=True,
                       env=ENV, capture_output=True)
        other = work / "pruned-other"
        shutil.copytree(pruned, other)
        from safetensors.torch import load_file, save_file

        save_file({k: v.flip(-1) for k, v in load_file(str(pruned / "masks.safetensors")).items()},
                  str(other / "masks.safetensors"))
        rows.append(run_case("quantize, masks of other weights", cli("quantize", "--model", str(other), "--method", "rtn",
                                                                     "--group-size", "64", "--out", str(work / "q1")), work))
        cut(other / "masks.safetensors", 1000)
        rows.append(run_case("quantize, masks.safetensors cut", cli("quantize", "--model", str(other), "--method", "rtn",
                                                                    "--group-size", "64", "--out", str(work / "q2")), work))
        (work / "a-file").write_text("x")
        rows.append(run_case("preprocess --output-dir is a file", cli("preprocess", "--input", corpus["book"]["validation"],
                                                                      "--output-dir", str(work / "a-file"),
                                                                      "--tokenizer", str(model)), work))
        rows.append(run_case("prune magnitude --nsamples 100000", cli("prune", "--model", str(model), "--method", "magnitude",
                                                                      "--nsamples", "100000", "--out", str(work / "p3")), work))
        disk, small = work / "disk", work / "small-disk"
        if tmpfs(disk, "300m") and tmpfs(small, "1m"):
            mounts += [disk, small]
            rows.append(run_case("preprocess into a full disk (1 MB tmpfs)", cli(
                "preprocess", "--input", corpus["book"]["train"], "--output-dir", str(small / "shards"),
                "--tokenizer", str(model)), work))
            rows.append(run_case("prune into a full disk (300 MB tmpfs)", cli(
                "prune", "--model", str(model), "--method", "magnitude", "--out", str(disk / "p")), work))
            rows.append(run_case("quantize into a full disk (300 MB tmpfs)", cli(
                "quantize", "--model", str(pruned), "--method", "rtn", "--group-size", "64", "--out", str(disk / "q")), work))

        ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
        (work / "ds.json").write_text(json.dumps(ds))
        base = {"model": str(model), "deepspeed": str(work / "ds.json"), "output_dir": str(work / "run"),
                "data": {"train": [str(shards / "train")], "validation": [], "seq_len": 128}, "steps": 2,
                "mask_interval": 2, "eval": {"every": 0, "windows": 2}, "slorb": None}
        for name, change in (("steps: \"ten\"", {"steps": "ten"}), ("steps: 2.7", {"steps": 2.7}),
                             ("lr.peak: \"fast\"", {"lr": {"peak": "fast"}}),
                             ("data.train: a string", {"data": {**base["data"], "train": str(shards / "train")}})):
            y = work / f"run-{len(rows)}.yaml"
            y.write_text(yaml.safe_dump({**base, **change}))
            rows.append(run_case(f"train --dry-run, {name}", cli("train", "--config", str(y), "--dry-run"), work))
        (work / "ds-str.json").write_text(json.dumps({**ds, "train_micro_batch_size_per_gpu": "2"}))
        y = work / "run-ds.yaml"
        y.write_text(yaml.safe_dump({**base, "deepspeed": str(work / "ds-str.json")}))
        rows.append(run_case("train --dry-run, DeepSpeed micro batch \"2\"", cli("train", "--config", str(y), "--dry-run"), work))
        y = work / "run.yaml"
        y.write_text(yaml.safe_dump(base))
        rows.append(run_case("train --world-size 64 without --dry-run", cli("train", "--config", str(y), "--world-size", "64"),
                             work))
        if not args.skip_train:
            y = work / "run-bad-shard.yaml"
            bad = work / "train-flipped"
            shutil.copytree(shards / "train", bad)
            flip(bad / "book__train.bin", 123_456)
            y.write_text(yaml.safe_dump({**base, "data": {**base["data"], "train": [str(bad)]}}))
            rows.append(run_case("train (deepspeed, 2 ranks), a byte flipped in a training shard",
                                 deepspeed("train", "--config", str(y)), work))
            if mounts:
                y = work / "run-disk.yaml"
                y.write_text(yaml.safe_dump({**base, "output_dir": str(disk / "run")}))
                rows.append(run_case("train (deepspeed, 2 ranks), output_dir on a 300 MB tmpfs",
                                     deepspeed("train", "--config", str(y)), work))
                rows[-1]["files_left"] = sorted(str(p.relative_to(disk)) for p in (disk / "run").rglob("step*"))
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    result = {"command": "python bench/bad_inputs.py", "cases": rows, "all_ok": all(r["ok"] for r in rows)}
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} cases end with one line and exit 2")
    path = write_result("bad_inputs", args.name, result)
    write_page(json.loads(path.read_text()))


def write_page(result: dict) -> None:
    """docs/bad_inputs.md: the table, with the date, machine and command."""
    m = result["machine"]
    rows = "\n".join(f"| {r['case']} | {r['exit']} | {r['error_lines']} | {'yes' if r['traceback'] else 'no'} | "
                     f"{r['line'].removeprefix('megatron-ast: error: ').replace('|', '/')[:220]} |" for r in result["cases"])
    page = f"""# Bad inputs and faults, as a user meets them

`{result['command']}` on {result['date']}: {m['cpu']}, {m['cores']} cores, {m['memory']}, Python {m['python']},
torch {m.get('torch')}. Each case breaks one thing in a copy of the real assets (SmolLM2-135M, the Shakespeare
corpus) and runs the CLI in a fresh process; the full-disk cases write into a tmpfs. Wanted: exit 2, one
`megatron-ast: error:` line (the same on every rank), no traceback. {sum(r['ok'] for r in result['cases'])} of
{len(result['cases'])} cases do. JSON: `bench/results/bad_inputs-vm.json`.

| case | exit | error lines | traceback | the line (shortened, paths of the temp dir kept) |
|---|---|---|---|---|
{rows}
"""
    (REPO / "docs" / "bad_inputs.md").write_text(page)
    print(f"wrote {REPO / 'docs' / 'bad_inputs.md'}")


if __name__ == "__main__":
    main()

"""Bad inputs and faults, tried as a user would: every case should end with one line and exit 2.

On copies of the real assets (SmolLM2-135M, the Shakespeare and CPython corpus), each case breaks one thing and
runs the CLI in a fresh process. The table says, per case, the exit code, how many stderr lines are not
progress bars or launcher chatter, whether there was a traceback, and the last line. The full-disk cases
need a tmpfs (root); the AST runs need a few minutes each on two CPU ranks. Each case also lists what it left
at the output path it was given (wanted: nothing, not even an empty dir), and the runs that fill a disk list
the checkpoints left (wanted: the last complete one, `latest` on it).

    python bench/bad_inputs.py [--name vm] [--skip-train]              # -> bench/results/bad_inputs-NAME.json
    python bench/bad_inputs.py --name vm-before --code /tmp/old-main   # the same cases on another checkout's CLI

Either run rewrites docs/bad_inputs.md from bad_inputs-vm.json, beside bad_inputs-vm-before.json when that exists.
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


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def deepspeed(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", free_port(),
            str(Path(sys.executable).with_name("megatron-ast")), *args]


def torchrun(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", free_port(),
            str(Path(sys.executable).with_name("megatron-ast")), *args]


def tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def left_at(out: Path | None) -> list[str]:
    """What a failed command left at the output path it was given: files, or an empty dir."""
    if out is None or not out.exists():
        return []
    if out.is_file():
        return [out.name]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return files or ["(an empty dir)"]


def run_case(name: str, cmd: list[str], cwd: Path, out: Path | None, env: dict, wanted: str = "error") -> dict:
    """wanted "error": exit 2, one distinct error line, no traceback, nothing at `out`; "torchrun" (which exits 1
    whatever its ranks do): exit 1 and the line in its failure summary; "warning": exit 0 and a warning line."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=1200)
    ours = [x for x in proc.stderr.splitlines() if x.startswith("megatron-ast: error: ")]
    warned = [x for x in proc.stderr.splitlines() if ": warning: " in x]
    traceback = "Traceback (most recent call last)" in proc.stderr
    shown = (warned if wanted == "warning" else ours) or proc.stderr.strip().splitlines() or [""]
    row = {"case": name, "exit": proc.returncode, "error_lines": len(set(ours)), "traceback": traceback,
           "line": shown[-1][:300], "left": left_at(out)}
    if wanted == "torchrun":
        row["in_torchrun_summary"] = bool(ours) and f"traceback : {ours[-1]}" in proc.stderr
        ok = proc.returncode == 1 and len(set(ours)) == 1 and row["in_torchrun_summary"]
    elif wanted == "warning":
        ok = proc.returncode == 0 and bool(warned) and not ours
    else:
        ok = proc.returncode == 2 and len(set(ours)) == 1 and not traceback
    row["ok"] = ok and not row["left"]
    print(f"{'ok ' if row['ok'] else 'BAD'} exit {proc.returncode:>3}  {name}: {row['line'][:160]}"
          f"{'  LEFT ' + str(row['left'][:5]) if row['left'] else ''}", flush=True)
    return row


def checkpoints_left(out: Path) -> dict:
    """The run dir's checkpoints after a failed save: which are complete, and where `latest` points."""
    ckpts = out / "checkpoints"
    latest = ckpts / "latest"
    return {"latest": latest.read_text().strip() if latest.is_file() else None,
            "complete": sorted(p.parent.name for p in ckpts.glob("step*/complete.json")),
            "partial": sorted(p.name for p in ckpts.glob("step*") if not (p / "complete.json").is_file())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="vm", help="results go to bench/results/bad_inputs-NAME.json")
    ap.add_argument("--skip-train", action="store_true", help="leave out the two-rank AST cases")
    ap.add_argument("--code", type=Path, help="run the cases' CLI from this checkout (PYTHONPATH), e.g. an older main; "
                    "the inputs are still made by this one")
    ap.add_argument("--label", help="what --code is, for the page (e.g. its commit)")
    args = ap.parse_args()
    if args.code:
        case_env = {**ENV, "PYTHONPATH": str(args.code.resolve())}
    else:
        case_env = ENV
    from megatron_ast.assets import ensure_assets

    assets = ensure_assets()
    model, corpus = Path(assets["model"]), assets["corpus"]
    work = Path(tempfile.mkdtemp(prefix="bad_inputs-"))
    rows, mounts = [], []

    def case(name: str, cmd: list[str], out: Path | None = None, **kw) -> dict:
        rows.append(run_case(name, cmd, work, out, env=case_env, **kw))
        return rows[-1]

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
            case(f"inspect, .{kind}", cli("inspect", str(d)))
            case(f"eval ppl, .{kind}", cli("eval", "ppl", "--model", str(model), "--data", str(d), "--max-windows", "2"))
            m = work / f"m-{kind}"
            case(f"merge, .{kind}", cli("merge", "--input", str(d), "--output", str(m / "x")), m)
        d = damaged("bin byte flipped")
        case("inspect --verify, a byte flipped in .bin", cli("inspect", str(d), "--verify"))
        case("merge, a byte flipped in .bin", cli("merge", "--input", str(d), "--output", str(work / "mf" / "x")), work / "mf")
        case("merge into one of its inputs", cli("merge", "--input", str(val / "book__validation"),
                                                 "--output", str(val / "book__validation")))
        empty = work / "empty.jsonl"
        empty.write_text("")
        case("preprocess, an empty jsonl (wanted: exit 0 and a warning)", cli(
            "preprocess", "--input", str(empty), "--output-dir", str(work / "empty-shards"), "--tokenizer", str(model)),
            wanted="warning")

        for kind in ("safetensors cut", "config.json malformed"):
            d = work / f"model-{kind.split()[0]}"
            shutil.copytree(model, d)
            if kind == "safetensors cut":
                cut(d / "model.safetensors", 100_000_000)
            else:
                (d / "config.json").write_text((d / "config.json").read_text()[:-30])
            case(f"eval ppl, {kind}", cli("eval", "ppl", "--model", str(d), "--data", str(val)))
            case(f"prune, {kind}", cli("prune", "--model", str(d), "--method", "magnitude", "--out", str(work / f"p-{kind}")),
                 work / f"p-{kind}")
        pruned = work / "pruned"
        subprocess.run(cli("prune", "--model", str(model), "--method", "magnitude", "--out", str(pruned)), check=True,
                       env=ENV, capture_output=True)
        other = work / "pruned-other"
        shutil.copytree(pruned, other)
        from safetensors.torch import load_file, save_file

        save_file({k: v.flip(-1) for k, v in load_file(str(pruned / "masks.safetensors")).items()},
                  str(other / "masks.safetensors"))
        case("quantize, masks of other weights", cli("quantize", "--model", str(other), "--method", "rtn", "--group-size",
                                                     "64", "--out", str(work / "q1")), work / "q1")
        cut(other / "masks.safetensors", 1000)
        case("quantize, masks.safetensors cut", cli("quantize", "--model", str(other), "--method", "rtn", "--group-size",
                                                    "64", "--out", str(work / "q2")), work / "q2")
        (work / "a-file").write_text("x")
        case("preprocess --output-dir is a file", cli("preprocess", "--input", corpus["book"]["validation"],
                                                      "--output-dir", str(work / "a-file"), "--tokenizer", str(model)))
        case("prune magnitude --nsamples 100000", cli("prune", "--model", str(model), "--method", "magnitude",
                                                      "--nsamples", "100000", "--out", str(work / "p3")), work / "p3")
        disk, small = work / "disk", work / "small-disk"
        if tmpfs(disk, "300m") and tmpfs(small, "1m"):
            mounts += [disk, small]
            case("preprocess into a full disk (1 MB tmpfs)", cli(
                "preprocess", "--input", corpus["book"]["train"], "--output-dir", str(small / "shards"),
                "--tokenizer", str(model)), small / "shards")
            case("prune into a full disk (300 MB tmpfs)", cli(
                "prune", "--model", str(model), "--method", "magnitude", "--out", str(disk / "p")), disk / "p")
            case("quantize into a full disk (300 MB tmpfs)", cli(
                "quantize", "--model", str(pruned), "--method", "rtn", "--group-size", "64", "--out", str(disk / "q")),
                disk / "q")

        ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
        (work / "ds.json").write_text(json.dumps(ds))
        base = {"model": str(model), "deepspeed": str(work / "ds.json"), "output_dir": str(work / "run"),
                "data": {"train": [str(shards / "train")], "validation": [], "seq_len": 128}, "steps": 2,
                "mask_interval": 2, "eval": {"every": 0, "windows": 2}, "slorb": None}

        def config(name: str, **change) -> str:
            y = work / f"{name}.yaml"
            y.write_text(yaml.safe_dump({**base, **change}))
            return str(y)

        for name, change in (("steps: \"ten\"", {"steps": "ten"}), ("steps: 2.7", {"steps": 2.7}),
                             ("lr.peak: \"fast\"", {"lr": {"peak": "fast"}}),
                             ("data.train: a string", {"data": {**base["data"], "train": str(shards / "train")}})):
            case(f"train --dry-run, {name}", cli("train", "--config", config(f"run-{len(rows)}", **change), "--dry-run"),
                 work / "run")
        (work / "ds-str.json").write_text(json.dumps({**ds, "train_micro_batch_size_per_gpu": "2"}))
        case("train --dry-run, DeepSpeed micro batch \"2\"",
             cli("train", "--config", config("run-ds", deepspeed=str(work / "ds-str.json")), "--dry-run"), work / "run")
        zero = {**ds["zero_optimization"], "stage3_prefetch_bucket_sizee": 5e7}
        (work / "ds-typo.json").write_text(json.dumps({**ds, "zero_optimization": zero}))
        case("train --dry-run, DeepSpeed key misspelt (zero_optimization.stage3_prefetch_bucket_sizee)",
             cli("train", "--config", config("run-typo", deepspeed=str(work / "ds-typo.json")), "--dry-run"), work / "run")
        case("train --world-size 64 without --dry-run", cli("train", "--config", config("run"), "--world-size", "64"),
             work / "run")
        if not args.skip_train:
            bad = work / "train-flipped"
            shutil.copytree(shards / "train", bad)
            flip(bad / "book__train.bin", 123_456)
            flipped = config("run-bad-shard", data={**base["data"], "train": [str(bad)]},
                             output_dir=str(work / "run-flipped"))
            case("train (deepspeed, 2 ranks), a byte flipped in a training shard", deepspeed("train", "--config", flipped),
                 work / "run-flipped")
            case("train (torchrun, 2 ranks; torchrun exits 1), a byte flipped in a training shard",
                 torchrun("train", "--config", flipped), work / "run-flipped", wanted="torchrun")
            if mounts:
                row = case("train (deepspeed, 2 ranks), output_dir on a 300 MB tmpfs",
                           deepspeed("train", "--config", config("run-disk", output_dir=str(disk / "run"))))
                row["checkpoints_left"] = checkpoints_left(disk / "run")
                row["ok"] = row["ok"] and row["checkpoints_left"] == {"latest": None, "complete": [], "partial": []}
            big = work / "disk-2.9g"
            if mounts and tmpfs(big, "2900m"):
                mounts.append(big)
                # a checkpoint every step: step1 fits in 2.9 GB, step2 beside it does not
                every = config("run-every", output_dir=str(big / "run"), checkpoint={"every": 1})
                row = case("train (deepspeed, 2 ranks), the second checkpoint does not fit (2.9 GB tmpfs)",
                           deepspeed("train", "--config", every))
                row["checkpoints_left"] = checkpoints_left(big / "run")
                row["ok"] = row["ok"] and row["checkpoints_left"] == {"latest": "step1", "complete": ["step1"],
                                                                      "partial": []}
                case("train (deepspeed, 2 ranks), a fresh start into that run's dir", deepspeed("train", "--config", every))
                case("export into a full disk (300 MB tmpfs)", cli(
                    "export", str(big / "run" / "checkpoints" / "step1"), "--out", str(disk / "e")), disk / "e")
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    result = {"command": "python bench/bad_inputs.py" + (f" --code {args.code}" if args.code else ""), "cases": rows,
              "all_ok": all(r["ok"] for r in rows), "code": args.label or (str(args.code) if args.code else "this checkout")}
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} cases behave as wanted")
    path = write_result("bad_inputs", args.name, result)
    now, before = path.with_name("bad_inputs-vm.json"), path.with_name("bad_inputs-vm-before.json")
    if now.is_file() and args.name in ("vm", "vm-before"):
        write_page(json.loads(now.read_text()), json.loads(before.read_text()) if before.is_file() else None)


def write_page(result: dict, before: dict | None) -> None:
    """docs/bad_inputs.md: the table, with the date, machine and command; the same cases on the older CLI beside."""
    m = result["machine"]
    old = {r["case"]: r for r in (before or {}).get("cases", [])}

    def short(r: dict) -> str:
        return r["line"].removeprefix("megatron-ast: error: ").replace("|", "/")[:200]

    def was(r: dict | None) -> str:
        if r is None:
            return "| not run |"
        said = short(r)[:120] if r["error_lines"] or r["traceback"] or r["exit"] else "went on as if nothing were wrong"
        return f"| exit {r['exit']}, {r['error_lines']} error line{'s' * (r['error_lines'] != 1)}, " \
               f"{'traceback' if r['traceback'] else 'no traceback'}{', left ' + str(len(r['left'])) + ' files' if r['left'] else ''}" \
               f"{kept(r)}: {said} |"

    def kept(r: dict) -> str:
        c = r.get("checkpoints_left")
        return "" if c is None else f" (checkpoints left: latest {c['latest']}, complete {c['complete'] or 'none'}, " \
                                    f"partial {c['partial'] or 'none'})"

    rows = "\n".join(f"| {r['case']} | {'ok' if r['ok'] else 'NO'} | {r['exit']} | {r['error_lines']} | "
                     f"{'yes' if r['traceback'] else 'no'} | {', '.join(r['left']) or 'nothing'} | {short(r)}{kept(r)} "
                     + (was(old.get(r["case"])) if before else "|") for r in result["cases"])
    head = "| case | as wanted | exit | error lines | traceback | left at the output | the line (shortened) |"
    rule = "|---|---|---|---|---|---|---|"
    if before:
        head += f" before ({before.get('code', '?')}) |"
        rule += "---|"
    also = "" if not before else (", and for the last column `bench/results/bad_inputs-vm-before.json` "
                                  f"(`{before['command']}`: the same cases on that checkout's CLI)")
    page = f"""# Bad inputs and faults, as a user meets them

`{result['command']}` on {result['date']}: {m['cpu']}, {m['cores']} cores, {m['memory']}, Python {m['python']},
torch {m.get('torch')}. Each case breaks one thing in a copy of the real assets (SmolLM2-135M, the Shakespeare
corpus) and runs the CLI in a fresh process; the full-disk cases write into a tmpfs. Wanted: exit 2, one
`megatron-ast: error:` line (the same on every rank), no traceback, nothing left at the output path it was
given (not even an empty dir), and after a full disk the last complete checkpoint with `latest` on it.
Two cases want otherwise: torchrun ends with its own exit 1 whatever its ranks do, so there the line must
be in its failure summary; an empty input is no error, so there exit 0 and a warning.
{sum(r['ok'] for r in result['cases'])} of {len(result['cases'])} cases behave as wanted.
JSON: `bench/results/bad_inputs-vm.json`{also}.

{head}
{rule}
{rows}
"""
    (REPO / "docs" / "bad_inputs.md").write_text(page)
    print(f"wrote {REPO / 'docs' / 'bad_inputs.md'}")


if __name__ == "__main__":
    main()

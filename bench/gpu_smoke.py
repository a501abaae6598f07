"""Every training path once, small, before any measurement: bench/gpu.sh's first step (under 3 minutes on one GPU).

  1. prune: SparseGPT 2:4 with a fitted SLoRB branch (`prune --slorb-group 16`)
  2. AST from that dir, `slorb.init: fitted`, bf16 ZeRO-3, 2 steps with a checkpoint each step, `--resume auto`
     on an empty run dir (it starts fresh)
  3. the same run relaunched for a 3rd step with `--resume auto` (it resumes: the collectives of the resume scan)
  4. ZeRO-Offload (offload_optimizer to the CPU): 2 steps with a mask recompute
  5. export of run 3's checkpoint to a Hugging Face dir, then its perplexity
  6. AST on fused MoE experts, 2 steps with the load-balancing term: a tiny random Qwen3-MoE ([experts, out, in])
     and gpt-oss ([experts, in, out] with biases) on the same tokenizer, then each exported
Each stage is the CLI a user runs, started the way the launchers start it (torchrun, `--ranks` ranks); the first
failing stage stops the script with its log's tail. Writes bench/results/gpu_smoke-<name>.json with each stage's
seconds.

    python bench/gpu_smoke.py --name h200                     # on a GPU machine (bf16)
    DS_ACCELERATOR=cpu python bench/gpu_smoke.py --model DIR --corpus a.jsonl b.jsonl --fp32 --ranks 2   # CPU
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from machine import machine_info  # noqa: E402


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_ast.cli", *args]


def _ranks(n: int, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}",
            "-m", "megatron_ast.cli", *args]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="dense HF dir (default: the reference SmolLM2-135M from `megatron-ast assets`)")
    ap.add_argument("--corpus", nargs="+", help="jsonl files, one domain each (default: the reference corpus)")
    ap.add_argument("--work", default="/tmp/gpu_smoke")
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cuda", help="where prune works")
    ap.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 (DeepSpeed's CPU accelerator)")
    ap.add_argument("--name", default="gpu")
    ap.add_argument("--out", help="default bench/results/gpu_smoke-<name>.json")
    a = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if a.model is None or a.corpus is None:
        from megatron_ast.assets import ensure_assets

        assets = ensure_assets()
        a.model = a.model or assets["model"]
        a.corpus = a.corpus or [assets["corpus"][d]["train"] for d in ("book", "github")]
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for i, f in enumerate(a.corpus):  # one domain dir per file (preprocess names domains by parent dir)
        (work / "corpus" / f"d{i}").mkdir(parents=True)
        (work / "corpus" / f"d{i}" / "train.jsonl").symlink_to(Path(f).resolve())
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    if not a.fp32:
        ds["bf16"] = {"enabled": True}
    offload = {**ds, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
    (work / "ds.json").write_text(json.dumps(ds))
    (work / "ds_offload.json").write_text(json.dumps(offload))

    def run_yaml(name: str, steps: int, **over) -> str:
        import yaml

        cfg = {"model": a.model, "deepspeed": str(work / "ds.json"), "output_dir": str(work / name),
               "init": str(work / "pruned"), "data": {"train": [str(work / "shards")], "seq_len": a.seq_len},
               "steps": steps, "mask_interval": 2, "lr": {"peak": 1e-4, "min": 1e-5, "warmup": 1},
               "slorb": {"group": 16, "init": "fitted"}, "checkpoint": {"every": 1, "keep": 2},
               "eval": {"every": 0, "windows": 2}, **over}
        path = work / f"{name}-{steps}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    for family in ("qwen3_moe", "gpt_oss"):  # tiny random MoEs on the model's tokenizer
        from transformers import AutoConfig, AutoModelForCausalLM

        vocab = AutoConfig.from_pretrained(a.model).vocab_size
        own = ({"num_experts": 4, "moe_intermediate_size": 32} if family == "qwen3_moe" else
               {"num_local_experts": 4, "layer_types": ["sliding_attention", "full_attention"]})
        cfg = AutoConfig.for_model(family, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts_per_tok=2,
                                   **own)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(work / family)
        for f in Path(a.model).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy2(f, work / family / f.name)
    port = 29000 + os.getpid() % 1000
    stages = [
        ("preprocess", _cli("preprocess", "--input", str(work / "corpus"), "--output-dir", str(work / "shards"),
                            "--tokenizer", a.model)),
        ("prune_slorb_fitted", _cli("prune", "--model", a.model, "--method", "sparsegpt", "--calib", str(work / "shards"),
                                    "--nsamples", "8", "--seqlen", str(a.seq_len), "--slorb-group", "16",
                                    "--device", a.device, "--out", str(work / "pruned"))),
        ("train_fresh_resume_auto", _ranks(a.ranks, port, "train", "--config", run_yaml("ast", 2), "--resume", "auto")),
        ("train_resume_auto", _ranks(a.ranks, port + 1, "train", "--config", run_yaml("ast", 3), "--resume", "auto")),
        ("train_zero_offload", _ranks(a.ranks, port + 2, "train", "--config",
                                      run_yaml("offload", 2, deepspeed=str(work / "ds_offload.json"), mask_interval=1))),
        ("export", _cli("export", str(work / "ast" / "checkpoints" / "step3"), "--out", str(work / "hf"))),
        ("eval_exported", _cli("eval", "ppl", "--model", str(work / "hf"), "--data", str(work / "shards"),
                               "--seq-len", str(a.seq_len), "--max-windows", "2", "--expect", "2:4")),
        *[stage for i, family in enumerate(("qwen3_moe", "gpt_oss")) for stage in (
            (f"train_moe_{family}", _ranks(a.ranks, port + 3 + i, "train", "--config", run_yaml(
                f"{family}-run", 2, model=str(work / family), init="magnitude", slorb=None,
                distill={"w_router": 0.01}))),
            (f"export_moe_{family}", _cli("export", str(work / f"{family}-run" / "checkpoints" / "step2"),
                                          "--out", str(work / f"{family}-hf"))))],
    ]
    result = {"stages": {}, "machine": machine_info(), "command": " ".join(["python", *sys.argv])}
    t_all = time.perf_counter()
    for name, cmd in stages:
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        result["stages"][name] = {"seconds": round(time.perf_counter() - t, 1), "ok": proc.returncode == 0}
        print(f"smoke {name:26s} {result['stages'][name]['seconds']:6.1f} s  "
              f"{'ok' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}", flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            break
    else:
        log = [json.loads(line) for line in (work / "ast" / "log.jsonl").read_text().splitlines()]
        summary = json.loads((work / "ast" / "summary.json").read_text())
        result["checks"] = {"resumed_at_step": summary["resumed_at_step"], "steps_logged": [r["step"] for r in log],
                            "offload_flips": [r.get("flip_rate_prev") for r in
                                              map(json.loads, (work / "offload" / "log.jsonl").read_text().splitlines())]}
        ok = summary["resumed_at_step"] == 2 and result["checks"]["steps_logged"] == [1, 2, 3]
        result["stages"]["checks"] = {"ok": ok}
        print(f"smoke checks: resumed at step {summary['resumed_at_step']}, steps logged "
              f"{result['checks']['steps_logged']}: {'ok' if ok else 'FAILED'}")
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    out = Path(a.out) if a.out else HERE / "results" / f"gpu_smoke-{a.name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    sys.exit(0 if all(s["ok"] for s in result["stages"].values()) else 1)


if __name__ == "__main__":
    main()

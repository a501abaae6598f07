"""Host and GPU memory per stage for Llama-3-8B and Llama-3-70B, before and after the memory work: the
figures measured on this machine (bench/results/stage_memory-<name>.json at 1.5B and 1.0B parameters,
bench/results/loss_memory-<name>.json at vocabulary 128,256) scaled by stated arithmetic, and the dry run's
per-rank plan (training/plan.py) at the shipped DeepSpeed config on 64 GPUs of 80 GB.

Scaling, per stage (P parameters, V vocabulary, h hidden, layer = one decoder layer's parameters):
  - prune before: the whole model in fp32 on the host (4 P) plus what the 1.5B run measured above it;
    after: the parameters outside the decoder layers in the source dtype (2 (V h + V h)), one layer in fp32
    (4 layer) read from its bf16 copy (2 layer), plus the same constant;
  - export before: the measured multiple of P (three fp32 copies and the consolidation's own);
    after: the largest tensor in fp32, its cast and its mask (4 + 2 + 1 bytes per element) plus the constant;
  - train per rank: plan.memory_per_rank + plan.working_memory, micro-batch 8 x 1024 tokens, bf16; before,
    the whole-batch loss's measured 16 logits-sized tensors and a ZeRO-3 teacher; after, the chunked loss
    and the teacher `auto` picks.
Writes docs/memory_at_scale.json and docs/memory_at_scale.png.

    python bench/memory_at_scale.py [--name vm]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

LLAMA3 = {
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
GIB = 2**30


def _shape(c) -> dict:
    from megatron_ast.training.plan import param_counts

    total, largest, masked = param_counts(c)
    kv = c.hidden_size // c.num_attention_heads * c.num_key_value_heads
    layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    return {"params": total, "largest": largest, "masked": masked, "layer": layer,
            "outside": 2 * c.vocab_size * c.hidden_size, "max_tensor": c.vocab_size * c.hidden_size}


def _train(c, shape: dict, after: bool, world: int = 64) -> float:
    from megatron_ast.training.distillation import CHUNK_BYTES
    from megatron_ast.training.plan import memory_per_rank, working_memory

    mem = memory_per_rank(shape["params"], shape["largest"], shape["masked"], world)
    work = working_memory(c, 8, 1024, True, checkpointing=True)
    if not after:  # the whole-batch loss kept ~16 logits-sized bf16 tensors (bench/loss_memory.py: 7.82 GiB / 0.49)
        work["logits_and_loss"] = work["logits_and_loss"] - 8 * CHUNK_BYTES + 13 * 8 * 1024 * c.vocab_size * 2
    teacher = mem["parts"]["teacher_params"]["bytes"]
    if after and 2 * shape["params"] <= 0.25 * 80 * GIB:  # teacher.zero auto on an 80 GB GPU: a replica
        teacher = 2 * shape["params"]
    return (mem["gpu"] - mem["parts"]["teacher_params"]["bytes"] + teacher + sum(work.values())) / GIB


def main() -> None:
    from transformers import LlamaConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="vm")
    a = ap.parse_args()
    stage = json.loads((HERE / "results" / f"stage_memory-{a.name}.json").read_text())
    small = {k: _shape(LlamaConfig(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["intermediate"],
                                   num_hidden_layers=m["layers"], num_attention_heads=16, num_key_value_heads=8,
                                   tie_word_embeddings=False)) for k, m in stage["models"].items()}
    r = stage["results"]
    anon = lambda label, st: r[label][st]["peak_anon_gib_max_process"] * GIB  # noqa: E731
    # what each measured run held above its model-size term: the interpreter, torch, DeepSpeed, buffers
    prune_after = lambda s: 2 * s["outside"] + 6 * s["layer"]  # noqa: E731
    export_after = lambda s: 7 * s["max_tensor"]  # noqa: E731
    const = {"prune_before": anon("before", "prune") - 4 * small["prune"]["params"],
             "prune_after": anon("after", "prune") - prune_after(small["prune"]),
             "export_after": anon("after", "export") - export_after(small["export"])}
    export_before_per_param = anon("before", "export") / small["export"]["params"]
    rows = {}
    for name, kw in LLAMA3.items():
        c = LlamaConfig(**kw)
        s = _shape(c)
        rows[name] = {
            "params": s["params"],
            "prune_host_gib": {"before": (4 * s["params"] + const["prune_before"]) / GIB,
                               "after": (prune_after(s) + const["prune_after"]) / GIB},
            "export_host_gib": {"before": export_before_per_param * s["params"] / GIB,
                                "after": (export_after(s) + const["export_after"]) / GIB},
            "train_gpu_gib_per_rank_64_gpus": {"before": _train(c, s, False), "after": _train(c, s, True)},
        }
    for name, row in rows.items():
        print(name, json.dumps({k: {kk: round(vv, 1) for kk, vv in v.items()} if isinstance(v, dict) else v
                                for k, v in row.items()}))
    out = HERE.parent / "docs" / "memory_at_scale.json"
    out.write_text(json.dumps({"measured_at": {"model_params": {k: v["params"] for k, v in small.items()},
                                               "stage_memory": stage["results"],
                                               "constants_gib": {k: v / GIB for k, v in const.items()},
                                               "export_before_bytes_per_param": export_before_per_param},
                               "rows": rows, "date": time.strftime("%Y-%m-%d"),
                               "command": "python bench/memory_at_scale.py"}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [("prune_host_gib", "prune (host)"), ("export_host_gib", "export (host)"),
              ("train_gpu_gib_per_rank_64_gpus", "train (GPU per rank, 64 GPUs)")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (name, row) in zip(axes, rows.items()):
        xs = range(len(stages))
        ax.bar([x - 0.2 for x in xs], [row[k]["before"] for k, _ in stages], 0.4, label="before", color="#bbbbbb")
        ax.bar([x + 0.2 for x in xs], [row[k]["after"] for k, _ in stages], 0.4, label="after", color="#3b75af")
        ax.set_xticks(list(xs), [t for _, t in stages], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("GiB")
        ax.set_title(name)
        ax.legend()
    fig.suptitle("Memory per stage at Llama-3 shapes (measured at 1.5B and 1.0B on the CPU, scaled; log scale)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

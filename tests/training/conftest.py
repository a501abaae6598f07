"""Shared by the trainer and checkpoint tests: a tiny Llama, real text in token shards, 2-rank runs."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from data_tools.preprocess import preprocess
from tests.conftest import stdlib_texts, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, hf_tokenizer_dir):
    d = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(d / "dense")
    for f in hf_tokenizer_dir.iterdir():
        (d / "dense" / f.name).write_bytes(f.read_bytes())
    texts = stdlib_texts(60)
    write_jsonl(d / "corpus" / "github" / "train.jsonl", texts[:50])
    write_jsonl(d / "corpus" / "book" / "train.jsonl", texts[50:55])
    write_jsonl(d / "val" / "github" / "validation.jsonl", texts[55:])
    preprocess([str(d / "corpus")], d / "shards", d / "dense")
    preprocess([str(d / "val")], d / "val_shards", d / "dense")
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    (d / "ds.json").write_text(json.dumps(ds))
    (d / "ds_bf16.json").write_text(json.dumps({**ds, "bf16": {"enabled": True}}))  # the GPU runs' precision
    return d


def config_file(d: Path, **over) -> Path:
    cfg = {"model": str(d / "dense"), "deepspeed": str(d / "ds.json"), "output_dir": str(d / "out"),
           "data": {"train": [str(d / "shards")], "validation": [str(d / "val_shards")], "seq_len": 64,
                    "blend": None},
           "steps": 16, "mask_interval": 4, "lr": {"peak": 3e-3, "min": 3e-4, "warmup": 2},
           "srste": {"lam": 2e-4, "t_inc": 8}, "eval": {"every": 8, "windows": 4}, "slorb": {"group": 16},
           "activation_checkpointing": True}
    cfg.update(over)
    path = d / f"run-{abs(hash(json.dumps(over, sort_keys=True, default=str)))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cmd(cfg: Path, *extra: str, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
            "-m", "megatron_ast.cli", "train", "--config", str(cfg), *extra]


TRAIN_ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def train(cfg: Path, *extra: str, ranks: int = 2) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(cfg, *extra, ranks=ranks), capture_output=True, text=True, timeout=900, env=TRAIN_ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def consolidated(ckpt: str | Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = Path(ckpt)
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def ckpt_masks(ckpt: str | Path) -> dict:
    """The run's full masks at a checkpoint, by Linear name (assembled from every rank's slices)."""
    from megatron_ast.training import checkpoint
    from megatron_ast.training.mask_partitions import masks_from_rank_files

    return masks_from_rank_files(checkpoint.rank_files(Path(ckpt)))


def reference_steps(model, opt, model_dir: Path, spec: dict, recompute) -> None:
    """The single-process side of the ZeRO-3 equivalence tests: spec["steps"] steps on the worker's saved batches,
    the micro-batches averaged, `recompute(step)` every spec["interval"] steps (under no_grad)."""
    for step in range(1, spec["steps"] + 1):
        batch = torch.load(model_dir / f"batch{step}.pt", weights_only=True)
        mb = spec["micro"]
        loss = sum(model(input_ids=batch[i : i + mb], labels=batch[i : i + mb]).loss for i in range(0, len(batch), mb))
        (loss / (len(batch) // mb)).backward()
        opt.step()
        opt.zero_grad()
        if step % spec["interval"] == 0:
            with torch.no_grad():
                recompute(step)


def run_zero3_worker(d: Path, config, world: int, spec: dict) -> tuple[Path, dict, dict]:
    """`zero3_worker.py` on `world` ranks over a random Llama of `config` (or the model given) and spec["steps"]
    fixed random batches (saved beside the model for the single-process references); (dir, result tensors,
    result info)."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = config if isinstance(config, torch.nn.Module) else LlamaForCausalLM(config)
    model.save_pretrained(d / "model")
    config = model.config
    g = torch.Generator().manual_seed(1)
    for step in range(1, spec["steps"] + 1):
        torch.save(torch.randint(0, config.vocab_size, (world * spec["micro"], 24), generator=g),
                   d / "model" / f"batch{step}.pt")
    out = d / "result.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={free_port()}",
           str(Path(__file__).with_name("zero3_worker.py")), str(d / "model"), str(out), json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=TRAIN_ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return d, load_file(str(out)), json.loads(Path(f"{out}.json").read_text())

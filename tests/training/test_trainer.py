"""`megatron-ast train` end to end: 2 ranks, ZeRO-3 student and teacher, CPU, gloo, real text."""
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
from megatron_ast.cli import main
from tests.conftest import stdlib_texts, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
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
    (d / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                                           "gradient_clipping": 1.0, "zero_optimization": {"stage": 3},
                                           "steps_per_print": 10**9}))
    return d


def _config(d: Path, **over) -> Path:
    cfg = {"model": str(d / "dense"), "deepspeed": str(d / "ds.json"), "output_dir": str(d / "out"),
           "data": {"train": [str(d / "shards")], "validation": [str(d / "val_shards")], "seq_len": 64,
                    "blend": None},
           "steps": 16, "mask_interval": 4, "lr": {"peak": 3e-3, "min": 3e-4, "warmup": 2},
           "srste": {"lam": 2e-4, "t_inc": 8}, "eval": {"every": 8, "windows": 4}, "slorb": {"group": 16},
           "activation_checkpointing": True}
    cfg.update(over)
    path = d / f"run-{len(over)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_two_rank_ast_run_learns_keeps_2of4_and_saves(run_dir):
    _train(_config(run_dir))
    out = run_dir / "out"
    summary = json.loads((out / "summary.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert summary["steps"] == 16 and summary["tokens"] == 16 * 2 * 2 * 2 * 64 and summary["sparse_linears"] == 14
    first, last = sum(r["loss"] for r in log[:4]) / 4, sum(r["loss"] for r in log[-4:]) / 4
    assert last < first  # it learns on real text
    assert {"loss_task", "loss_kl", "lr", "lambda", "tokens_per_s", "max_rss_gib"} <= set(log[0])
    assert log[0]["lambda"] == pytest.approx(2e-4 / 8) and log[-1]["lambda"] == pytest.approx(2e-4)
    assert "flip_rate_prev" in log[3] and "flip_rate_init" in log[3] and log[3]["sparsity"] == 0.5
    assert summary["slorb_params"] == 2 * (64 * 64 // 16 * 2 + 32 * 64 // 16 * 2 + 128 * 64 // 16 * 2 + 64 * 128 // 16)
    assert summary["ppl_after"]["github"]["ppl"] < summary["ppl_before"]["github"]["ppl"]
    assert Path(summary["checkpoint"]).is_dir()
    assert "val" in log[7] and "val" not in log[6]  # eval every 8 steps
    assert summary["teacher_unchanged"] is True


def _train(cfg: Path) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "megatron_ast.cli", "train", "--config", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _consolidated(summary: dict) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = Path(summary["checkpoint"])
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


@pytest.mark.slow
def test_gmp_ramps_sparsity_to_exact_2of4(run_dir):
    out = run_dir / "out_gmp"
    _train(_config(run_dir, method="gmp", output_dir=str(out), steps=8, mask_interval=2, gmp={"start": 0, "end": 6},
                   slorb=None, eval={"every": 0, "windows": 2}))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    ramp = [r["sparsity"] for r in log if "sparsity" in r]
    # cubic ramp at steps 2, 4, 6, 8 of 6: 0.5 * (1 - (1 - t/6)^3)
    assert ramp[0] == pytest.approx(0.5 * (1 - (2 / 3) ** 3), abs=0.03)
    assert ramp[1] == pytest.approx(0.5 * (1 - (1 / 3) ** 3), abs=0.03)
    assert ramp[2:] == [0.5, 0.5]
    assert "loss_kl" not in log[0] or log[0]["loss_kl"] == 0  # a baseline: task loss only
    from megatron_ast.sparsity import nm_violations

    state = _consolidated(json.loads((out / "summary.json").read_text()))
    for name, mask in state.items():
        if name.endswith(".mask"):
            assert nm_violations(state[name[: -len("mask")] + "weight"] * mask, 2, 4) == 0, name


@pytest.mark.slow
def test_wanda_init_masks_match_a_direct_computation(run_dir):
    from megatron_ast.data.sampler import BlendedSampler
    from megatron_ast.data.tokenizer import Tokenizer
    from megatron_ast.sparsity import nm_mask

    out = run_dir / "out_wanda"
    _train(_config(run_dir, method="naive", init="wanda", init_calib_samples=6, output_dir=str(out), steps=1,
                   slorb=None, eval={"every": 0, "windows": 2}))
    # the same 6 calibration sequences (sampler seed + 1) through the plain dense model
    calib = BlendedSampler([str(run_dir / "shards")], 64, 1234 + 1, None,
                           Tokenizer.load(run_dir / "dense").identity).next_batch(6)
    model = LlamaForCausalLM.from_pretrained(run_dir / "dense")
    sq, hooks = {}, []
    for name, mod in model.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def rec(m, a, name=f"model.layers.{name}"):
                sq[name] = sq.get(name, 0) + (a[0].reshape(-1, a[0].shape[-1]) ** 2).sum(0)
            hooks.append(mod.register_forward_pre_hook(rec))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(calib))
    state = _consolidated(json.loads((out / "summary.json").read_text()))
    assert len(sq) == 14
    for name, s in sq.items():
        expected = nm_mask(model.get_submodule(name).weight.abs() * s.sqrt(), 2, 4)
        got = state[f"{name}.mask"].bool()
        assert (got != expected).float().mean() < 1e-3, name  # equal up to float ties
        assert not torch.equal(got, nm_mask(model.get_submodule(name).weight.abs(), 2, 4)), name  # not magnitude


@pytest.mark.parametrize("change,match", [
    ({"method": "sgd"}, "choose ast, naive, gmp, dense"),
    ({"method": "gmp", "gmp": {"start": 5, "end": 3}}, "gmp needs 0 <= start < end <= steps"),
    ({"method": "gmp", "init": "wanda"}, "method gmp starts from the dense model"),
    ({"pattern": "unstructured"}, "N:M patterns"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"bogus": 1}, "unknown key"),
    ({"init": "/nonexistent"}, "neither 'magnitude', 'wanda' nor a pruned model dir"),
])
def test_bad_configs_fail_at_load(run_dir, change, match, capsys):
    assert main(["train", "--config", str(_config(run_dir, **change))]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("ds,match", [
    ({"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
      "zero_optimization": {"stage": 3}}, "train_batch_size 7 != micro batch 2"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}, "set zero_optimization.stage to 3"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}},
     "has a 'optimizer' section"),
])
def test_inconsistent_deepspeed_configs(tmp_path, ds, match):
    from megatron_ast.errors import UsageError
    from megatron_ast.training.config import load_ds_config

    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    with pytest.raises(UsageError, match=match):
        load_ds_config(p, world_size=1)

"""`megatron-ast train` end to end: 2 ranks, ZeRO-3 student and teacher, CPU, gloo, real text."""
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from megatron_ast.cli import main
from tests.training.conftest import ckpt_masks, config_file, consolidated, train


@pytest.mark.slow
def test_two_rank_ast_run_learns_keeps_2of4_and_saves(run_dir):
    train(config_file(run_dir))
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


@pytest.mark.slow
def test_gmp_ramps_sparsity_to_exact_2of4(run_dir):
    out = run_dir / "out_gmp"
    train(config_file(run_dir, method="gmp", output_dir=str(out), steps=8, mask_interval=2, gmp={"start": 0, "end": 6},
                   slorb=None, eval={"every": 0, "windows": 2}))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    ramp = [r["sparsity"] for r in log if "sparsity" in r]
    # cubic ramp at steps 2, 4, 6, 8 of 6: 0.5 * (1 - (1 - t/6)^3)
    assert ramp[0] == pytest.approx(0.5 * (1 - (2 / 3) ** 3), abs=0.03)
    assert ramp[1] == pytest.approx(0.5 * (1 - (1 / 3) ** 3), abs=0.03)
    assert ramp[2:] == [0.5, 0.5]
    assert "loss_kl" not in log[0] or log[0]["loss_kl"] == 0  # a baseline: task loss only
    from megatron_ast.sparsity import nm_violations

    ckpt = json.loads((out / "summary.json").read_text())["checkpoint"]
    state, masks = consolidated(ckpt), ckpt_masks(ckpt)
    assert len(masks) == 14
    for name, mask in masks.items():
        assert nm_violations(state[f"{name}.weight"] * mask, 2, 4) == 0, name


@pytest.mark.slow
def test_wanda_init_masks_match_a_direct_computation(run_dir):
    from megatron_ast.data.sampler import BlendedSampler
    from megatron_ast.data.tokenizer import Tokenizer
    from megatron_ast.sparsity import nm_mask

    out = run_dir / "out_wanda"
    train(config_file(run_dir, method="naive", init="wanda", init_calib_samples=6, output_dir=str(out), steps=1,
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
    masks = ckpt_masks(json.loads((out / "summary.json").read_text())["checkpoint"])
    assert len(sq) == 14
    for name, s in sq.items():
        expected = nm_mask(model.get_submodule(name).weight.abs() * s.sqrt(), 2, 4)
        got = masks[name]
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
    assert main(["train", "--config", str(config_file(run_dir, **change))]) == 2
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

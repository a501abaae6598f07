"""The bf16 path every GPU run takes (bf16 working weights, fp32 master), on CPU ranks: the ZeRO-3 step against
one process, then the trainer end to end (teacher, SIGKILL and resume, elastic resume, export).

DeepSpeed's ZeRO-3 in bf16: each rank's forward/backward in bf16, the bf16 gradients divided by the world size
and summed across ranks in bf16 (one rounding: the sum of two bf16 values is exact in fp32, then rounded),
cast to fp32 and handed to our optimizer with the fp32 master partitions; the working partitions are then
bf16(master) * M. The single-process reference below does each of those operations in the same order and
the same dtypes, one thread like the ranks, so the bound we hold it to is zero: bit for bit.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from megatron_ast.sparsity import nm_mask, nm_violations
from megatron_ast.sparsity.sparse_linear import sparse_linears, sparsify_
from megatron_ast.training.sr_ste import SRSTEAdamW
from tests.training.conftest import REPO, TRAIN_ENV, ckpt_masks, consolidated, run_zero3_worker, train
from tests.training.test_checkpoint import STEPS, _cfg, elastic_resume, kill_then_resume
from tests.training.test_zero3 import SPEC as FP32_SPEC

pytestmark = pytest.mark.slow
WORLD = 2
SPEC = {**FP32_SPEC, "dtype": "bfloat16"}  # the fp32 equivalence test's steps and optimizer, in bf16


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return run_zero3_worker(tmp_path_factory.mktemp("bf16"), config, WORLD, SPEC)


def _reference(model_dir: Path, run_masks: dict) -> tuple[dict, dict]:
    """(fp32 masters, bf16 working weights) after the run's steps, in one process. At each recompute the
    masks are computed from the fp32 master and must equal the run's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run one thread each: the same reduction order inside every matmul
    try:
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        masks = {f"{n}.weight": nm_mask(m.weight.detach().float().abs(), 2, 4)
                 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
        sparsify_(model, masks)
        master = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = SRSTEAdamW(list(master.values()), **SPEC["opt"])
        lin = sparse_linears(model)
        for name, mod in lin.items():
            opt.set_pruned(master[f"{name}.weight"], 1 - mod.mask.float())
        mb = SPEC["micro"]
        for step in range(1, SPEC["steps"] + 1):
            batch = torch.load(model_dir / f"batch{step}.pt", weights_only=True)
            summed: dict[str, torch.Tensor] = {}
            for r in range(WORLD):  # rank r's micro-batch; its bf16 gradient / world, summed in bf16
                x = batch[r * mb : (r + 1) * mb]
                model.zero_grad(set_to_none=True)
                model(input_ids=x, labels=x).loss.backward()
                for n in master:
                    g = model.get_parameter(n).grad / WORLD
                    summed[n] = g if n not in summed else summed[n] + g
            for n, p in master.items():
                p.grad = summed[n].float()
            opt.step()
            with torch.no_grad():
                for n, p in master.items():
                    model.get_parameter(n).copy_(p)  # bf16(master); the SparseLinears multiply by M
                if step % SPEC["interval"] == 0:
                    for name, mod in lin.items():
                        ours = nm_mask(master[f"{name}.weight"].abs(), 2, 4)
                        assert torch.equal(ours, run_masks[f"step{step}/{name}"].bool()), (step, name)
                        mod.mask.copy_(ours)
                        opt.set_pruned(master[f"{name}.weight"], (~ours).float())
        working = {n: (p.detach() * lin[n.removesuffix(".weight")].mask if n.removesuffix(".weight") in lin
                       else p.detach()) for n, p in model.named_parameters()}
        return master, working
    finally:
        torch.set_num_threads(threads)


def test_two_ranks_equal_the_single_process_bf16_reference_bit_for_bit(bf16_run):
    d, got, info = bf16_run
    assert info["working_dtype"] == "torch.bfloat16" and info["optimizer_dtypes"] == ["torch.float32"]
    master, working = _reference(d / "model", {k: v for k, v in got.items() if k.startswith("step")})
    for name, p in master.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], p), (name, (got[name] - p).abs().max())
        assert got[f"working/{name}"].dtype == torch.bfloat16 and torch.equal(got[f"working/{name}"], working[name]), name


def test_after_every_step_working_is_bf16_master_times_mask_and_the_master_stays_dense(bf16_run):
    _, got, info = bf16_run
    assert len(info["checks"]) == SPEC["steps"]
    assert all(c == {"working_is_master_times_mask": True, "master_dense": True} for c in info["checks"])
    for name in (n for n in got if n.endswith(".mask") and not n.startswith("step")):  # and gathered, at the end
        weight = name.replace(".mask", ".weight")
        mask = got[name]
        assert torch.equal(got[f"working/{weight}"], got[weight].bfloat16() * mask), name
        assert (got[weight][~mask] != 0).all(), name


def test_sr_ste_decays_the_fp32_master(bf16_run):
    """The tensors SRSTEAdamW steps are DeepSpeed's fp32 master partitions themselves, and what they hold is
    not bf16-representable: updates (the decay among them) accumulate in fp32, never in a bf16 copy."""
    _, got, info = bf16_run
    assert info["optimizer_steps_fp32_masters"] and info["optimizer_dtypes"] == ["torch.float32"]
    for name in (n for n in got if n.endswith(".mask") and not n.startswith("step")):
        master = got[name.replace(".mask", ".weight")]
        pruned = master[~got[name]]
        assert (pruned.bfloat16().float() != pruned).float().mean() > 0.9, name


def test_mask_recompute_reads_the_fp32_master(bf16_run):
    """At every recompute the masks are the 2:4 of |fp32 master| (the reference checks this step by step too);
    from the bf16 working copy they would differ in groups whose values round together."""
    _, got, _ = bf16_run
    differs = 0
    for key in (k for k in got if k.startswith("step") and "/master/" in k):
        step, name = key.split("/master/")
        master, mask = got[key], got[f"{step}/{name}"].bool()
        assert torch.equal(mask, nm_mask(master.abs(), 2, 4)), key
        differs += int((nm_mask(master.bfloat16().float().abs(), 2, 4) != mask).sum())
    assert differs > 0  # so the check above can tell the two apart


# --- the trainer, end to end, on the GPU runs' precision (ds config with "bf16": {"enabled": true}) ---------------
def _bf16(run_dir) -> dict:
    return {"deepspeed": str(run_dir / "ds_bf16.json")}


@pytest.fixture(scope="module")
def bf16_trained(run_dir):
    """An uninterrupted bf16 AST run with SLoRB and a teacher (the reference of the resume test)."""
    train(_cfg(run_dir, "bf16-ref", **_bf16(run_dir)))
    return run_dir / "bf16-ref"


def test_the_teacher_runs_in_bf16_and_stays_bit_identical(bf16_trained):
    summary = json.loads((bf16_trained / "summary.json").read_text())
    assert summary["dtypes"] == {"student_working": "bfloat16", "student_master": "float32", "teacher": "bfloat16"}
    assert summary["teacher_unchanged"] is True and summary["steps"] == STEPS


def test_sigkill_then_resume_auto_is_bit_identical_in_bf16(run_dir, bf16_trained):
    kill_then_resume(run_dir, bf16_trained, "bf16-killed", **_bf16(run_dir))


def test_elastic_resume_2_to_1_keeps_the_masks_in_bf16(run_dir):
    elastic_resume(run_dir, "bf16-elastic2to1", 2, 1, **_bf16(run_dir))


def test_export_bfloat16_of_a_bf16_run_loads_in_plain_transformers_exact_2of4(run_dir, bf16_trained, tmp_path):
    ckpt = bf16_trained / "checkpoints" / f"step{STEPS}"
    proc = subprocess.run([sys.executable, "-m", "megatron_ast.cli", "export", str(ckpt), "--out", str(tmp_path / "hf"),
                           "--dtype", "bfloat16"], capture_output=True, text=True, timeout=600, env=TRAIN_ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)  # transformers alone
    master, masks = consolidated(ckpt), ckpt_masks(ckpt)
    assert len(masks) == 14
    for name, mask in masks.items():
        w = model.get_parameter(f"{name}.weight")
        assert w.dtype == torch.bfloat16 and nm_violations(w, 2, 4) == 0, name
        assert torch.equal(w, master[f"{name}.weight"].bfloat16() * mask), name  # what the run's forward used
    x = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    assert torch.isfinite(model(input_ids=x).logits).all()


@pytest.mark.assets
def test_a_bf16_ast_step_on_smollm2_135m(reference_assets, tmp_path):
    """The integration case: the real model, bf16 ZeRO-3 on 2 CPU ranks, teacher and SLoRB, one AST step."""
    import yaml

    from data_tools.preprocess import preprocess

    preprocess([reference_assets["corpus"]["github"]["validation"]], tmp_path / "shards", reference_assets["tokenizer"])
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                                                  "bf16": {"enabled": True}, "zero_optimization": {"stage": 3},
                                                  "steps_per_print": 10**9}))
    cfg = {"model": reference_assets["model"], "deepspeed": str(tmp_path / "ds.json"), "output_dir": str(tmp_path / "out"),
           "data": {"train": [str(tmp_path / "shards")], "seq_len": 32}, "steps": 1, "mask_interval": 1,
           "slorb": {"group": 16}, "eval": {"every": 0, "windows": 0}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    train(tmp_path / "run.yaml")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dtypes"] == {"student_working": "bfloat16", "student_master": "float32", "teacher": "bfloat16"}
    assert summary["teacher_unchanged"] is True and summary["sparse_linears"] == 30 * 7
    assert summary["steps"] == 1 and 0 < summary["final_loss"] < 20
    masks = ckpt_masks(tmp_path / "out" / "checkpoints" / "step1")
    assert len(masks) == 210 and all(m.reshape(-1, 4).sum(-1).eq(2).all() for m in masks.values())

"""`megatron-ast train` end to end: 2 ranks, ZeRO-3 student and teacher, CPU, gloo, real text."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from megatron_ast.cli import main
from tests.training.conftest import TRAIN_ENV, ckpt_masks, config_file, consolidated, train, train_cmd


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
    verified = json.loads((out / "verified_shards.json").read_text())  # read whole once, before step 1
    assert sorted(Path(k).name for k in verified) == ["book__train.bin", "github__train.bin"]


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
    ({"steps": "ten"}, "steps must be an integer, got 'ten' (str)"),
    ({"steps": 2.7}, "steps must be an integer, got 2.7 (float)"),
    ({"lr": {"peak": "fast"}}, "lr.peak must be a number, got 'fast' (str)"),
    ({"data": {"train": "/path", "seq_len": 64}}, "data.train must be a list of strings, got '/path' (str)"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas must be 2 numbers, got [0.9]"),
    ({"teacher": {"zero": "sometimes"}}, "teacher.zero must be true, false or auto"),
    ({"bogus": 1}, "unknown key"),
    ({"init": "/nonexistent"}, "neither 'magnitude', 'wanda' nor a pruned model dir"),
    ({"slorb": {"group": 16, "init": "fitted"}}, "slorb init fitted takes S from init's adapter"),
    ({"optimizer": {"second_moment": "adam"}}, "optimizer.second_moment must be update or gradient"),
    ({"output_dir": "ds.json"}, "is a file: give a directory"),  # before: FileExistsError under the launcher
])
def test_bad_configs_fail_at_load(run_dir, change, match, capsys):
    if change.get("output_dir") == "ds.json":
        change = {"output_dir": str(run_dir / "ds.json")}
    assert main(["train", "--config", str(config_file(run_dir, **change))]) == 2
    assert match in capsys.readouterr().err


def test_deepspeed_reads_these_as_meant_and_so_do_we(tmp_path):
    """No stricter than DeepSpeed: 0/1 for its switches, 1e9 for its ints, 'auto' where it drops it, keys at the
    wrong level that it ignores; DeepSpeed's ZeRO-3 example from its docs as written."""
    from megatron_ast.training.config import load_ds_config

    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1, "wall_clock_breakdown": 0, "steps_per_print": 2000,
          "prescale_gradients": 1, "enabled": "x", "bf16": {"enabled": True},
          "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                                "reduce_bucket_size": "auto", "stage3_max_live_parameters": 1e9,
                                "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
          "flops_profiler": {"enabled": False}, "comms_logger": {"enabled": False}}
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    assert load_ds_config(p, world_size=8)["train_batch_size"] == 16


@pytest.mark.parametrize("ds,match", [
    ({"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
      "zero_optimization": {"stage": 3}}, "train_batch_size 7 != micro batch 2"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}, "set zero_optimization.stage to 3"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}},
     "has a 'optimizer' section"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "fp16": {"enabled": True}},
     "enables fp16: AST runs in bf16"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
      "torch_autocast": {"enabled": True, "dtype": "torch.float16"}}, "enables torch_autocast"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu",
      "ratio": 0.5}}}, "offload_optimizer.ratio 0.5"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
     "offload_param to nvme is untested"),
    ({"train_micro_batch_size_per_gpu": "2", "zero_optimization": {"stage": 3}},
     "train_micro_batch_size_per_gpu must be a positive integer, got '2'"),
    ({"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": "yes"}, "zero_optimization": {"stage": 3}},
     "bf16.enabled must be true or false"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}},
     r"ZeRO\+\+ hpZ"),
    # DeepSpeed's own parse, at load (before: its traceback once the models had loaded, or nothing at all)
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "reduce_bucket_size": "big"}},
     r"zero_optimization.reduce_bucket_size: Input should be a valid integer.*\(DeepSpeed's DeepSpeedZeroConfig\), got 'big'"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sizee": 5}},
     r"zero_optimization.stage3_prefetch_bucket_sizee \(misspelt\?\): Extra inputs are not permitted"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "gpu"}}},
     r"zero_optimization.offload_optimizer.device: Input should be 'none', 'cpu' or 'nvme'"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True,
      "immediate_grad_update": "x"}}, r"bf16.immediate_grad_update: Input should be a valid boolean"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "wall_clock_breakdown": "x"},
     r"wall_clock_breakdown must be true or false, got 'x' \(str\)"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "wall_clock_breakdown": None},
     r"wall_clock_breakdown must be true or false, got None"),  # DeepSpeed: None | bool, a TypeError
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "gradient_predivide_factor": "2"},
     r"gradient_predivide_factor must be a number, got '2'"),
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
      "comms_logger": {"enabled": "maybe"}}, r"comms_logger.enabled: Input should be a valid boolean"),  # not bf16's
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "amp": {"enabled": True}},
     r"DeepSpeed cannot read it: NVIDIA Apex AMP integration has been removed"),  # its DeepSpeedConfigError
])
def test_inconsistent_deepspeed_configs(tmp_path, ds, match):
    from megatron_ast.errors import UsageError
    from megatron_ast.training.config import load_ds_config

    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ds))
    with pytest.raises(UsageError, match=match):
        load_ds_config(p, world_size=1)


@pytest.fixture(scope="module")
def pruned(run_dir):
    """The tiny dense model pruned to 2:4 by SparseGPT (its kept weights are reconstructed, not dense)."""
    out = run_dir / "pruned-sparsegpt"
    assert main(["prune", "--model", str(run_dir / "dense"), "--method", "sparsegpt", "--pattern", "2:4",
                 "--calib", str(run_dir / "shards"), "--nsamples", "8", "--seqlen", "64", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("values", ["dense", "zero"])
def test_a_pruned_init_keeps_the_dense_values_under_its_masks(run_dir, pruned, values, tmp_path, monkeypatch):
    """lr 0: the checkpoint holds the student as it started. Paths relative to the launch dir; export elsewhere."""
    from safetensors.torch import load_file

    from megatron_ast.eval.perplexity import perplexity, token_windows
    from megatron_ast.modeling import load_causal_lm

    out = run_dir / f"out_pruned_{values}"
    cfg = config_file(run_dir, init=pruned.name, pruned_values=values, output_dir=out.name, steps=1, lr={"peak": 0.0, "min": 0.0,
                      "warmup": 0}, slorb={"group": 16, "init": "zero"} if values == "dense" else None,
                      eval={"every": 0, "windows": 4})
    proc = subprocess.run(train_cmd(cfg), capture_output=True, text=True, timeout=900, env=TRAIN_ENV, cwd=run_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    state, masks = consolidated(summary["checkpoint"]), ckpt_masks(summary["checkpoint"])
    dense, oneshot = load_file(str(run_dir / "dense" / "model.safetensors")), load_file(str(pruned / "model.safetensors"))
    assert len(masks) == 14
    # each rank read only the rows of masks.safetensors (and of the dense values) that its partitions overlap
    whole = sum(m.numel() * (1 + 4 * (values == "dense")) for m in masks.values())
    reads = summary["startup_read_bytes_per_rank"]
    assert len(reads) == 2 and sum(reads) >= whole and max(reads) < 0.6 * whole, (reads, whole)
    for name, mask in masks.items():
        w = state[f"{name}.weight"]
        assert torch.equal(w[mask], oneshot[f"{name}.weight"][mask]), name  # kept: the pruner's reconstruction
        assert torch.equal(w[~mask], dense[f"{name}.weight"][~mask] if values == "dense" else torch.zeros_like(w[~mask]))
    # the forward is the one-shot model's (SLoRB, with values dense, starts at 0 with init zero)
    assert all(torch.count_nonzero(v) == 0 for k, v in state.items() if k.endswith(".slorb.S"))
    windows = token_windows([str(run_dir / "val_shards")], run_dir / "dense", 64, 4)
    direct = perplexity(load_causal_lm(pruned), windows)
    assert summary["ppl_before"]["all"]["ppl"] == pytest.approx(direct["all"]["ppl"], rel=1e-5)
    run = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())["config"]
    assert run["init"] == str(pruned) and run["output_dir"] == str(out)  # stored absolute
    monkeypatch.chdir(tmp_path)  # export from another working directory, as on a cluster
    assert main(["export", summary["checkpoint"], "--out", "hf"]) == 0 and (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_slorb_fitted_init_starts_from_the_pruned_dirs_adapter(run_dir):
    """prune --slorb-group + slorb.init fitted (lr 0): S is the adapter's, and the student's forward is the
    pruned dir's base + adapter, as eval loads it."""
    from megatron_ast.eval.perplexity import perplexity, token_windows
    from megatron_ast.modeling import load_causal_lm
    from megatron_ast.sparsity.slorb_adapter import adapter_dir, read

    pruned = run_dir / "pruned-fitted"
    assert main(["prune", "--model", str(run_dir / "dense"), "--method", "sparsegpt", "--pattern", "2:4", "--calib",
                 str(run_dir / "shards"), "--nsamples", "8", "--seqlen", "64", "--slorb-group", "16",
                 "--out", str(pruned)]) == 0
    out = run_dir / "out_fitted"
    train(config_file(run_dir, init=str(pruned), output_dir=str(out), steps=1, lr={"peak": 0.0, "min": 0.0, "warmup": 0},
                      slorb={"group": 16, "init": "fitted"}, eval={"every": 0, "windows": 4}))
    summary = json.loads((out / "summary.json").read_text())
    state = consolidated(summary["checkpoint"])
    branches = read(adapter_dir(pruned))
    assert len(branches) == 14
    for name, (_, b) in branches.items():
        assert torch.equal(state[f"{name}.slorb.S"], b), name
    windows = token_windows([str(run_dir / "val_shards")], run_dir / "dense", 64, 4)
    with_adapter, base = perplexity(load_causal_lm(pruned), windows), perplexity(load_causal_lm(pruned, adapter=False), windows)
    assert summary["ppl_before"]["all"]["ppl"] == pytest.approx(with_adapter["all"]["ppl"], rel=1e-5)
    assert with_adapter["all"]["ppl"] != pytest.approx(base["all"]["ppl"], rel=1e-5)


@pytest.mark.slow
def test_slorb_mean_init_is_taken_from_the_dense_values(run_dir, pruned):
    out = run_dir / "out_pruned_mean"
    train(config_file(run_dir, init=str(pruned), pruned_values="dense", output_dir=str(out), steps=1,
                      lr={"peak": 0.0, "min": 0.0, "warmup": 0}, slorb={"group": 16, "init": "mean"},
                      eval={"every": 0, "windows": 2}))
    ckpt = json.loads((out / "summary.json").read_text())["checkpoint"]
    state, masks = consolidated(ckpt), ckpt_masks(ckpt)
    dense = LlamaForCausalLM.from_pretrained(run_dir / "dense").state_dict()
    for name, mask in masks.items():
        w = dense[f"{name}.weight"]
        expected = (w * ~mask).reshape(w.shape[0], -1, 16).mean(-1)
        assert torch.allclose(state[f"{name}.slorb.S"], expected, atol=1e-7), name


def test_weight_decay_goes_to_matrices_only():
    from transformers import LlamaConfig

    from megatron_ast.sparsity import nm_mask
    from megatron_ast.sparsity.slorb import SLoRBConfig
    from megatron_ast.sparsity.sparse_linear import sparsify_
    from megatron_ast.training.trainer import param_groups

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True))
    sparsify_(model, {"model.layers.0.mlp.up_proj.weight": nm_mask(model.model.layers[0].mlp.up_proj.weight.abs(), 2, 4)},
              SLoRBConfig(group=8))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, plain = ({names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1))
    assert "model.layers.0.mlp.up_proj.slorb.S" in decay and "model.embed_tokens.weight" in decay
    assert "model.layers.0.self_attn.q_proj.weight" in decay and "model.layers.0.mlp.up_proj.mask" not in decay | plain
    assert plain == {n for n in names.values() if n.endswith((".bias", "norm.weight"))} and len(plain) == 7
    _, plain = ({names[id(p)] for p in g["params"]} for g in param_groups(model, 0.1, slorb_decay=False))
    assert "model.layers.0.mlp.up_proj.slorb.S" in plain


@pytest.mark.slow
def test_a_replica_teacher_without_activation_checkpointing_trains_as_the_defaults(run_dir):
    """teacher.zero false (a whole teacher per rank, no all-gathers) and activation_checkpointing off change where
    memory goes, not the arithmetic: the losses of 2 steps on 2 ranks are the defaults' (ZeRO-3 teacher,
    checkpointed layers)."""
    runs = {}
    for name, over in (("defaults", {}), ("replica", {"teacher": {"zero": False}, "activation_checkpointing": False})):
        out = run_dir / f"out_teacher_{name}"
        train(config_file(run_dir, output_dir=str(out), steps=2, mask_interval=2, slorb=None,
                          eval={"every": 0, "windows": 2}, **over))
        runs[name] = ([json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()],
                      json.loads((out / "summary.json").read_text()))
    (base, s0), (rep, s1) = runs["defaults"], runs["replica"]
    assert s0["teacher"] == "zero3" and s1["teacher"] == "replica" and s1["teacher_unchanged"]
    assert len(base) == 2 and rep == pytest.approx(base, rel=1e-6, abs=0)


@pytest.mark.slow
def test_a_shard_damaged_inside_is_refused_before_the_first_step(run_dir, tmp_path):
    """Before: a flipped byte inside a shard (its size intact) was trained on silently."""
    import shutil

    shutil.copytree(run_dir / "shards", tmp_path / "shards")
    victim = tmp_path / "shards" / "github__train.bin"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01
    victim.write_bytes(bytes(data))
    cfg = config_file(run_dir, output_dir=str(tmp_path / "out"), steps=1,
                      data={"train": [str(tmp_path / "shards")], "validation": [], "seq_len": 64, "blend": None})
    proc = subprocess.run(train_cmd(cfg), capture_output=True, text=True, timeout=600, env=TRAIN_ENV)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("megatron-ast: error: ")]
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    assert lines and all("github__train.bin's sha256 differs from its sidecar's" in x for x in lines), lines
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_every_input_format_trains_and_evaluates(run_dir, tmp_path, capsys):
    """Parquet, Arrow and a Hugging Face dataset dir through preprocess, and shards made as Megatron-LM's own script
    makes them through `inspect --adopt`: one run trains 2 steps on all four (a domain each), then eval ppl scores
    the parquet file itself and its shards alike."""
    from megatron_ast.data.tokenizer import Tokenizer
    from tests.conftest import stdlib_texts
    from tests.data.test_documents import write_formats
    from tests.data_tools.test_shards import megatron_shards

    texts = stdlib_texts(60)[:50]
    paths = write_formats(tmp_path / "in", texts)
    dirs = []
    for kind in ("parquet", "arrow", "hf"):
        dirs.append(str(tmp_path / f"shards_{kind}"))
        assert main(["preprocess", "--input", str(paths[kind]), "--output-dir", dirs[-1], "--tokenizer",
                     str(run_dir / "dense"), "--domain", kind, "--workers", "2"]) == 0
    tok = Tokenizer.load(run_dir / "dense")
    megatron_shards(tmp_path / "mega", "megatron", tok.encode_batch(texts), tok.identity.eod_id)
    dirs.append(str(tmp_path / "mega"))
    (tmp_path / "blend.json").write_text(json.dumps({"parquet": 1, "arrow": 1, "hf": 1, "megatron": 1}))
    cfg = config_file(run_dir, steps=2, output_dir=str(tmp_path / "out"), eval={"every": 0, "windows": 2},
                      data={"train": dirs, "validation": [dirs[0]], "seq_len": 64, "blend": str(tmp_path / "blend.json")})
    proc = subprocess.run(train_cmd(cfg), capture_output=True, text=True, timeout=900, env=TRAIN_ENV)
    hint = [line for line in proc.stderr.splitlines() if line.startswith("megatron-ast: error:")]
    assert proc.returncode != 0 and hint and "no manifest.json (made by Megatron-LM?): run `megatron-ast inspect " \
        "--adopt" in hint[0], proc.stderr[-3000:]  # one line says how (torchrun then prints its own traceback)
    assert main(["inspect", dirs[-1], "--adopt", "--tokenizer", str(run_dir / "dense")]) == 0
    train(cfg)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2
    verified = json.loads((tmp_path / "out" / "verified_shards.json").read_text())
    assert sorted(Path(k).name for k in verified) == [  # save_to_disk's two files, the dataset dir's three
        "arrow__data-00000-of-00002.bin", "arrow__data-00001-of-00002.bin", "hf__train-00000.bin", "hf__train-00001.bin",
        "hf__validation.bin",
        "megatron_text_document.bin", "parquet__docs.bin"]
    capsys.readouterr()
    scores = []
    for data in (str(paths["parquet"]), dirs[0]):
        assert main(["eval", "ppl", "--model", str(run_dir / "dense"), "--data", data, "--seq-len", "64",
                     "--max-windows", "4"]) == 0
        scores.append(json.loads(capsys.readouterr().out)["perplexity"])
    assert scores[0]["parquet"] == scores[1]["parquet"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MEGATRON_LM"), reason="needs a NVIDIA/Megatron-LM checkout in MEGATRON_LM (CI "
                    "has no network); tests/data_tools/test_shards.py adopts shards of megatron-core's own writer")
def test_shards_of_megatron_lms_own_script_are_adopted_trained_on_and_evaluated(run_dir, tmp_path, capsys):
    """tools/preprocess_data.py of a fetched Megatron-LM (through bench/preprocess.py's runner), then `inspect
    --adopt`, 2 training steps on the adopted dir, and eval ppl: the same figure as on the jsonl it came from."""
    from tests.bench.scripts import load
    from tests.conftest import stdlib_texts, write_jsonl

    src = write_jsonl(tmp_path / "in" / "x.jsonl", stdlib_texts(60)[:50])
    out = tmp_path / "mega"
    out.mkdir()
    load("preprocess").run_megatron(Path(os.environ["MEGATRON_LM"]).resolve(), src, out, str(run_dir / "dense"), 2,
                                    tmp_path / "megatron.log")
    assert main(["inspect", str(out), "--adopt", "--tokenizer", str(run_dir / "dense")]) == 0
    (tmp_path / "blend.json").write_text(json.dumps({"megatron": 1}))
    cfg = config_file(run_dir, steps=2, output_dir=str(tmp_path / "run"), eval={"every": 0, "windows": 2},
                      data={"train": [str(out)], "validation": [str(out)], "seq_len": 64, "blend": str(tmp_path / "blend.json")})
    train(cfg)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    capsys.readouterr()
    scores = []
    for data in (str(out), str(src)):
        assert main(["eval", "ppl", "--model", str(run_dir / "dense"), "--data", data, "--seq-len", "64",
                     "--max-windows", "4"]) == 0
        scores.append(json.loads(capsys.readouterr().out)["perplexity"]["all"])
    assert scores[0] == scores[1]

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from megatron_ast.cli import main
from megatron_ast.sparsity import nm_violations


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_prune_cli_writes_a_loadable_model_masks_and_report(model_dir, calib_file, tmp_path, method, capsys):
    out = tmp_path / "pruned"
    calib = ["--calib", str(calib_file), "--nsamples", "8", "--seqlen", "64"] if method != "magnitude" else []
    rc = main(["prune", "--model", str(model_dir), "--method", method, "--pattern", "2:4", *calib, "--out", str(out)])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["all_valid"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    masks = load_file(str(out / "masks.safetensors"))
    assert len(masks) == 14
    for name, mask in masks.items():
        w = model.get_parameter(name)
        assert nm_violations(w, 2, 4) == 0 and bool(((w != 0) <= mask).all()) and mask.dtype == torch.bool
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["method"] == method and report["pattern"] == "2:4" and report["sparsity"] == pytest.approx(0.5)
    assert {"name", "shape", "sparsity", "pattern_valid", "reconstruction_error"} <= set(report["layers"][0])
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("args,match", [
    (["--pattern", "3:2"], "0 < N < M"),
    (["--pattern", "0:4"], "0 < N < M"),
    (["--pattern", "unstructured", "--sparsity", "1.5"], "between 0 and 1"),
    (["--nsamples", "1000"], "fewer than --nsamples 1000"),
    (["--method", "wanda", "--no-calib"], "needs calibration data"),
    # before: calibration flags that magnitude ignores were accepted silently
    (["--method", "magnitude", "--nsamples", "100000"], "--calib, --nsamples, --seqlen mean nothing to --method magnitude"),
    (["--method", "wanda", "--sparsellm-rounds", "2"], "--sparsellm-rounds means nothing to --method wanda"),
])
def test_bad_input_exits_2_and_leaves_no_output(model_dir, calib_file, tmp_path, capsys, args, match):
    out = tmp_path / "new" / "pruned"  # nor the parent it had to make (before: an empty dir stayed)
    base = ["prune", "--model", str(model_dir), "--method", "sparsegpt", "--seqlen", "64", "--out", str(out)]
    if "--no-calib" not in args:
        base += ["--calib", str(calib_file)]
    rc = main(base + [a for a in args if a != "--no-calib"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and match in err[0], err
    assert not (tmp_path / "new").exists()


def test_model_dir_without_weights_or_unknown_architecture(tmp_path, model_dir, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((model_dir / "config.json").read_text())
    assert main(["prune", "--model", str(tmp_path / "empty"), "--method", "magnitude", "--out", str(tmp_path / "o")]) == 2
    assert "no weights" in capsys.readouterr().err
    from transformers import AutoConfig, AutoModelForCausalLM

    # JetMoE's experts are a 3-D parameter of a module that states no layout: which axis is the input's is unknown
    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "jetmoe", vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        kv_channels=8, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)).save_pretrained(tmp_path / "jet")
    assert main(["prune", "--model", str(tmp_path / "jet"), "--method", "magnitude", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.layers.0.mlp.input_linear.weight: a 3-axis parameter (4, 128, 32) of JetMoeParallelExperts" in err
    assert "--ignore" in err and not (tmp_path / "o").exists()
    assert main(["prune", "--model", str(tmp_path / "jet"), "--method", "magnitude", "--ignore", r"\.(input|output)_linear\.",
                 "--out", str(tmp_path / "o")]) == 0  # left dense, the rest pruned
    report = json.loads((tmp_path / "o" / "sparsity_report.json").read_text())
    assert set(report["by_kind"]) == {"attention"} and report["all_valid"]


@pytest.mark.parametrize("method", ["sparsegpt", "sparsellm"])
def test_slorb_group_writes_a_fitted_adapter_that_restores_the_calibration_outputs(model_dir, calib_file, tmp_path,
                                                                                    method):
    """--slorb-group: base weights exactly as without it (2:4), plus slorb_adapter/ whose branches lower every
    Linear's reconstruction error on the calibration inputs; the dir loads as base + adapter."""
    from megatron_ast.modeling import load_causal_lm
    from megatron_ast.sparsity.slorb_adapter import adapter_dir, read

    args = ["prune", "--model", str(model_dir), "--method", method, "--pattern", "2:4", "--calib", str(calib_file),
            "--nsamples", "8", "--seqlen", "64"]
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert main(args + ["--out", str(tmp_path / "fitted"), "--slorb-group", "16"]) == 0
    plain, fitted = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "fitted" / "model.safetensors"))
    report = json.loads((tmp_path / "fitted" / "sparsity_report.json").read_text())
    assert report["all_valid"] and report["slorb"]["group"] == 16 and report["slorb"]["branches"] == 14
    ratios = [r["slorb_residual_ratio"] for r in report["layers"]]
    assert len(ratios) == 14 and max(ratios) < 1.0  # no worse than no branch, per Linear, on the inputs it saw
    layer0 = [k for k in plain if ".layers.0." in k]  # the first layer sees the same inputs with or without branches
    assert layer0 and all(torch.equal(plain[k], fitted[k]) for k in layer0)
    branches = read(adapter_dir(tmp_path / "fitted"))
    assert len(branches) == 14 and all(b.abs().sum() > 0 for _, b in branches.values())
    assert adapter_dir(tmp_path / "plain") is None
    x = torch.randint(0, 600, (2, 32))
    with torch.no_grad():
        base = load_causal_lm(tmp_path / "fitted", adapter=False)(x).logits
        both = load_causal_lm(tmp_path / "fitted")(x).logits
    assert not torch.allclose(base, both)
    for name, w in fitted.items():
        if name.endswith("proj.weight"):
            assert nm_violations(w, 2, 4) == 0


def test_slorb_group_needs_calibration_and_a_group_that_divides(model_dir, calib_file, tmp_path, capsys):
    base = ["prune", "--model", str(model_dir), "--pattern", "2:4", "--calib", str(calib_file), "--seqlen", "64",
            "--nsamples", "8", "--out", str(tmp_path / "o")]
    assert main(base + ["--method", "magnitude", "--slorb-group", "16"]) == 2
    assert "--slorb-group fits the branch on calibration inputs" in capsys.readouterr().err
    assert main(base + ["--method", "sparsegpt", "--slorb-group", "48"]) == 2
    assert "not a multiple of --slorb-group 48" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,extra", [("sparsegpt", []), ("sparsellm", ["--prune-head"])])
def test_layer_at_a_time_pruning_is_the_whole_model_pruning_in_the_source_dtype(model_dir, calib_file, tmp_path,
                                                                                dtype, method, extra):
    """The dir is read one layer at a time and written sharded like the source, in its dtype. Every statistic and
    solve runs in fp32 as when the whole model is loaded in fp32, so the masks are identical and the weights
    are the whole-model pruning's cast to the source dtype: the tolerance is zero after that one rounding."""
    from megatron_ast.modeling import load_causal_lm
    from megatron_ast.pruning.calibration import calibration_samples
    from megatron_ast.pruning.pipeline import PruneConfig, prune_model
    from megatron_ast.sparsity import SparsityPattern

    src = tmp_path / "src"
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).save_pretrained(src, max_shard_size="150KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).write_bytes((model_dir / f).read_bytes())
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(src), "--method", method, "--pattern", "2:4", "--calib", str(calib_file),
                 "--nsamples", "8", "--seqlen", "64", "--out", str(out), *extra]) == 0
    whole = load_causal_lm(src)  # fp32, as prune loaded it before
    masks, _ = prune_model(whole, PruneConfig(method, SparsityPattern.parse("2:4"), prune_head=bool(extra)),
                           calibration_samples([str(calib_file)], src, 8, 64, 0))
    assert sorted(p.name for p in out.glob("model*.safetensors")) == sorted(p.name for p in src.glob("model*.safetensors"))
    assert len(list(src.glob("model*.safetensors"))) > 2
    assert (out / "model.safetensors.index.json").read_text() == (src / "model.safetensors.index.json").read_text()
    got = AutoModelForCausalLM.from_pretrained(out)
    assert got.dtype == dtype
    expected = {k: v.to(dtype) for k, v in whole.state_dict().items()}
    assert all(torch.equal(v, expected[k]) for k, v in got.state_dict().items())
    stored = load_file(str(out / "masks.safetensors"))
    assert set(stored) == set(masks) and all(torch.equal(stored[k], masks[k]) for k in masks)


def test_layer_at_a_time_pruning_reads_gpt2_hub_names_and_keeps_stored_buffers(tmp_path, calib_file):
    """GPT-2's hub files name tensors without the `transformer.` prefix and store non-parameter buffers
    (attn.bias): the streamed pruner maps the names, copies what is not a parameter and prunes the rest."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    model = GPT2LMHeadModel(GPT2Config(vocab_size=600, n_embd=64, n_layer=2, n_head=4, n_positions=128))
    model.save_pretrained(src)
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))  # as the hub's gpt2 stores it
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(src), "--method", "magnitude", "--pattern", "2:4", "--out", str(out)]) == 0
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(sd) and torch.equal(got["h.0.attn.bias"], sd["h.0.attn.bias"])
    assert nm_violations(got["h.1.mlp.c_fc.weight"].t(), 2, 4) == 0
    assert torch.equal(got["wte.weight"], sd["wte.weight"])


def test_a_full_disk_is_one_line_exit_2_and_leaves_nothing(model_dir, small_disk, capsys):
    """Before: a SafetensorError ... No space left on device traceback, exit 1."""
    from tests.conftest import assert_full_disk_line

    disk = small_disk(16 * 1024)
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--out", str(disk / "pruned")]) == 2
    assert_full_disk_line(capsys.readouterr().err, disk)

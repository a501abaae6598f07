"""Export round trip: the exported dir, loaded with no project code (plus peft for SLoRB), gives the
trainer's sparse forward."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from megatron_ast.cli import main
from megatron_ast.sparsity import nm_violations
from megatron_ast.sparsity.sparse_linear import sparsify_
from megatron_ast.sparsity.slorb import SLoRBConfig
from tests.training.conftest import ckpt_masks, consolidated


def _sparse_forward(run_dir, ckpt, x, with_slorb: bool, trainable_projection: bool = False) -> torch.Tensor:
    """The trainer's forward (SparseLinear: W*M via the STE, + SLoRB) on the consolidated checkpoint."""
    sd, masks = consolidated(ckpt), ckpt_masks(ckpt)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(run_dir / "dense"))
    sparsify_(model, {f"{k}.weight": v for k, v in masks.items()},
              SLoRBConfig(group=16, trainable_projection=trainable_projection))
    model.load_state_dict({**sd, **{f"{k}.mask": v.float() for k, v in masks.items()}}, strict=True)
    if not with_slorb:
        for name in masks:
            model.get_submodule(name).slorb = None
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.slow
def test_export_round_trip_with_and_without_the_slorb_adapter(run_dir, trained, tmp_path):
    from peft import PeftModel

    out = tmp_path / "hf"
    assert main(["export", str(trained), "--out", str(out)]) == 0
    x = torch.randint(0, 600, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(out).eval()
    linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert len(linears) == 14 and all(nm_violations(m.weight, 2, 4) == 0 for m in linears.values())
    with torch.no_grad():
        plain = base(input_ids=x).logits
    assert torch.allclose(plain, _sparse_forward(run_dir, trained, x, with_slorb=False), atol=1e-5)
    with_adapter = PeftModel.from_pretrained(base, out / "slorb_adapter").eval()
    with torch.no_grad():
        boosted = with_adapter(input_ids=x).logits
    expected = _sparse_forward(run_dir, trained, x, with_slorb=True)
    assert torch.allclose(boosted, expected, atol=1e-5) and not torch.allclose(boosted, plain, atol=1e-3)
    report = json.loads((out / "export_report.json").read_text())
    assert report["all_valid"] and report["sparse_linears"] == 14 and report["slorb_adapter"] == "slorb_adapter"


@pytest.mark.slow
def test_a_sharded_export_is_the_unsharded_one_with_an_index_transformers_loads(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    one, many = tmp_path / "one", tmp_path / "many"
    assert main(["export", str(trained), "--out", str(one)]) == 0
    assert main(["export", str(trained), "--out", str(many), "--max-shard-size", "100KB", "--dtype", "bfloat16"]) == 0
    index = json.loads((many / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    whole = load_file(str(one / "model.safetensors"))
    got = {}
    for f in files:
        assert (many / f).stat().st_size <= 100_000 + 20_000  # header and the one tensor that crossed the limit
        with safe_open(str(many / f), framework="pt") as h:
            assert h.metadata()["format"] == "pt"
            got.update({k: h.get_tensor(k) for k in h.keys()})
    assert set(got) == set(whole) == set(index["weight_map"])
    assert all(torch.equal(got[k], whole[k].to(torch.bfloat16)) for k in whole)
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in got.values())
    loaded = AutoModelForCausalLM.from_pretrained(many)
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded.model.layers[0].mlp.up_proj.weight,
                                                          got["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(load_file(str(many / "masks.safetensors"))["model.layers.0.mlp.up_proj.weight"],
                       load_file(str(one / "masks.safetensors"))["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("projection", [False, True])
def test_our_loader_gives_the_trainers_student_with_and_without_the_adapter(run_dir, trained, trained_projection,
                                                                           projection, tmp_path, capsys):
    from megatron_ast.modeling import load_causal_lm

    ckpt = trained_projection if projection else trained
    out = tmp_path / "hf"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    x = torch.randint(0, 600, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        boosted = load_causal_lm(out).eval()(input_ids=x).logits
        plain = load_causal_lm(out, adapter=False).eval()(input_ids=x).logits
    assert "+ SLoRB adapter slorb_adapter/" in capsys.readouterr().err
    assert torch.allclose(boosted, _sparse_forward(run_dir, ckpt, x, True, projection), atol=1e-5, rtol=0)
    assert torch.allclose(plain, _sparse_forward(run_dir, ckpt, x, False, projection), atol=1e-5, rtol=0)
    assert not torch.allclose(boosted, plain, atol=1e-3)
    if projection:  # the trained A is not the plain group sum any more
        from megatron_ast.sparsity.slorb_adapter import read

        a, _ = read(out / "slorb_adapter")["model.layers.0.mlp.up_proj"]
        assert not torch.equal(a, (a > 0.5).float())


@pytest.mark.slow
def test_quantize_carries_the_adapter_and_eval_reports_it(run_dir, trained, tmp_path, capsys):
    from megatron_ast.modeling import load_causal_lm

    out, q = tmp_path / "hf", tmp_path / "int8"
    assert main(["export", str(trained), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["quantize", "--model", str(out), "--bits", "8", "--group-size", "32", "--method", "rtn",
                 "--out", str(q)]) == 0
    report = json.loads(capsys.readouterr().out)
    exported = load_causal_lm(out)
    branch_numel = sum(m.slorb.S.numel() + m.slorb.lora()[0].numel() for m in exported.modules() if hasattr(m, "slorb"))
    assert report["slorb_adapter"]["float16_bytes"] == 2 * branch_numel
    assert (q / "slorb_adapter" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(q / "slorb_adapter" / "adapter_model.safetensors")).values()} == {torch.float16}
    assert not any(".slorb." in k for k in load_file(str(q / "model.safetensors")))  # the base alone
    ppl = {}
    for flag in ([], ["--no-adapter"]):
        assert main(["eval", "ppl", "--model", str(q), "--data", str(run_dir / "val_shards"), "--seq-len", "64",
                     "--max-windows", "4", *flag]) == 0
        r = json.loads(capsys.readouterr().out)
        assert (r["slorb_adapter"] is None) == bool(flag)
        ppl[bool(flag)] = r["perplexity"]["all"]["ppl"]
    assert ppl[False] != ppl[True]


def test_export_refuses_incomplete_or_corrupt_checkpoints(run_dir, trained, tmp_path, capsys):
    import shutil

    bad = tmp_path / "step3"
    shutil.copytree(trained, bad)
    victim = bad / "rank0.safetensors"
    victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
    assert main(["export", str(bad), "--out", str(tmp_path / "o1")]) == 2
    assert f"{victim}: sha256 differs from the manifest (corrupt)" in capsys.readouterr().err
    (bad / "complete.json").unlink()
    assert main(["export", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_a_full_disk_is_one_line_exit_2_and_leaves_nothing(trained, small_disk, capsys):
    """Before: an OSError [Errno 28] / SafetensorError traceback, exit 1."""
    from tests.conftest import assert_full_disk_line

    disk = small_disk(64 * 1024)
    assert main(["export", str(trained), "--out", str(disk / "model")]) == 2
    assert_full_disk_line(capsys.readouterr().err, disk)


def test_a_writer_failing_for_space_is_the_same_line(trained, tmp_path, monkeypatch, capsys):
    """Where no tmpfs can be mounted: the streaming writer made to fail as a full disk does, mid-file."""
    import errno

    from megatron_ast.export import shards
    from tests.conftest import assert_full_disk_line

    real = shards.write_file

    def fills_the_disk(path, specs, make, *args, **kwargs):
        made = []

        def make_one_then_fail(name):
            if made:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            made.append(name)
            return make(name)

        real(path, specs, make_one_then_fail, *args, **kwargs)

    monkeypatch.setattr(shards, "write_file", fills_the_disk)
    (tmp_path / "disk").mkdir()
    assert main(["export", str(trained), "--out", str(tmp_path / "disk" / "model")]) == 2
    assert_full_disk_line(capsys.readouterr().err, tmp_path / "disk")


def test_a_stored_tensor_made_of_several_parameters_is_one_line():
    """HRM stores q, k, v (and more) as one gqkv_proj tensor, which transformers splits on load: export streams one
    parameter at a time and cannot write it, so it says so instead of writing one key several times."""
    from transformers import AutoConfig

    from megatron_ast.errors import UsageError
    from megatron_ast.export.hf import _layout

    with pytest.raises(UsageError, match=r"stores model.L_module.layers.0.attn.gqkv_proj.weight from several parameters"):
        _layout(AutoConfig.for_model("hrm_text"))
    _, layout, _ = _layout(AutoConfig.for_model("qwen3_moe", num_hidden_layers=1, num_experts=2))
    assert [k for k, _ in layout["model.layers.0.mlp.experts.down_proj"]] == [
        "model.layers.0.mlp.experts.0.down_proj.weight", "model.layers.0.mlp.experts.1.down_proj.weight"]

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


def _sparse_forward(run_dir, ckpt, x, with_slorb: bool) -> torch.Tensor:
    """The trainer's forward (SparseLinear: W*M via the STE, + SLoRB) on the consolidated checkpoint."""
    sd, masks = consolidated(ckpt), ckpt_masks(ckpt)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(run_dir / "dense"))
    sparsify_(model, {f"{k}.weight": v for k, v in masks.items()}, SLoRBConfig(group=16))
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

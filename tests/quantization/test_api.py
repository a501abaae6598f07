"""`megatron-ast quantize` on a pruned tiny Llama: loadable, zeros kept, the packed file equals the weights."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from megatron_ast.cli import main
from megatron_ast.quantization.groupwise import QuantSpec, dequantize
from megatron_ast.quantization.pack24 import unpack
from megatron_ast.sparsity import nm_violations


@pytest.fixture()
def pruned(tmp_path, model_dir, calib_file):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--method", "sparsegpt", "--calib", str(calib_file), "--nsamples",
                 "8", "--seqlen", "64", "--out", str(out)]) == 0
    return out, calib_file


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_quantize_keeps_2of4_and_stores_what_it_loads(pruned, tmp_path, method, capsys):
    src, calib = pruned
    out = tmp_path / f"q-{method}"
    assert main(["quantize", "--model", str(src), "--bits", "4", "--group-size", "32", "--method", method,
                 "--calib", str(calib), "--nsamples", "8", "--seqlen", "64", "--out", str(out)]) == 0
    capsys.readouterr()
    model = AutoModelForCausalLM.from_pretrained(out)
    masks = load_file(str(out / "masks.safetensors"))
    packed = load_file(str(out / "quantized_24.safetensors"))
    spec = QuantSpec(4, 32)
    for name, mask in masks.items():
        key = name.removesuffix(".weight")
        w = model.get_parameter(name)
        assert nm_violations(w, 2, 4) == 0 and bool((w[~mask] == 0).all())
        codes = unpack({"values": packed[f"{key}.values"], "positions": packed[f"{key}.positions"]}, spec)
        assert torch.equal(dequantize(codes, packed[f"{key}.scales"], spec), w)  # the file holds these weights
    report = json.loads((out / "compression_report.json").read_text())
    assert report["all_zeros_kept"] and report["decoder_linears"]["count"] == 14
    assert report["decoder_linears"]["compression_vs_fp32"] == pytest.approx(32 / (2 + 1 + 16 / 32))


def test_quantize_bad_input_exits_2_with_nothing_written(pruned, tmp_path, capsys):
    src, calib = pruned
    (src / "masks.safetensors").rename(tmp_path / "masks.bak")
    assert main(["quantize", "--model", str(src), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "a")]) == 2
    assert "has no masks.safetensors" in capsys.readouterr().err
    (tmp_path / "masks.bak").rename(src / "masks.safetensors")
    assert main(["quantize", "--model", str(src), "--method", "gptq", "--out", str(tmp_path / "b")]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert main(["quantize", "--model", str(src), "--method", "rtn", "--group-size", "48", "--out", str(tmp_path / "c")]) == 2
    assert "not a multiple of --group-size 48" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abc")


def test_quantize_refuses_masks_that_are_not_2of4(tmp_path, model_dir, capsys):
    src = tmp_path / "unstructured"
    assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--pattern", "unstructured",
                 "--out", str(src)]) == 0
    capsys.readouterr()
    assert main(["quantize", "--model", str(src), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "q")]) == 2
    assert "is not a 2:4 mask" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_a_full_disk_is_one_line_exit_2_and_leaves_nothing(pruned, small_disk, capsys):
    """Before: a SafetensorError ... No space left on device traceback, exit 1."""
    from tests.conftest import assert_full_disk_line

    disk = small_disk(16 * 1024)
    capsys.readouterr()
    assert main(["quantize", "--model", str(pruned[0]), "--method", "rtn", "--group-size", "32", "--out", str(disk / "q")]) == 2
    assert_full_disk_line(capsys.readouterr().err, disk)


def test_quantize_refuses_damaged_masks_and_another_models_masks(pruned, tmp_path, model_dir, calib_file, capsys):
    """Before: a cut masks.safetensors gave safetensors' traceback (exit 1), and another model's masks were quantized
    against these weights silently."""
    import shutil

    src, _ = pruned
    other = tmp_path / "other"
    torch.manual_seed(5)
    assert main(["prune", "--model", str(model_dir), "--method", "wanda", "--calib", str(calib_file), "--nsamples", "4",
                 "--seqlen", "32", "--out", str(other)]) == 0
    shutil.copy(src / "masks.safetensors", tmp_path / "masks.bak")
    shutil.copy(other / "masks.safetensors", src / "masks.safetensors")
    capsys.readouterr()
    args = ["quantize", "--model", str(src), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "q")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "nonzero weights where its mask prunes: these masks are another model's" in err, err
    masks = src / "masks.safetensors"
    masks.write_bytes((tmp_path / "masks.bak").read_bytes()[:-100])
    assert main(args) == 2
    assert "is not a whole safetensors file" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()

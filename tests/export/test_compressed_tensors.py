"""Our compressed-tensors writer, read back by the compressed-tensors package: the weights it decompresses are ours."""
import json

import compressed_tensors as ct  # README's test command installs it (--no-deps: it pins transformers<5)
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_ast.cli import main
from megatron_ast.export.compressed_tensors import FORMAT_VERSION, bitmask_24, pack_int32
from megatron_ast.sparsity import nm_mask
from tests.pruning.conftest import calib, calib_file, model_dir, tiny  # noqa: F401


def _decompressed(path) -> dict[str, torch.Tensor]:
    """What compressed-tensors' ModelCompressor loads from `path` into a fresh model of its config."""
    from compressed_tensors.compressors import ModelCompressor

    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    ModelCompressor.from_pretrained(str(path)).decompress(str(path), model)
    return model.state_dict()


def test_the_package_is_the_version_the_format_is_checked_against():
    assert ct.__version__ == FORMAT_VERSION


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_packing_is_the_packages(bits):
    from compressed_tensors.compressors.quantized_compressors.pack_quantized import pack_to_int32

    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.randint(lo, hi + 1, (6, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    codes[0, :2] = torch.tensor([lo, hi], dtype=torch.int8)
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(codes, bits))


def test_bitmask_24_is_the_packages():
    from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import sparse24_bitmask_compress

    w = torch.randn(5, 36, generator=torch.Generator().manual_seed(0))  # 36 inputs: the last bitmask byte is padded
    mask = nm_mask(w.abs(), 2, 4).bool()
    ours = bitmask_24(w * mask, mask)
    values, bitmask = sparse24_bitmask_compress(w * mask, "2:4")
    assert torch.equal(ours["compressed"], values) and torch.equal(ours["bitmask"], bitmask)
    assert ours["shape"].flatten().tolist() == [5, 36]


@pytest.fixture()
def pruned(tmp_path, model_dir, calib_file):  # noqa: F811
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--method", "sparsegpt", "--calib", str(calib_file),
                 "--nsamples", "8", "--seqlen", "64", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_to_compressed_tensors_decompresses_to_our_weights(pruned, tmp_path, bits, capsys):
    args = ["quantize", "--model", str(pruned), "--bits", str(bits), "--group-size", "32", "--method", "rtn"]
    assert main([*args, "--out", str(tmp_path / "hf")]) == 0
    assert main([*args, "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    capsys.readouterr()
    ours = load_file(str(tmp_path / "hf" / "model.safetensors"))
    theirs = _decompressed(tmp_path / "ct")
    stored = load_file(str(tmp_path / "ct" / "model.safetensors"))
    masks = load_file(str(pruned / "masks.safetensors"))
    assert len(masks) == 14
    for name in ours:
        if name in masks:  # dequantized by the package in the float16 of the stored scales: exactly ours, rounded
            assert theirs[name].dtype == torch.float16 and torch.equal(theirs[name], ours[name].half()), name
            assert bool((theirs[name][~masks[name]] == 0).all())
            assert stored[name.replace(".weight", ".weight_packed")].dtype == torch.int32
        else:
            assert torch.equal(stored[name], ours[name]), name
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    assert qc["sparsity_config"]["sparsity_structure"] == "2:4" and qc["ignore"] == ["lm_head"]
    report = json.loads((tmp_path / "ct" / "compression_report.json").read_text())
    # packed codes (zeros included), float16 scales per 32 inputs, the int32 (2,) shape
    expected = sum(m.numel() * bits // 8 + m.numel() // 32 * 2 + 8 for m in masks.values())
    assert report["compressed-tensors"]["sparse_linears_bytes"] == expected


@pytest.mark.slow
def test_export_to_compressed_tensors_decompresses_to_the_hf_export(trained, tmp_path, capsys):
    assert main(["export", str(trained), "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(trained), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    capsys.readouterr()
    ours = load_file(str(tmp_path / "hf" / "model.safetensors"))
    theirs = _decompressed(tmp_path / "ct")
    stored = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert sum(k.endswith(".bitmask") for k in stored) == 14  # every decoder Linear stored as 2:4 bitmask
    assert all(torch.equal(theirs[k], v) for k, v in ours.items())
    assert (tmp_path / "ct" / "slorb_adapter" / "adapter_model.safetensors").is_file()
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["sparsity_config"]["format"] == "sparse-24-bitmask" and qc["config_groups"] == {}


def test_a_conv1d_model_is_refused_with_nothing_written(tmp_path, tiny, hf_tokenizer_dir, calib_file, capsys):  # noqa: F811
    src = tmp_path / "gpt2"
    tiny("gpt2").save_pretrained(src)
    for f in hf_tokenizer_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    assert main(["prune", "--model", str(src), "--method", "magnitude", "--out", str(tmp_path / "pruned")]) == 0
    capsys.readouterr()
    assert main(["quantize", "--model", str(tmp_path / "pruned"), "--method", "rtn", "--group-size", "32",
                 "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err
    assert "is a Conv1D" in err and "use --format hf" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ct").exists()

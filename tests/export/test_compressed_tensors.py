"""Our compressed-tensors writer, read back by the current compressed-tensors package and by transformers' loader:
the weights they decompress are ours."""
import json

import compressed_tensors as ct
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_ast.cli import main
from megatron_ast.export.compressed_tensors import FORMAT_VERSION, pack_int32
from tests.pruning.conftest import calib, calib_file, model_dir, tiny  # noqa: F401


def _decompressed(path) -> dict[str, torch.Tensor]:
    """What compressed-tensors' ModelCompressor decompresses from `path` into a fresh model of its config
    (0.20's route: the config's scheme applied, the compressed layout made, the file loaded, then decompressed)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    config = AutoConfig.from_pretrained(path)
    qc = QuantizationConfig.model_validate(config.quantization_config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    apply_quantization_config(model, qc)
    mc = ModelCompressor(quantization_config=qc)
    mc.compress_model(model)
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    assert not unexpected and all("lm_head" in k or "embed" in k for k in missing), (missing, unexpected)
    mc.decompress_model(model)
    return model.state_dict()


def test_the_package_is_the_version_the_format_is_checked_against():
    assert ct.__version__ == FORMAT_VERSION


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_packing_is_the_packages(bits):
    from compressed_tensors.compressors import pack_to_int32

    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.randint(lo, hi + 1, (6, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    codes[0, :2] = torch.tensor([lo, hi], dtype=torch.int8)
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(codes, bits))


@pytest.fixture()
def pruned(tmp_path, model_dir, calib_file):  # noqa: F811
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--method", "sparsegpt", "--calib", str(calib_file),
                 "--nsamples", "8", "--seqlen", "64", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_to_compressed_tensors_decompresses_to_our_weights(pruned, tmp_path, bits, capsys):
    """Before: written for compressed-tensors 0.14.0.1 with a sparsity_config naming targets, which vLLM 0.24+
    refuses; its round trip called ModelCompressor.from_pretrained(...).decompress, gone since 0.15."""
    args = ["quantize", "--model", str(pruned), "--bits", str(bits), "--group-size", "32", "--method", "rtn"]
    assert main([*args, "--out", str(tmp_path / "hf")]) == 0
    assert main([*args, "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    capsys.readouterr()
    ours = load_file(str(tmp_path / "hf" / "model.safetensors"))
    theirs = _decompressed(tmp_path / "ct")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float16)  # transformers' own loader
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))  # which decompresses on the first forward
    loaded = model.state_dict()
    stored = load_file(str(tmp_path / "ct" / "model.safetensors"))
    masks = load_file(str(pruned / "masks.safetensors"))
    assert len(masks) == 14
    for name in ours:
        if name in masks:  # dequantized by the package in the float16 of the stored scales: exactly ours, rounded
            assert theirs[name].dtype == torch.float16 and torch.equal(theirs[name], ours[name].half()), name
            assert torch.equal(loaded[name], ours[name].half()), name
            assert bool((theirs[name][~masks[name]] == 0).all())
            assert stored[name.replace(".weight", ".weight_packed")].dtype == torch.int32
        else:
            assert torch.equal(stored[name], ours[name]), name
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    assert qc["sparsity_config"] == {} and qc["ignore"] == ["lm_head"]  # vLLM refuses a sparsity_config with targets
    report = json.loads((tmp_path / "ct" / "compression_report.json").read_text())
    # packed codes (zeros included), float16 scales per 32 inputs, the int64 (2,) shape
    expected = sum(m.numel() * bits // 8 + m.numel() // 32 * 2 + 16 for m in masks.values())
    assert report["compressed-tensors"]["sparse_linears_bytes"] == expected


def test_export_to_compressed_tensors_is_refused_in_one_line(tmp_path, capsys):
    """Before: a float export wrote sparse-24-bitmask, which transformers 5 + compressed-tensors 0.20 load silently
    with random Linears and no current vLLM loads."""
    assert main(["export", str(tmp_path), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantize --format compressed-tensors" in err[0] and not (tmp_path / "ct").exists()


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

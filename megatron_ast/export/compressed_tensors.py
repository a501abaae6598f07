"""The compressed-tensors checkpoint format (what vLLM and transformers load), written without the package.

A dir of `config.json` (the model's config plus a `quantization_config` with
`quant_method: compressed-tensors`), `model.safetensors` and the tokenizer, for
quantized 2:4 models (from `quantize`, symmetric int4/int8 in groups along the
input), format `pack-quantized` (W4A16 / W8A16). Per masked decoder Linear `m`:
`m.weight_packed` int32 (out, in*bits/32), the codes + 2^(bits-1) packed
little-endian; `m.weight_scale` float16 (out, in/group); `m.weight_shape` int64
(2,). No zero point: compressed-tensors drops it for symmetric schemes, since
vLLM does not load one (`PackedQuantizationCompressor`, 0.20.1). The pruned zeros
are stored as codes: 4.125 bits per weight for int4 at group 128.

`sparsity_config` is `{}`, what compressed-tensors 0.20.1 itself writes. Sparsity
support left compressed-tensors in 0.15.0 (#610) and transformers (#46342), and vLLM
refuses any sparsity_config with targets, even format dense
(`_parse_sparsity_config`, #43144; the fix for dense, #51189, is unmerged as of
2026-08). The 2:4 structure is in `masks.safetensors` and the dir's report.

A float 2:4 model has no compressed-tensors form any current stack loads: the
`sparse-24-bitmask` compressor existed in compressed-tensors 0.9.0 to 0.14.0.1 and
vLLM's 2:4 kernels (Hopper only) up to 0.18; transformers 5 with compressed-tensors
0.20 loads such a dir without an error but with random Linears. So `export` writes
float models as Hugging Face safetensors only, which vLLM loads as dense.

Everything else (embeddings, norms, an untied lm_head) is stored as it is. The
layout is checked by decompressing with the compressed-tensors package and by
transformers' loader (`tests/export/test_compressed_tensors.py`, version FORMAT_VERSION).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from megatron_ast.errors import UsageError
from megatron_ast.quantization.groupwise import QuantSpec

FORMAT = "compressed-tensors"
FORMAT_VERSION = "0.20.1"  # the compressed-tensors release the round-trip test decompresses with
FORMATS = ("hf", FORMAT)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes (out, in) -> int32 (out, in*bits/32): codes + 2^(bits-1), little-endian in each word."""
    per_word = 32 // bits
    out_f, in_f = codes.shape
    if in_f % per_word:
        raise ValueError(f"in_features {in_f} is not a multiple of {per_word} ({bits}-bit codes per int32)")
    u = (codes.to(torch.int32) + (1 << (bits - 1))).reshape(out_f, in_f // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    return (u << shifts).sum(-1, dtype=torch.int32)  # wraps like a bitwise or: the fields don't overlap


def quantization_config(targets: list[str], ignore: list[str], spec: QuantSpec) -> dict:
    """The `quantization_config` entry of config.json: the fields compressed-tensors 0.20.1's QuantizationConfig
    validates (its QuantizationArgs forbid unknown keys), as it writes them."""
    groups = {"group_0": {
        "targets": targets, "input_activations": None, "output_activations": None, "format": "pack-quantized",
        "weights": {"num_bits": spec.bits, "type": "int", "symmetric": True, "strategy": "group",
                    "group_size": spec.group, "dynamic": False, "actorder": None, "observer": "minmax"}}}
    return {"quant_method": "compressed-tensors", "version": FORMAT_VERSION, "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


def require_linears(model: nn.Module, modules: list[str]) -> None:
    """compressed-tensors targets nn.Linear (out, in) weights; GPT-2's Conv1D stores (in, out)."""
    other = [m for m in modules if not isinstance(model.get_submodule(m), nn.Linear)]
    if other:
        kind = type(model.get_submodule(other[0])).__name__
        raise UsageError(f"--format {FORMAT} stores nn.Linear weights, {other[0]} is a {kind} "
                         f"({len(other)} such): use --format hf for this model")


def save_compressed_tensors(model: nn.Module, out: Path, masks: dict[str, torch.Tensor],
                            quantized: dict[str, tuple[torch.Tensor, torch.Tensor]], spec: QuantSpec) -> dict:
    """Write `model` into the existing dir `out`; returns {tensor bytes by kind}.

    masks: {"<module>.weight": bool (out, in)}, every one 2:4. quantized: {"<module>": (int8 codes, float16
    scales)} for every masked module, quantized as `spec` says.
    """
    from safetensors.torch import save_file

    targets = sorted(k.removesuffix(".weight") for k in masks)
    require_linears(model, targets)
    if set(quantized) != set(targets):
        raise ValueError("quantized modules and masks differ")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    sizes = {"sparse_linears": 0, "other": 0}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:  # tied (lm_head = embeddings): stored once, as save_pretrained does
            continue
        seen.add(t.data_ptr())
        module = name.removesuffix(".weight")
        if module not in targets or not name.endswith(".weight"):
            tensors[name] = t.detach().contiguous()
            sizes["other"] += t.numel() * t.element_size()
            continue
        codes, scales = quantized[module]
        parts = {"weight_packed": pack_int32(codes, spec.bits), "weight_scale": scales.half().contiguous(),
                 "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64)}
        for k, v in parts.items():
            tensors[f"{module}.{k}"] = v
            sizes["sparse_linears"] += v.numel() * v.element_size()
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(
        ["Linear"], sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - set(targets)), spec)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return sizes

"""The compressed-tensors checkpoint format (what vLLM and llm-compressor load), written without the package.

A dir of `config.json` (the model's config plus a `quantization_config` with
`quant_method: compressed-tensors`), `model.safetensors` and the tokenizer. Per
masked decoder Linear `m`:

- float 2:4 models (from `prune` or `export`), format `sparse-24-bitmask`:
  `m.compressed` (out, in/2) the kept values row by row in the model's dtype,
  `m.bitmask` uint8 (out, ceil(in/8)) one bit per weight, little-endian within a
  byte, `m.shape` int64 (2, 1);
- quantized models (from `quantize`, symmetric int4/int8 in groups along the
  input), format `pack-quantized`: `m.weight_packed` int32 (out, in*bits/32), the
  codes + 2^(bits-1) packed little-endian, `m.weight_scale` float16 (out,
  in/group), `m.weight_shape` int32 (2,). compressed-tensors applies its bitmask
  compressor only to tensors still named `.weight`, so it does not stack on packed
  codes: the sparsity config then records the 2:4 structure with format `dense`
  (the packed zeros are stored; 4.125 bits per weight for int4 at group 128).

Everything else (embeddings, norms, an untied lm_head) is stored as it is. The
layout is checked by decompressing with the compressed-tensors package
(`tests/export/test_compressed_tensors.py`, version FORMAT_VERSION).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from megatron_ast.errors import UsageError
from megatron_ast.quantization.groupwise import QuantSpec

FORMAT = "compressed-tensors"
FORMAT_VERSION = "0.14.0.1"  # the compressed-tensors release the round-trip test decompresses with
FORMATS = ("hf", FORMAT)


def bitmask_24(weight: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """{'compressed', 'bitmask', 'shape'} of a 2:4 weight (out, in) under its bool mask."""
    out_f, in_f = weight.shape
    keep = mask.bool()
    bits = torch.zeros(out_f, (in_f + 7) // 8 * 8, dtype=torch.uint8)
    bits[:, :in_f] = keep.to(torch.uint8)
    packed = (bits.reshape(out_f, -1, 8) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return {"compressed": weight[keep].reshape(out_f, in_f // 2).contiguous(), "bitmask": packed.contiguous(),
            "shape": torch.tensor([out_f, in_f]).reshape(-1, 1)}


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes (out, in) -> int32 (out, in*bits/32): codes + 2^(bits-1), little-endian in each word."""
    per_word = 32 // bits
    out_f, in_f = codes.shape
    if in_f % per_word:
        raise ValueError(f"in_features {in_f} is not a multiple of {per_word} ({bits}-bit codes per int32)")
    u = (codes.to(torch.int32) + (1 << (bits - 1))).reshape(out_f, in_f // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    return (u << shifts).sum(-1, dtype=torch.int32)  # wraps like a bitwise or: the fields don't overlap


def quantization_config(targets: list[str], ignore: list[str], sparsity: float, spec: QuantSpec | None) -> dict:
    """The `quantization_config` entry of config.json."""
    sparsity_config = {"format": "dense" if spec else "sparse-24-bitmask", "targets": targets, "ignore": ignore,
                       "global_sparsity": sparsity, "sparsity_structure": "2:4"}
    groups = {} if spec is None else {"group_0": {
        "targets": targets, "input_activations": None, "output_activations": None, "format": None,
        "weights": {"num_bits": spec.bits, "type": "int", "symmetric": True, "strategy": "group",
                    "group_size": spec.group, "dynamic": False, "actorder": None, "observer": "minmax"}}}
    return {"quant_method": "compressed-tensors", "version": FORMAT_VERSION,
            "format": "pack-quantized" if spec else "dense",
            "quantization_status": "compressed" if spec else "frozen",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": sparsity_config, "transform_config": {}}


def require_linears(model: nn.Module, modules: list[str]) -> None:
    """compressed-tensors targets nn.Linear (out, in) weights; GPT-2's Conv1D stores (in, out)."""
    other = [m for m in modules if not isinstance(model.get_submodule(m), nn.Linear)]
    if other:
        kind = type(model.get_submodule(other[0])).__name__
        raise UsageError(f"--format {FORMAT} stores nn.Linear weights, {other[0]} is a {kind} "
                         f"({len(other)} such): use --format hf for this model")


def save_compressed_tensors(model: nn.Module, out: Path, masks: dict[str, torch.Tensor],
                            quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                            spec: QuantSpec | None = None) -> dict:
    """Write `model` into the existing dir `out`; returns {tensor bytes by kind}.

    masks: {"<module>.weight": bool (out, in)}, every one 2:4. quantized: {"<module>":
    (int8 codes, float16 scales)} for every masked module (then `spec` says how).
    """
    from safetensors.torch import save_file

    targets = sorted(k.removesuffix(".weight") for k in masks)
    require_linears(model, targets)
    if quantized is not None and set(quantized) != set(targets):
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
        if quantized is None:
            parts = bitmask_24(t.detach(), masks[name])
        else:
            codes, scales = quantized[module]
            parts = {"weight_packed": pack_int32(codes, spec.bits), "weight_scale": scales.half().contiguous(),
                     "weight_shape": torch.tensor(list(codes.shape), dtype=torch.int32)}
        for k, v in parts.items():
            tensors[f"{module}.{k}"] = v
            sizes["sparse_linears"] += v.numel() * v.element_size()
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(
        ["Linear"], sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - set(targets)),
        1 - kept / max(total, 1), spec)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return sizes

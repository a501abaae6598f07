"""`megatron-ast quantize`: a 2:4 model dir (pruned or exported, with masks.safetensors) -> int4/int8 on top.

Every masked decoder Linear is quantized group-wise after its mask (GPTQ with
calibration through the same sequential pass as pruning, or round-to-nearest),
so zeros stay zero. Written (`fmt="hf"`): an HF dir whose weights are the
dequantized values (loadable and evaluable anywhere), `quantized_24.safetensors`
with what a 2:4 int kernel stores (kept codes, 2-bit positions, float16 scales;
pack24.py), the masks, and `compression_report.json` with the bytes counted.
`fmt="compressed-tensors"` writes the same codes and scales as pack-quantized
W4A16/W8A16, what vLLM and transformers load (export/compressed_tensors.py), instead
of the first two. A dir with a SLoRB
adapter is quantized as the model it is: calibrated with its branch attached, the
2:4 base weights quantized, and the adapter carried along in float16 (its bytes
counted in the report).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from megatron_ast import hf_layout
from megatron_ast.errors import UsageError
from megatron_ast.export.compressed_tensors import FORMAT, FORMATS, require_linears, save_compressed_tensors
from megatron_ast.fsutil import atomic_dir
from megatron_ast.modeling import check_model_dir, check_safetensors, load_causal_lm
from megatron_ast.pruning.api import MASKS_FILE, TOKENIZER_FILES
from megatron_ast.pruning.calibration import calibration_samples
from megatron_ast.pruning.pipeline import get_matrices, set_matrices, walk_layers
from megatron_ast.quantization.gptq import gptq
from megatron_ast.quantization.groupwise import QuantSpec, dequantize, rtn
from megatron_ast.quantization.pack24 import nbytes, pack, unpack
from megatron_ast.sparsity import nm_violations, slorb_adapter
from megatron_ast.sparsity.sparse_weights import MASK_LAYOUT, sparse_weights

PACKED_FILE = "quantized_24.safetensors"
REPORT_FILE = "compression_report.json"
METHODS = ("gptq", "rtn")


def _read_masks(model_dir: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The dir's masks by parameter name as stored, and whether they are in the weights' stored layout (older
    dirs hold GPT-2 Conv1D masks as (out, in)). Read before the model: a bad file is one line, at once."""
    from safetensors import safe_open

    path = model_dir / MASKS_FILE
    if not path.is_file():
        raise UsageError(f"{model_dir} has no {MASKS_FILE}: quantize a 2:4 model from `megatron-ast prune` or "
                         "`megatron-ast export` (quantizing is applied after the masks)")
    check_safetensors(path)
    with safe_open(str(path), framework="pt") as h:
        stored_layout = (h.metadata() or {}).get("mask_layout") == MASK_LAYOUT
        masks = {k: h.get_tensor(k).bool() for k in h.keys()}
    bad = [k for k, v in masks.items() if v.dim() not in (2, 3)]
    if bad:
        raise UsageError(f"{path}: {bad[0]} is not a 2:4 mask ({len(bad)} such): quantize stores 2:4 models")
    return masks, stored_layout


def _masks(model_dir: Path, model, read: tuple[dict[str, torch.Tensor], bool],
           ignore: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The masks to quantize under, as (out, in) by parameter name, each checked 2:4 along its weight's inputs and
    against it; those of weights `ignore` names are left out."""
    path = model_dir / MASKS_FILE
    stored, stored_layout = read
    masks = hf_layout.to_model(model, stored)  # stored names (per-expert files) -> the model's parameters
    weights = {w.name: w for w in sparse_weights(model)}
    kept = {w.name for w in sparse_weights(model, ignore)}  # the same --ignore rule as prune and train
    masks = {k: v for k, v in masks.items() if k in kept or k not in weights}
    if experts := [k for k in masks if k in weights and weights[k].experts]:
        raise UsageError(f"{path}: {experts[0]} is a fused expert weight ({len(experts)} such): int4 on 2:4 experts "
                         "is not built yet: pass --ignore '\\.experts\\.' to quantize the rest and leave them float under their masks")
    out = {k: weights[k].out_in(v) if k in weights and stored_layout else v for k, v in masks.items()}
    bad = [k for k, v in out.items() if v.dim() != 2 or nm_violations(v.float(), 2, 4)]
    if bad:
        raise UsageError(f"{path}: {bad[0]} is not a 2:4 mask ({len(bad)} such): quantize stores 2:4 models")
    _check_weights_follow(model, out, weights, path)
    return out


def _check_weights_follow(model, masks: dict[str, torch.Tensor], weights: dict, path: Path) -> None:
    """Every weight is zero where its mask prunes, as prune and export write them: masks.safetensors copied from
    another model would otherwise be quantized against these weights silently."""
    for key, mask in masks.items():
        if key not in weights:
            continue  # not a sparse weight here: the count check after the walk names it
        w = weights[key].matrices(model.get_parameter(key).detach())[0]
        if tuple(w.shape) != tuple(mask.shape):
            raise UsageError(f"{path}: {key} is {tuple(mask.shape)}, the model's weight {tuple(w.shape)}: these masks "
                             "are another model's; quantize the dir that prune or export wrote")
        if stray := int((w[~mask.to(w.device)] != 0).sum()):
            raise UsageError(f"{path}: {key} has {stray:,} nonzero weights where its mask prunes: these masks are "
                             "another model's; quantize the dir that prune or export wrote")


def quantize_dir(model_dir: str | Path, out_dir: str | Path, spec: QuantSpec, method: str = "gptq",
                 calib: list[str] | None = None, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                 device: str = "cpu", blocksize: int = 128, damp: float = 0.01, fmt: str = "hf",
                 adapter: bool = True, text_key: str = "text", ignore: tuple[str, ...] = ()) -> dict:
    """`ignore`: regexes of weights left as they are (float, still under their masks)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists():
        raise UsageError(f"{out_dir} already exists: pass a new --out")
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: choose {' or '.join(METHODS)}")
    check_model_dir(model_dir)
    blocksize = max(1, blocksize // spec.group) * spec.group  # GPTQ blocks hold whole scale groups (e.g. group 192)
    read = _read_masks(model_dir)
    samples = None
    if method == "gptq":
        if not calib:
            raise UsageError("--method gptq needs calibration data: pass --calib SHARD_DIRS_OR_FILES (or --method rtn)")
        samples = calibration_samples(calib, model_dir, nsamples, seqlen, seed, text_key)
    t0 = time.perf_counter()
    model = load_causal_lm(model_dir, adapter=adapter)
    masks = _masks(model_dir, model, read, ignore)
    if fmt == FORMAT:
        require_linears(model, [k.removesuffix(".weight") for k in masks])
    packed, rows = {}, []

    def visit(i, layer, weights, hessians, ffns) -> None:
        for local, sw in weights.items():
            if sw.name not in masks:
                continue
            key = sw.module
            w, mask = get_matrices(layer, sw)[0], masks[sw.name].to(device)
            spec.check_shape(w.shape[1], key)
            codes, scales = (gptq(w, hessians.hessian(local), mask, spec, blocksize, damp) if method == "gptq"
                             else rtn(w, mask, spec))
            q = dequantize(codes, scales, spec)
            set_matrices(layer, sw, q[None])
            p = pack(codes.cpu(), mask.cpu(), spec)
            packed.update({f"{key}.values": p["values"], f"{key}.positions": p["positions"],
                           f"{key}.scales": scales.cpu()})
            rows.append({"name": key, "shape": list(w.shape), "fp32_bytes": w.numel() * 4,
                         "stored_bytes": nbytes(p, scales), "zeros_kept": bool((q[~mask] == 0).all()),
                         "rel_error": float(((q - w * mask) ** 2).sum() / ((w * mask) ** 2).sum().clamp_min(1e-30))})

    walk_layers(model, samples, device, f"quantize {method} int{spec.bits}", visit, ignore=ignore)  # no H for what stays
    branches = slorb_adapter.detach_(model)  # the base is saved alone; the adapter beside it
    if len(rows) != len(masks):
        raise UsageError(f"{MASKS_FILE} names {len(masks)} weights, {len(rows)} of them are decoder Linears here")
    linear_fp32 = sum(r["fp32_bytes"] for r in rows)
    linear_stored = sum(r["stored_bytes"] for r in rows)
    other = sum(p.numel() for n, p in model.named_parameters() if n.removesuffix(".weight") not in
                {r["name"] for r in rows})
    loras = {k: b.lora() for k, b in branches.items()}
    adapter_bytes = sum(a.numel() + b.numel() for a, b in loras.values()) * 2  # as written: A and B in float16
    report = {
        "method": method, "format": fmt, "bits": spec.bits, "group_size": spec.group, "source_model": str(model_dir),
        "calibration": None if samples is None else {"data": calib, "nsamples": nsamples, "seqlen": seqlen},
        "seconds": round(time.perf_counter() - t0, 1),
        "decoder_linears": {"count": len(rows), "fp32_bytes": linear_fp32, "stored_bytes": linear_stored,
                            "compression_vs_fp32": linear_fp32 / linear_stored},
        "slorb_adapter": {"dir": slorb_adapter.ADAPTER_DIR, "linears": len(branches), "float16_bytes": adapter_bytes,
                          "note": "A (the group projection) and B (S) as the PEFT file stores them"}
                         if branches else None,
        "whole_model": {"fp32_bytes": (linear_fp32 // 4 + other) * 4 + adapter_bytes * 2,
                        "stored_bytes": linear_stored + other * 2 + adapter_bytes,
                        "note": "decoder Linears packed as above; embeddings, norms, lm_head and any SLoRB adapter "
                                "in float16",
                        "compression_vs_fp32": ((linear_fp32 // 4 + other) * 4 + adapter_bytes * 2)
                                               / (linear_stored + other * 2 + adapter_bytes)},
        "all_zeros_kept": all(r["zeros_kept"] for r in rows),
        "layers": rows,
    }
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        if fmt == FORMAT:
            codes = {k: (unpack({"values": packed[f"{k}.values"], "positions": packed[f"{k}.positions"]}, spec),
                         packed[f"{k}.scales"]) for k in (r["name"] for r in rows)}
            sizes = save_compressed_tensors(model, tmp, masks, codes, spec)
            report[FORMAT] = {"sparse_linears_bytes": sizes["sparse_linears"],
                              "compression_vs_fp32": linear_fp32 / sizes["sparse_linears"],
                              "sparsity_structure": "2:4",  # config.json cannot say it: vLLM refuses a sparsity_config
                              "note": "pack-quantized stores the pruned zeros as codes (no 2:4 index); the masks are "
                                      "in masks.safetensors"}
        else:
            model.save_pretrained(tmp, safe_serialization=True)
            save_file(packed, str(tmp / PACKED_FILE), metadata={
                "format": "2:4 kept codes + 2-bit positions + fp16 scales", "bits": str(spec.bits),
                "group_size": str(spec.group)})
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        shutil.copy2(model_dir / MASKS_FILE, tmp / MASKS_FILE)
        if branches:
            slorb_adapter.save(tmp / slorb_adapter.ADAPTER_DIR, loras, torch.float16, out_dir)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(f"quantized {len(rows)} Linears to int{spec.bits} ({method}, group {spec.group}): decoder Linears "
          f"{report['decoder_linears']['compression_vs_fp32']:.2f}x smaller than fp32 -> {out_dir} ({fmt})", file=sys.stderr)
    return report

"""`megatron-ast export`: a training checkpoint -> a Hugging Face dir anyone can load.

The ZeRO-3 partitions are consolidated (DeepSpeed's zero_to_fp32: the dense fp32
master) after the checkpoint's manifest verified every file, the masks assembled
from every rank's slices (rank<r>.safetensors); each masked weight is written as W*M
and checked to be exactly the run's N:M pattern, so `AutoModelForCausalLM` loads
the sparse model with no project code. Beside it: `masks.safetensors` (the same
format `megatron-ast prune` writes, so the dir can seed another run) and, when the
run trained SLoRB, a PEFT LoRA adapter in `slorb_adapter/` with A = P (d/k x d)
and B = S (N x d/k) at scaling 1, which `peft` loads onto the exported base.
With `fmt="compressed-tensors"` the weights are written in vLLM's format instead
(2:4 Linears as sparse-24-bitmask; export/compressed_tensors.py).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from megatron_ast.errors import UsageError
from megatron_ast.export.compressed_tensors import FORMAT, FORMATS, save_compressed_tensors
from megatron_ast.fsutil import atomic_dir
from megatron_ast.modeling import check_model_dir
from megatron_ast.pruning.api import MASKS_FILE, TOKENIZER_FILES
from megatron_ast.sparsity import SparsityPattern, nm_violations, slorb_adapter
from megatron_ast.sparsity.slorb import group_projection
from megatron_ast.sparsity.slorb_adapter import ADAPTER_DIR
from megatron_ast.training import checkpoint
from megatron_ast.training.mask_partitions import masks_from_rank_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _lora(sd: dict, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    s = sd.get(f"{module}.slorb.S")
    if s is None:
        return None
    in_features = sd[f"{module}.weight"].shape[1]
    p = sd.get(f"{module}.slorb.P")
    return (p if p is not None else group_projection(in_features, in_features // s.shape[1])), s


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: str | None = None, fmt: str = "hf",
                      trust: bool = False) -> dict:
    """Write `out` (must not exist) from the complete checkpoint dir `ckpt`; returns the export report. DeepSpeed's
    consolidation unpickles its files: each must pass the weights-only loader first, unless `trust`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt, out = Path(ckpt), Path(out)
    if out.exists():
        raise UsageError(f"{out} already exists: pass a new --out")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose {' or '.join(FORMATS)}")
    checkpoint.require_complete(ckpt, "export an earlier checkpoint")
    run = json.loads((ckpt / checkpoint.STATE).read_text())["config"]
    src = run["init"] if run["init"] not in ("magnitude", "wanda") else run["model"]
    check_model_dir(src)
    pattern = SparsityPattern.parse(run["pattern"])
    checkpoint.check_pickles(ckpt, trust)
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    masks = masks_from_rank_files(checkpoint.rank_files(ckpt))
    base, adapter = {}, {}
    for k, v in sd.items():
        if ".slorb." in k:
            continue
        module = k.rsplit(".", 1)[0]
        base[k] = v * masks[module] if k.endswith(".weight") and module in masks else v
    for module, mask in masks.items():
        bad = nm_violations(base[f"{module}.weight"], pattern.n, pattern.m)
        if bad:
            raise RuntimeError(f"{module}: {bad} groups are not {pattern} after masking")
        lora = _lora(sd, module)
        if lora is not None:
            adapter[module] = lora
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    target = DTYPES[dtype] if dtype else getattr(config, "dtype", None) or torch.float32
    target = DTYPES.get(target, torch.float32) if isinstance(target, str) else target
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(base, strict=False)
    tied = {k for k in missing if model.get_parameter(k) is model.get_input_embeddings().weight}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint does not match {src}: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    model.to(target)
    report = {"checkpoint": str(ckpt), "source_model": src, "pattern": str(pattern), "dtype": str(target), "format": fmt,
              "sparse_linears": len(masks), "all_valid": True, "slorb_adapter": ADAPTER_DIR if adapter else None,
              "slorb_params": sum(b.numel() for _, b in adapter.values())}
    if fmt == FORMAT and (pattern.n, pattern.m) != (2, 4):
        raise UsageError(f"--format {FORMAT} stores 2:4 models, this run is {pattern}: export with --format hf")
    with atomic_dir(out) as tmp:
        if fmt == FORMAT:
            save_compressed_tensors(model, tmp, {f"{m}.weight": v for m, v in masks.items()})
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file() and not (tmp / name).exists():
                shutil.copy2(Path(src) / name, tmp / name)
        save_file({f"{m}.weight": v.contiguous() for m, v in masks.items()}, str(tmp / MASKS_FILE),
                  metadata={"pattern": str(pattern), "method": f"{run['method']} (exported from {ckpt.name})"})
        if adapter:
            slorb_adapter.save(tmp / ADAPTER_DIR, adapter, target, out)
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"exported {ckpt} -> {out}: {len(masks)} sparse Linears, all {pattern}"
          + (f", SLoRB adapter in {ADAPTER_DIR}/" if adapter else ""), file=sys.stderr)
    return report

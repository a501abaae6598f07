"""`megatron-ast export`: a training checkpoint -> a Hugging Face dir anyone can load.

The ZeRO-3 partitions are consolidated one tensor at a time (DeepSpeed's zero_to_fp32
in lazy mode: the dense fp32 master) after the checkpoint's manifest verified every
file, each mask assembled from every rank's slice (rank<r>.safetensors); each masked
weight is written as W*M into sharded safetensors with an index (export/shards.py),
and checked to be exactly the run's N:M pattern, so `AutoModelForCausalLM` loads
the sparse model with no project code. Beside it: `masks.safetensors` (the same
format `megatron-ast prune` writes, so the dir can seed another run) and, when the
run trained SLoRB, a PEFT LoRA adapter in `slorb_adapter/` with A = P (d/k x d)
and B = S (N x d/k) at scaling 1, which `peft` loads onto the exported base.
vLLM loads this dir as a dense model; compressed-tensors has no float 2:4 format
any current release loads (export/compressed_tensors.py), so its form comes from
`megatron-ast quantize --format compressed-tensors` on this dir.
"""
from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from megatron_ast import hf_layout
from megatron_ast.errors import UsageError
from megatron_ast.export.compressed_tensors import FORMAT
from megatron_ast.fsutil import atomic_dir
from megatron_ast.modeling import check_model_dir
from megatron_ast.pruning.api import MASKS_FILE, TOKENIZER_FILES
from megatron_ast.sparsity import SparsityPattern, nm_violations, slorb_adapter
from megatron_ast.sparsity.slorb import group_projection
from megatron_ast.sparsity.slorb_adapter import ADAPTER_DIR
from megatron_ast.sparsity.sparse_weights import MASK_LAYOUT, sparse_weights
from megatron_ast.training import checkpoint
from megatron_ast.training.mask_partitions import RankMasks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _lora(sd: dict, module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    s = sd.get(f"{module}.slorb.S")
    if s is None:
        return None
    s = s.contiguous()
    in_features = sd[f"{module}.weight"].shape[1]
    p = sd.get(f"{module}.slorb.P")
    return (p.contiguous() if p is not None else group_projection(in_features, in_features // s.shape[1])), s


class _Adapter(Mapping):
    """SLoRB's (A = P, B = S) by Linear, each pair made from the lazy state dict when asked (at 70B with group 16
    all of S is ~17 GB in fp32, and the default P's as much again)."""

    def __init__(self, sd: dict, modules: list[str]):
        self.sd, self.modules = sd, modules

    def __getitem__(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return _lora(self.sd, module)

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


class _Stored:
    """Stored tensors by name, each made from its parameter (`make(parameter name)`) through transformers' stored
    layout; one parameter's are held while its tensors are written (a fused expert weight makes 2 x experts)."""

    def __init__(self, model, source: dict[str, str], make):
        self.model, self.source, self.make = model, source, make
        self.name, self.stored = None, {}

    def get(self, key: str) -> torch.Tensor:
        name = self.source[key]
        if name != self.name:
            self.name, self.stored = name, hf_layout.to_stored(self.model, {name: self.make(name)})
        return self.stored[key]


def _layout(config):
    """The meta-device model of `config`, the tensors `save_pretrained` writes for it in its order (parameters once
    each, persistent buffers) by the parameter (or buffer) each comes from, and the names it does not write
    because they are tied to one it does (a tied lm_head)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())  # tied duplicates removed: the first name is kept
    every = set(dict(model.named_parameters(remove_duplicate=False)))
    state = model.state_dict()
    names = [k for k in state if k in params or k not in every]
    layout = {k: list(hf_layout.to_stored(model, {k: state[k]}).items()) for k in names}
    made_by: dict[str, str] = {}
    for k, stored in layout.items():  # each stored tensor must come from one parameter: export streams by parameter
        for key, _ in stored:
            if made_by.setdefault(key, k) != k:
                raise UsageError(f"export: {type(model).__name__} stores {key} from several parameters ({made_by[key]}, "
                                 f"{k}); exporting that layout one parameter at a time is not built")
    return model, layout, every - set(params)


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: str | None = None, fmt: str = "hf",
                      trust: bool = False, max_shard_size: str = "5GB") -> dict:
    """Write `out` (must not exist) from the complete checkpoint dir `ckpt`; returns the export report. DeepSpeed's
    consolidation unpickles its files: each must pass the weights-only loader first, unless `trust`.

    The HF format streams: DeepSpeed's lazy consolidation (`lazy_mode`: the optimizer files memory-mapped) gives
    one fp32 tensor at a time, masked, cast and written into shards of `max_shard_size` (shards.py), so the
    process holds about one tensor. The default dtype is the run's (bf16 for a bf16 run)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig

    from megatron_ast.export import shards

    ckpt, out = Path(ckpt), Path(out)
    if out.exists():
        raise UsageError(f"{out} already exists: pass a new --out")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if fmt != "hf":
        raise UsageError(f"--format {fmt}: compressed-tensors holds quantized models only (no current compressed-"
                         "tensors or vLLM loads a float 2:4 one): export with --format hf, then `megatron-ast quantize "
                         f"--format {FORMAT}` on that dir for W4A16")
    shard_bytes = shards.parse_size(max_shard_size)
    checkpoint.require_complete(ckpt, "export an earlier checkpoint")
    state = json.loads((ckpt / checkpoint.STATE).read_text())
    run = state["config"]
    src = run["init"] if run["init"] not in ("magnitude", "wanda") else run["model"]
    check_model_dir(src)
    pattern = SparsityPattern.parse(run["pattern"])
    checkpoint.check_pickles(ckpt, trust)
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
    masks = RankMasks(checkpoint.rank_files(ckpt))
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    target = DTYPES[dtype] if dtype else DTYPES.get(state.get("dtype", ""), None)
    if target is None:  # a checkpoint from before the run's dtype was recorded: the source model's
        target = getattr(config, "dtype", None) or torch.float32
        target = DTYPES.get(target, torch.float32) if isinstance(target, str) else target
    meta, layout, tied = _layout(config)
    names = list(layout)
    have = {k for k in sd if ".slorb." not in k}
    missing, unexpected = set(names) - have, have - set(names) - tied
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match {src}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    weights = {w.name: w for w in sparse_weights(meta)}
    mask_of = {w.name: w.module if w.module in masks.shapes else w.name for w in weights.values()}
    mask_of = {k: v for k, v in mask_of.items() if v in masks.shapes}  # parameter -> its mask's name in the run
    mask_layout = {name: list(hf_layout.to_stored(meta, {name: torch.empty(weights[name].shape, dtype=torch.bool,
                                                                              device="meta")}).items())
                   for name in mask_of}

    def masked(name: str) -> torch.Tensor:
        """A parameter as exported: the fp32 master, masked and checked for sparse weights."""
        t = sd[name].contiguous()
        if name in mask_of:
            t = t * masks.get(mask_of[name])
            w = weights[name]
            bad = nm_violations(w.matrices(t).reshape(-1, w.in_features), pattern.n, pattern.m)
            if bad:
                raise RuntimeError(f"{name}: {bad} groups are not {pattern} after masking")
        return t

    def make(key: str) -> torch.Tensor:
        """One stored tensor, cast to `target`, in the layout save_pretrained writes."""
        t = tensors.get(key)
        return t.to(target) if t.is_floating_point() else t

    tensors = _Stored(meta, {key: name for name in names for key, _ in layout[name]}, masked)
    adapter = _Adapter(sd, [m for m in masks.shapes if f"{m}.slorb.S" in sd])
    report = {"checkpoint": str(ckpt), "source_model": src, "pattern": str(pattern), "dtype": str(target), "format": fmt,
              "sparse_linears": len(masks.shapes), "all_valid": True, "slorb_adapter": ADAPTER_DIR if adapter else None,
              "slorb_params": sum(sd[f"{m}.slorb.S"].shape.numel() for m in adapter)}
    with atomic_dir(out) as tmp:
        specs = [(key, target if sd[k].dtype.is_floating_point else sd[k].dtype, tuple(t.shape))
                 for k in names for key, t in layout[k]]
        files = shards.write_sharded(tmp, specs, make, shard_bytes, {"format": "pt"}, desc=f"export {ckpt.name}")
        report["files"] = [f.name for f in files]
        config.dtype = target
        config.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file() and not (tmp / name).exists():
                shutil.copy2(Path(src) / name, tmp / name)
        stored_masks = _Stored(meta, {key: name for name, keys in mask_layout.items() for key, _ in keys},
                               lambda name: masks.get(mask_of[name]))
        shards.write_file(tmp / MASKS_FILE, [(key, torch.bool, tuple(t.shape)) for keys in mask_layout.values()
                                             for key, t in keys], stored_masks.get,
                          {"pattern": str(pattern), "method": f"{run['method']} (exported from {ckpt.name})",
                           "mask_layout": MASK_LAYOUT})
        if adapter:
            slorb_adapter.save(tmp / ADAPTER_DIR, adapter, target, out)
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"exported {ckpt} -> {out}: {len(masks.shapes)} sparse Linears, all {pattern}"
          + (f", SLoRB adapter in {ADAPTER_DIR}/" if adapter else ""), file=sys.stderr)
    return report

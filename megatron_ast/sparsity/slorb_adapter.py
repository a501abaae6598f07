"""SLoRB on disk: a PEFT LoRA adapter (`slorb_adapter/` beside the 2:4 base weights), written and read here.

A run with SLoRB is the 2:4 base plus this branch: y = (W*M) x + S (P x). On disk
it is a LoRA adapter with A = P (d/k x d), B = S (N x d/k) and scaling 1 (alpha = r
per module), so `peft.PeftModel.from_pretrained(base, DIR / "slorb_adapter")`
loads it with no project code. `attach_` reads it back onto a loaded base as
SLoRB branches (no peft needed), computing exactly what the trainer computes: a
frozen group projection is recognised and applied as a reshape-and-sum.
Everything that measures or transforms an exported dir loads it when present
(modeling.load_causal_lm).
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from megatron_ast.errors import UsageError
from megatron_ast.sparsity.slorb import SLoRB
from megatron_ast.sparsity.sparse_linear import SparseLinear

ADAPTER_DIR = "slorb_adapter"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def adapter_dir(model_dir: str | Path) -> Path | None:
    """`model_dir/slorb_adapter` when the dir has one."""
    d = Path(model_dir) / ADAPTER_DIR
    return d if (d / CONFIG).is_file() else None


def used(model_dir: str | Path, wanted: bool) -> str | None:
    """The adapter dir a measurement of `model_dir` loads (for reports): its adapter when it has one and `wanted`."""
    found = adapter_dir(model_dir)
    return str(found) if found is not None and wanted else None


def save(out_dir: Path, loras: Mapping[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype, base: Path) -> int:
    """Write `out_dir` (created) from {Linear name: (A, B)}; returns the bytes of its tensors. `loras` may make each
    pair when asked (export's does): the file is written one tensor at a time, so only one pair is held."""
    from megatron_ast.export.shards import write_file

    out_dir.mkdir()
    specs, ranks = [], {}
    for module in loras:  # shapes first (the header), each pair made and dropped
        a, b = loras[module]
        ranks[module] = int(a.shape[0])
        specs += [(f"base_model.model.{module}.lora_A.weight", dtype, tuple(a.shape)),
                  (f"base_model.model.{module}.lora_B.weight", dtype, tuple(b.shape))]
    held: dict = {}

    def make(key: str) -> torch.Tensor:
        module, part = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
        if held.get("module") != module:
            held.update(module=module, pair=loras[module])
        return held["pair"][0 if part.startswith("A") else 1].detach().to(dtype).contiguous()

    write_file(out_dir / WEIGHTS, specs, make, {"format": "pt"})
    (out_dir / CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(base).resolve()),
        "target_modules": sorted(ranks), "r": max(ranks.values()), "lora_alpha": max(ranks.values()),
        "rank_pattern": ranks, "alpha_pattern": ranks,  # alpha = r per module: scaling 1, y = W x + S (P x)
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True}, indent=2) + "\n")
    return sum(math.prod(shape) * torch.empty(0, dtype=dtype).element_size() for _, _, shape in specs)


def read(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{Linear name: (A, B * scaling)} from an adapter dir in the layout `save` writes."""
    from safetensors.torch import load_file

    cfg = json.loads((path / CONFIG).read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("bias", "none") != "none" or cfg.get("fan_in_fan_out"):
        raise UsageError(f"{path / CONFIG} is not a plain LoRA adapter (peft_type LORA, no bias): re-export the run")
    sd = load_file(str(path / WEIGHTS))
    out = {}
    for key, a in sd.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = sd.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise UsageError(f"{path / WEIGHTS}: {module} has lora_A but no lora_B: re-export the run")
        r = cfg.get("rank_pattern", {}).get(module, cfg["r"])
        alpha = cfg.get("alpha_pattern", {}).get(module, cfg["lora_alpha"])
        out[module] = (a, b * (alpha / r))
    if not out:
        raise UsageError(f"{path / WEIGHTS} holds no LoRA weights: re-export the run")
    return out


def attach_(model: nn.Module, path: Path) -> int:
    """Put the adapter at `path` onto `model`'s Linears as SLoRB branches; returns the branches' parameters."""
    count = 0
    dtype = next(model.parameters()).dtype
    for module, (a, b) in read(path).items():
        try:
            linear = model.get_submodule(module)
        except AttributeError:
            raise UsageError(f"{path} targets {module}, which this model does not have: "
                             "load the adapter onto the model it was exported with") from None
        if type(linear) is not nn.Linear or tuple(b.shape[:1]) + tuple(a.shape[1:]) != tuple(linear.weight.shape):
            raise UsageError(f"{path}: {module}'s adapter does not fit its {type(linear).__name__}: "
                             "load the adapter onto the model it was exported with")
        linear.__class__ = SparseLinear
        linear.mask = None  # the stored weights are already W*M
        linear.slorb = SLoRB.from_lora(a.to(dtype), b.to(dtype)).to(linear.weight.device)
        count += b.numel()
    return count


def detach_(model: nn.Module) -> dict[str, SLoRB]:
    """Take every SLoRB branch off `model` (its Linears become plain again); returns them by Linear name."""
    out = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, SparseLinear) and mod.slorb is not None and mod.mask is None:
            out[name] = mod.slorb
            del mod.slorb, mod.mask
            mod.__class__ = nn.Linear
    return out

"""Sequential, layer-by-layer one-shot pruning of a Hugging Face causal LM.

The calibration batch runs through the embeddings once, stopping at the first
decoder layer; then each layer in turn is moved to the device, its Linears'
input moments are collected (dense pass), its Linears are pruned, and the
calibration activations are pushed through the *pruned* layer to become the
next layer's inputs. Only one decoder layer and the activations are on the
device at a time.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from megatron_ast.errors import UsageError
from megatron_ast.pruning.architectures import (architecture_of, is_conv1d, prunable_linears,
                                                set_weight_out_in, weight_out_in)
from megatron_ast.pruning.hessian import InputHessians, reconstruction_error
from megatron_ast.pruning.sparsegpt import SCOPES, sparsegpt
from megatron_ast.pruning.sparsellm import FfnRecorder, sparsellm_ffn
from megatron_ast.sparsity import SparsityPattern, mask_from_score, magnitude_score, nm_violations, wanda_score
from megatron_ast.sparsity.slorb import expand_s, fit_s
from megatron_ast.sparsity.validate import sparsity_of

METHODS = ("magnitude", "wanda", "sparsegpt", "sparsellm")


@dataclass
class SparseLLMConfig:
    rounds: int = 4
    alpha: float = 5.0
    beta: float = 5.0
    gamma: float = 5.0
    s_steps: int = 5  # Gauss-Newton steps on s per round (s has no closed form)


@dataclass
class PruneConfig:
    method: str
    pattern: SparsityPattern
    blocksize: int = 128
    damp: float = 0.01
    device: str = "cpu"
    sparsellm: SparseLLMConfig = field(default_factory=SparseLLMConfig)
    prune_head: bool = False  # lm_head, by `method` (SparseGPT for sparsellm) on the final hidden states
    prune_embeddings: bool = False  # the input embedding, by magnitude (its inputs are one-hot)
    scope: str = "row"  # SparseGPT's unstructured threshold: per "row" or per 128-column "block" (pruning/sparsegpt.py)
    slorb_group: int | None = None  # also fit a SLoRB branch per decoder Linear (sparsity/slorb.py: fit_s)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.slorb_group is not None and self.slorb_group < 1:
            raise UsageError(f"--slorb-group must be >= 1, got {self.slorb_group}")
        if self.slorb_group is not None and self.method == "magnitude":
            raise UsageError("--slorb-group fits the branch on calibration inputs: use --method wanda, sparsegpt "
                             "or sparsellm with --calib")
        if self.scope not in SCOPES:
            raise UsageError(f"unknown --scope {self.scope!r}: choose one of {', '.join(SCOPES)}")


class _Captured(Exception):
    pass


def _capture_inputs(model: nn.Module, first_layer: nn.Module, calib: torch.Tensor, device: str):
    """Hidden states entering the first decoder layer for every sample, plus the layer's other arguments."""
    hidden, extra = [], {}

    def hook(module, args, kwargs):
        hidden.append(args[0].detach())
        extra.setdefault("args", args[1:])
        extra.setdefault("kwargs", kwargs)
        raise _Captured

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in calib:
            try:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return torch.cat(hidden), extra["args"], extra["kwargs"]


def _layer_forward(layer: nn.Module, x: torch.Tensor, args, kwargs) -> torch.Tensor:
    out = layer(x.unsqueeze(0), *args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out)[0]


def _outside_layers_to(model: nn.Module, layers_path: str, device: str,
                       dtype: torch.dtype | dict[int, torch.dtype]) -> dict[int, torch.dtype]:
    """Move everything but the decoder layers (embeddings, rotary tables, final norm) to `device`, the floating
    parameters in `dtype` (or back to each one's own, a dict this returned: a bf16 checkpoint may keep an fp32
    norm); buffers such as rotary tables keep their dtype. Returns the parameters' dtypes before the move."""
    parent_path, _, attr = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layers = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList())
    before = {}
    try:
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) not in before:  # a tied weight is moved once
                    before[id(p)] = p.dtype
                    to = (dtype.get(id(p), p.dtype) if isinstance(dtype, dict) else dtype) if p.is_floating_point() else p.dtype
                    p.data = p.data.to(device, to)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = b.to(device)
    finally:
        setattr(parent, attr, layers)
    return before


class InMemoryLayers:
    """Where walk_layers gets each decoder layer: here, the model's own, moved to `device` in fp32 for its turn
    and back to the CPU in the model's dtype after (pruning/streamed.py reads and writes files instead)."""

    def __init__(self, device: str, dtype: torch.dtype):
        self.device, self.dtype = device, dtype

    def load(self, i: int, layer: nn.Module) -> None:
        layer.to(self.device).float()

    def release(self, i: int, layer: nn.Module) -> None:
        layer.to("cpu").to(self.dtype)


def validate_shapes(model: nn.Module, pattern: SparsityPattern, slorb_group: int | None = None) -> None:
    arch = architecture_of(model)
    for i, layer in enumerate(arch.layers(model)):
        for name, mod in prunable_linears(layer).items():
            in_f = weight_out_in(mod).shape[1]
            pattern.check_shape(in_f, f"{arch.layers_path}.{i}.{name}")
            if slorb_group and is_conv1d(mod):
                raise UsageError(f"--slorb-group: {arch.layers_path}.{i}.{name} is a GPT-2 Conv1D, which a "
                                 "LoRA adapter cannot target: prune without --slorb-group")
            if slorb_group and in_f % slorb_group:
                raise UsageError(f"{arch.layers_path}.{i}.{name} has {in_f} inputs, not a multiple of "
                                 f"--slorb-group {slorb_group}: choose a group that divides it")


def _prune_linear(method: str, w: torch.Tensor, h: torch.Tensor | None, cfg: PruneConfig):
    if method == "magnitude":
        keep = mask_from_score(magnitude_score(w), cfg.pattern)
        return w * keep, keep
    if method == "wanda":
        keep = mask_from_score(wanda_score(w, torch.diag(h)), cfg.pattern)
        return w * keep, keep
    return sparsegpt(w, h, cfg.pattern, cfg.blocksize, cfg.damp, cfg.scope)


def model_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def walk_layers(model: nn.Module, calib: torch.Tensor | None, device: str, desc: str, visit,
                record_ffn: bool = False, after=None, layers_io=None) -> torch.Tensor | None:
    """The sequential pass: per decoder layer, collect its Linears' input moments on the dense layer,
    `visit(i, layer, linears, hessians, ffn_io)` (which may change the layer), then push the calibration
    activations through the changed layer, then `after(i, layer)` when given. Everything runs in fp32 on
    `device`; `layers_io` (default InMemoryLayers) brings each layer there and takes it away. Returns the
    last layer's outputs (None without `calib`)."""
    arch = architecture_of(model)
    layers = arch.layers(model)
    home = model_dtype(model)
    layers_io = layers_io or InMemoryLayers(device, home)
    model.eval()
    inps = None
    with torch.no_grad():
        if calib is not None:
            own = _outside_layers_to(model, arch.layers_path, device, torch.float32)
            inps, args, kwargs = _capture_inputs(model, layers[0], calib, device)
            _outside_layers_to(model, arch.layers_path, "cpu", own)
        # shown in a log file too (a bar redrawn at most every 5 s): minutes of silence look like a hang
        for i, layer in enumerate(tqdm(layers, desc=desc, file=sys.stderr, mininterval=0 if sys.stderr.isatty() else 5)):
            layers_io.load(i, layer)
            linears = prunable_linears(layer)
            hessians = ffn_io = None
            if calib is not None:
                hessians = InputHessians(layer, linears)
                ffn_io = FfnRecorder(layer, arch.ffn) if record_ffn else None
                for x in inps:
                    _layer_forward(layer, x, args, kwargs)
                hessians.remove()
                if ffn_io is not None:
                    ffn_io.remove()
            visit(i, layer, linears, hessians, ffn_io)
            if calib is not None:
                inps = torch.stack([_layer_forward(layer, x, args, kwargs) for x in inps])
            if after is not None:
                after(i, layer)
            layers_io.release(i, layer)
    return inps


def prune_model(model: nn.Module, cfg: PruneConfig, calib: torch.Tensor | None,
                branches: dict | None = None, layers_io=None) -> tuple[dict, list[dict]]:
    """Prune every decoder Linear of `model` in place; returns (masks by parameter name, per-Linear report).
    With `cfg.slorb_group`, `branches` gets each decoder Linear's fitted SLoRB S (by module name); the
    calibration pass then runs each pruned layer with its branches on, as the model will be used.
    `layers_io` (pruning/streamed.py) loads each layer and writes it away with its masks: the masks
    returned are then those it did not take (lm_head's, the embedding's)."""
    arch = architecture_of(model)
    validate_shapes(model, cfg.pattern, cfg.slorb_group)
    masks = layers_io.masks if layers_io is not None else {}
    report = []
    branches = {} if branches is None else branches
    pruned_weights = {}  # this layer's, while its branches are folded in for the calibration pass

    def fit_branch(i: int, name: str, mod: nn.Module, dense, new, h, row: dict) -> None:
        s = fit_s(dense - new, h, cfg.slorb_group, cfg.damp)
        folded = new + expand_s(s, cfg.slorb_group)
        row["slorb_residual_ratio"] = reconstruction_error(dense, folded, h) / max(row["reconstruction_error"], 1e-30)
        branches[f"{arch.layers_path}.{i}.{name}"] = s.cpu()
        pruned_weights[name] = new
        set_weight_out_in(mod, folded)

    def unfold(i: int, layer: nn.Module) -> None:
        for name, mod in prunable_linears(layer).items():
            if name in pruned_weights:
                set_weight_out_in(mod, pruned_weights.pop(name))
    needs_data = cfg.method != "magnitude"
    if needs_data and calib is None:
        raise UsageError(f"--method {cfg.method} needs calibration data: pass --calib")

    def visit(i, layer, linears, hessians, ffn_io) -> None:
        done = set()
        if ffn_io is not None:
            rows, info = sparsellm_ffn(layer, arch.ffn, ffn_io, hessians, cfg)
            if info["fallback_to_sparsegpt"]:
                print(f"sparsellm: layer {i} did not beat SparseGPT on its FFN output "
                      f"({info['ffn_error_sparsellm']:.4g} vs {info['ffn_error_sparsegpt']:.4g}); "
                      "kept the SparseGPT weights", file=sys.stderr)
            for name, (dense, new, keep, h) in rows.items():
                done.add(name)
                masks[f"{arch.layers_path}.{i}.{name}.weight"] = keep.cpu()
                report.append({**_row(f"{arch.layers_path}.{i}.{name}", dense, new, keep, h, cfg), "sparsellm": info})
                if cfg.slorb_group:
                    fit_branch(i, name, linears[name], dense, new, h, report[-1])
        for name, mod in linears.items():
            if name in done:
                continue
            dense = weight_out_in(mod).detach().float().clone()  # the layer is updated in place
            h = hessians.hessian(name) if hessians is not None else None
            new, keep = _prune_linear("sparsegpt" if cfg.method == "sparsellm" else cfg.method, dense, h, cfg)
            set_weight_out_in(mod, new)
            masks[f"{arch.layers_path}.{i}.{name}.weight"] = keep.cpu()
            report.append(_row(f"{arch.layers_path}.{i}.{name}", dense, new, keep, h, cfg))
            if cfg.slorb_group:
                fit_branch(i, name, mod, dense, new, h, report[-1])

    hidden = walk_layers(model, calib if needs_data else None, cfg.device, f"prune {cfg.method} {cfg.pattern}", visit,
                         record_ffn=cfg.method == "sparsellm", after=unfold if cfg.slorb_group else None,
                         layers_io=layers_io)
    with torch.no_grad():
        _prune_outside_layers(model, arch, cfg, hidden, masks, report)
    return masks, report


def _prune_outside_layers(model: nn.Module, arch, cfg: PruneConfig, hidden, masks: dict, report: list) -> None:
    """lm_head and/or the input embedding, when asked; with tied weights both are one tensor, pruned once."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    todo = []
    if cfg.prune_head and head is not None:
        todo.append(("lm_head", head))
    if cfg.prune_embeddings and not (tied and cfg.prune_head):
        todo.append(("embeddings", embed))
    names = {id(m): n for n, m in model.named_modules()}
    for what, module in todo:
        name = f"{names[id(module)]}.weight"
        cfg.pattern.check_shape(module.weight.shape[1], name)
        h = None
        if what == "lm_head" and hidden is not None:
            own = _outside_layers_to(model, arch.layers_path, cfg.device, torch.float32)
            h = torch.zeros(module.weight.shape[1], module.weight.shape[1], device=cfg.device)
            for x in hidden:
                x = arch.to_head(model, x.unsqueeze(0)).reshape(-1, h.shape[0]).float()
                h.addmm_(x.t(), x)
            h /= hidden.shape[0] * hidden.shape[1]
            _outside_layers_to(model, arch.layers_path, "cpu", own)
        method = cfg.method if what == "lm_head" else "magnitude"
        method = "sparsegpt" if method == "sparsellm" else method
        dense = module.weight.detach().float().clone()
        new, keep = _prune_linear(method, dense.to(cfg.device), h, cfg)
        module.weight.data.copy_(new.to(module.weight.dtype).cpu())
        masks[name] = keep.cpu()
        report.append({**_row(name, dense, new.cpu(), keep.cpu(), h.cpu() if h is not None else None, cfg),
                       "method": method, "tied": tied})


def _row(name: str, dense: torch.Tensor, new: torch.Tensor, keep: torch.Tensor, h, cfg: PruneConfig) -> dict:
    p = cfg.pattern
    return {
        "name": name,
        "shape": list(dense.shape),
        "sparsity": sparsity_of(new),
        "pattern_valid": (nm_violations(new, p.n, p.m) == 0) if p.structured
        else bool(((new != 0).sum(1) <= keep.shape[1] - round(p.sparsity * keep.shape[1])).all()),
        "reconstruction_error": reconstruction_error(dense, new, h) if h is not None else None,
    }

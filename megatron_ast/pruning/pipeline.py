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
from megatron_ast.pruning.hessian import ROUTINGS, InputHessians, reconstruction_error
from megatron_ast.pruning.sparsegpt import SCOPES, sparsegpt
from megatron_ast.pruning.sparsellm import FfnRecorder, find_ffns, sparsellm_ffn
from megatron_ast.sparsity import SparsityPattern, mask_from_score, magnitude_score, nm_violations, wanda_score
from megatron_ast.sparsity.slorb import expand_s, fit_s
from megatron_ast.sparsity.sparse_weights import SparseWeight, decoder_layers, layer_weights, sparse_weights, to_head
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
    ignore: tuple[str, ...] = ()  # regexes of parameter names left dense (sparsity/sparse_weights.py)
    expert_calibration: str = "routed"  # each expert's H from the tokens routed to it, or "all" tokens
    expert_min_tokens: int = 16  # an expert calibrated on fewer routed tokens is pruned by magnitude (counted)

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
        if self.expert_calibration not in ROUTINGS:
            raise UsageError(f"--expert-calibration {self.expert_calibration!r}: choose one of {', '.join(ROUTINGS)}")
        if self.expert_min_tokens < 0:
            raise UsageError(f"--expert-min-tokens must be >= 0, got {self.expert_min_tokens}")


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


def validate_shapes(model: nn.Module, pattern: SparsityPattern, slorb_group: int | None = None,
                    ignore: tuple[str, ...] = ()) -> list[SparseWeight]:
    """The model's sparse weights, each checked to take `pattern` (and SLoRB's group); returns them."""
    weights = sparse_weights(model, ignore)
    if not weights:
        raise UsageError(f"{type(model).__name__} has no sparse weight left to prune (--ignore {list(ignore)})")
    for w in weights:
        pattern.check_shape(w.in_features, w.name)
        if slorb_group and not w.is_linear:
            what = "a GPT-2 Conv1D" if not w.experts else "a fused expert weight"
            raise UsageError(f"--slorb-group: {w.name} is {what}, which a LoRA adapter cannot target: prune "
                             "without --slorb-group" + (" or --ignore the experts" if w.experts else ""))
        if slorb_group and w.in_features % slorb_group:
            raise UsageError(f"{w.module} has {w.in_features} inputs, not a multiple of "
                             f"--slorb-group {slorb_group}: choose a group that divides it")
    return weights


def _prune_linear(method: str, w: torch.Tensor, h: torch.Tensor | None, cfg: PruneConfig):
    if method == "magnitude":
        keep = mask_from_score(magnitude_score(w), cfg.pattern)
        return w * keep, keep
    if method == "wanda":
        keep = mask_from_score(wanda_score(w, torch.diag(h)), cfg.pattern)
        return w * keep, keep
    return sparsegpt(w, h, cfg.pattern, cfg.blocksize, cfg.damp, cfg.scope)


def _prune_weight(method: str, w: SparseWeight, dense: torch.Tensor, hessians, cfg: PruneConfig):
    """Prune one sparse weight, given as (matrices, out, in): each matrix (each expert) on its own inputs.
    Returns (pruned, keep, H or None, experts pruned by magnitude for want of routed tokens)."""
    if not w.experts:
        h = hessians.hessian(w.local) if hessians is not None else None
        new, keep = _prune_linear(method, dense[0], h, cfg)
        return new[None], keep[None], h, 0
    h = hessians.hessian(w.local) if hessians is not None else None
    tokens = hessians.tokens(w.local) if hessians is not None else None
    new, keep, fallback = torch.empty_like(dense), torch.empty(dense.shape, dtype=torch.bool, device=dense.device), 0
    for e in range(w.experts):
        starved = tokens is not None and int(tokens[e]) < max(1, cfg.expert_min_tokens)  # none routed: no H at all
        fallback += starved
        new[e], keep[e] = _prune_linear("magnitude" if starved or h is None else method, dense[e],
                                        None if starved or h is None else h[e], cfg)
    return new, keep, h, fallback


def model_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def walk_layers(model: nn.Module, calib: torch.Tensor | None, device: str, desc: str, visit,
                record_ffn: bool = False, after=None, layers_io=None, ignore: tuple[str, ...] = (),
                routing: str = "routed") -> torch.Tensor | None:
    """The sequential pass: per decoder layer, collect its sparse weights' input moments on the dense layer
    (each expert's from the tokens `routing` sends it), `visit(i, layer, weights, hessians, ffns)` (which may
    change the layer; `ffns`: SparseLLM's FFNs with their recorded inputs and outputs, when `record_ffn`),
    then push the calibration activations through the changed layer, then `after(i, layer)` when given.
    Everything runs in fp32 on `device`; `layers_io` (default InMemoryLayers) brings each layer there and
    takes it away. Returns the last layer's outputs (None without `calib`)."""
    path, layers = decoder_layers(model)
    home = model_dtype(model)
    layers_io = layers_io or InMemoryLayers(device, home)
    model.eval()
    inps = None
    with torch.no_grad():
        if calib is not None:
            own = _outside_layers_to(model, path, device, torch.float32)
            inps, args, kwargs = _capture_inputs(model, layers[0], calib, device)
            _outside_layers_to(model, path, "cpu", own)
        # shown in a log file too (a bar redrawn at most every 5 s): minutes of silence look like a hang
        for i, layer in enumerate(tqdm(layers, desc=desc, file=sys.stderr, mininterval=0 if sys.stderr.isatty() else 5)):
            layers_io.load(i, layer)
            weights = {w.local: w for w in layer_weights(layer, i, f"{path}.{i}", ignore)}
            hessians = ffns = None
            if calib is not None:
                hessians = InputHessians(layer, list(weights.values()), routing)
                ffns = [(ffn, FfnRecorder(layer, ffn)) for ffn in find_ffns(layer, weights)[0]] if record_ffn else None
                for x in inps:
                    _layer_forward(layer, x, args, kwargs)
                hessians.remove()
                for _, rec in ffns or ():
                    rec.remove()
            visit(i, layer, weights, hessians, ffns)
            if calib is not None:
                inps = torch.stack([_layer_forward(layer, x, args, kwargs) for x in inps])
            if after is not None:
                after(i, layer)
            layers_io.release(i, layer)
    return inps


def get_matrices(layer: nn.Module, w: SparseWeight) -> torch.Tensor:
    """A sparse weight of `layer` as a float32 (matrices, out, in) copy."""
    return w.matrices(layer.get_parameter(w.local).detach()).float().clone()


def set_matrices(layer: nn.Module, w: SparseWeight, value: torch.Tensor) -> None:
    """Write (matrices, out, in) `value` into the sparse weight, in its stored layout and dtype."""
    p = layer.get_parameter(w.local)
    w.out_in(p.data).copy_(value.reshape(w.out_in(p).shape).to(p.dtype))


def stored_mask(w: SparseWeight, keep: torch.Tensor) -> torch.Tensor:
    """A (matrices, out, in) mask as stored on disk: shaped like the parameter, True = kept."""
    return w.stored(keep.reshape(((w.experts,) if w.experts else ()) + (w.out_features, w.in_features))).contiguous()


def prune_model(model: nn.Module, cfg: PruneConfig, calib: torch.Tensor | None,
                branches: dict | None = None, layers_io=None) -> tuple[dict, list[dict]]:
    """Prune every sparse weight of `model` in place; returns (masks by parameter name, shaped like it, and a
    per-weight report). With `cfg.slorb_group`, `branches` gets each decoder Linear's fitted SLoRB S (by module
    name); the calibration pass then runs each pruned layer with its branches on, as the model will be used.
    `layers_io` (pruning/streamed.py) loads each layer and writes it away with its masks: the masks
    returned are then those it did not take (lm_head's, the embedding's)."""
    validate_shapes(model, cfg.pattern, cfg.slorb_group, cfg.ignore)
    masks = layers_io.masks if layers_io is not None else {}
    report = []
    branches = {} if branches is None else branches
    pruned_weights = {}  # this layer's, while its branches are folded in for the calibration pass
    sparsegpt_for = "sparsegpt" if cfg.method == "sparsellm" else cfg.method

    def fit_branch(layer: nn.Module, w: SparseWeight, dense, new, h, row: dict) -> None:
        s = fit_s(dense[0] - new[0], h, cfg.slorb_group, cfg.damp)
        folded = new + expand_s(s, cfg.slorb_group)
        row["slorb_residual_ratio"] = reconstruction_error(dense[0], folded[0], h) / max(row["reconstruction_error"], 1e-30)
        branches[w.module] = s.cpu()
        pruned_weights[w.local] = new
        set_matrices(layer, w, folded)

    def unfold(i: int, layer: nn.Module) -> None:
        for local in list(pruned_weights):
            set_matrices(layer, _weights[local], pruned_weights.pop(local))
    needs_data = cfg.method != "magnitude"
    if needs_data and calib is None:
        raise UsageError(f"--method {cfg.method} needs calibration data: pass --calib")
    _weights: dict[str, SparseWeight] = {}
    if cfg.method == "sparsellm":
        found = [find_ffns(layer) for layer in decoder_layers(model)[1]]
        if not any(ffns for ffns, _ in found):
            why = next((r for _, why in found for r in why.values()), "no gate/up/down or fc1/fc2 Linears")
            raise UsageError(f"sparsellm: no FFN of this {type(model).__name__} is one its solve handles ({why}): "
                             "use --method sparsegpt")

    def record(w: SparseWeight, dense, new, keep, h, fallback: int = 0, extra: dict | None = None) -> dict:
        masks[w.name] = stored_mask(w, keep).cpu()
        row = {**_row(w, dense, new, keep, h, cfg), **(extra or {})}
        if w.experts:
            row["experts_magnitude_fallback"] = fallback
        report.append(row)
        return row

    def visit(i, layer, weights, hessians, ffns) -> None:
        _weights.clear()
        _weights.update(weights)
        done = set()
        if ffns is not None:
            why_not = find_ffns(layer, weights)[1]
            for ffn, rec in ffns:
                rows, info = sparsellm_ffn(layer, ffn, rec, hessians, cfg)
                if info["fallback_to_sparsegpt"]:
                    print(f"sparsellm: layer {i} did not beat SparseGPT on its FFN {ffn.down.rpartition('.')[0] or 'fc'}"
                          f" output ({info['ffn_error_sparsellm']:.4g} vs {info['ffn_error_sparsegpt']:.4g}); "
                          "kept the SparseGPT weights", file=sys.stderr)
                for local, (dense, new, keep, h) in rows.items():
                    w = weights[local]
                    done.add(local)
                    row = record(w, dense[None], new[None], keep[None], h, extra={"sparsellm": info})
                    if cfg.slorb_group:
                        fit_branch(layer, w, dense[None], new[None], h, row)
        else:
            why_not = {}
        for local, w in weights.items():
            if local in done:
                continue
            dense = get_matrices(layer, w)  # the layer is updated in place
            new, keep, h, fallback = _prune_weight(sparsegpt_for, w, dense, hessians, cfg)
            set_matrices(layer, w, new)
            extra = {"sparsellm": {"not_run": why_not[local]}} if local in why_not else None
            row = record(w, dense, new, keep, h, fallback, extra)
            if cfg.slorb_group:
                fit_branch(layer, w, dense, new, h, row)

    path = decoder_layers(model)[0]
    hidden = walk_layers(model, calib if needs_data else None, cfg.device, f"prune {cfg.method} {cfg.pattern}", visit,
                         record_ffn=cfg.method == "sparsellm", after=unfold if cfg.slorb_group else None,
                         layers_io=layers_io, ignore=cfg.ignore, routing=cfg.expert_calibration)
    with torch.no_grad():
        _prune_outside_layers(model, path, cfg, hidden, masks, report)
    return masks, report


def summary(rows: list[dict]) -> dict[str, dict]:
    """Per kind of weight (attention, linear_attention, mlp, shared_expert, routed_expert, head): how many
    weights and matrices (experts one by one), their elements, sparsity and experts pruned by magnitude."""
    out: dict[str, dict] = {}
    for r in rows:
        c = out.setdefault(r["kind"], {"weights": 0, "matrices": 0, "elements": 0, "zeros": 0,
                                       "experts_magnitude_fallback": 0})
        c["weights"] += 1
        c["matrices"] += r.get("experts", 1)
        c["elements"] += r["elements"]
        c["zeros"] += round(r["sparsity"] * r["elements"])
        c["experts_magnitude_fallback"] += r.get("experts_magnitude_fallback", 0)
    for c in out.values():
        c["sparsity"] = c.pop("zeros") / max(1, c["elements"])
    return out


def _prune_outside_layers(model: nn.Module, layers_path: str, cfg: PruneConfig, hidden, masks: dict,
                          report: list) -> None:
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
            own = _outside_layers_to(model, layers_path, cfg.device, torch.float32)
            h = torch.zeros(module.weight.shape[1], module.weight.shape[1], device=cfg.device)
            for x in hidden:
                x = to_head(model, x.unsqueeze(0)).reshape(-1, h.shape[0]).float()
                h.addmm_(x.t(), x)
            h /= hidden.shape[0] * hidden.shape[1]
            _outside_layers_to(model, layers_path, "cpu", own)
        method = cfg.method if what == "lm_head" else "magnitude"
        method = "sparsegpt" if method == "sparsellm" else method
        dense = module.weight.detach().float().clone()
        new, keep = _prune_linear(method, dense.to(cfg.device), h, cfg)
        module.weight.data.copy_(new.to(module.weight.dtype).cpu())
        masks[name] = keep.cpu()
        w = SparseWeight(name, name, -1, "head", tuple(module.weight.shape), False)
        report.append({**_row(w, dense[None], new.cpu()[None], keep.cpu()[None], h.cpu() if h is not None else None,
                              cfg), "method": method, "tied": tied})


def _row(w: SparseWeight, dense: torch.Tensor, new: torch.Tensor, keep: torch.Tensor, h, cfg: PruneConfig) -> dict:
    """One weight's line of the report; `dense`, `new`, `keep` as (matrices, out, in), `h` (in, in) or per matrix."""
    p = cfg.pattern
    flat_new, flat_keep = new.reshape(-1, new.shape[-1]), keep.reshape(-1, keep.shape[-1])
    if h is None:
        err = None
    else:
        hs = h if h.dim() == 3 else h[None]
        errs = [reconstruction_error(dense[e], new[e], hs[e].to(dense.device)) for e in range(dense.shape[0])
                if float(hs[e].diagonal().sum()) > 0]  # an expert no token reached has no error to report
        err = sum(errs) / len(errs) if errs else None
    return {
        "name": w.name,
        "kind": w.kind,
        "shape": [w.out_features, w.in_features],
        "stored_shape": list(w.shape),
        **({"experts": w.experts} if w.experts else {}),
        **({"transposed": True} if w.transposed else {}),
        "elements": w.numel,
        "sparsity": sparsity_of(new),
        "pattern_valid": (nm_violations(flat_new, p.n, p.m) == 0) if p.structured
        else bool(((flat_new != 0).sum(1) <= flat_keep.shape[1] - round(p.sparsity * flat_keep.shape[1])).all()),
        "reconstruction_error": err,
    }

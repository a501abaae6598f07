"""Masks beside the ZeRO-3 partitions they mask: the sparse hooks of the optimizer step.

Rank r stores elements [r*ps, r*ps + ps) of every weight (ps: the partition size)
and, here, the mask of exactly those elements, a plain local bool tensor: no rank
ever holds or gathers a full mask. DeepSpeed keeps two copies of each partition:
the fp32 master (what the optimizer updates) and the bit16/working partition (what
ZeRO-3 gathers for forward and backward; a separate tensor even in fp32 runs).
Installed into the ZeRO-3 optimizer's `step`, after every update this module
overwrites the working partition with master * M. So the forward computes with
W*M, its gradient (taken w.r.t. W*M) is applied to the dense master: the
straight-through estimator, with no mask gathered and no W*M formed in the forward.

DeepSpeed hands the client optimizer one flat fp32 partition per sub-group (the
concatenation of its parameters' partitions); this module builds the matching
flat (1 - M) indicator for the SR-STE decay (training/sr_ste.py), and recomputes
the masks from the fp32 master partitions.

A masked weight is a Linear's (out, in) weight or a fused expert parameter
(sparsity/sparse_weights.py): [experts, out, in], whose N:M groups are M consecutive
flat elements as a Linear's are, or [experts, in, out] (gpt-oss), whose groups run down
a column: M elements `out` apart, inside blocks of M rows. Either way a block of
M * stride consecutive elements (stride 1, or `out`) holds whole groups.

A partition boundary can cut a block (ps need not be a multiple of it): every rank
all-gathers the M * stride - 1 boundary elements of its neighbours, so each block cut by
a boundary is completed on both sides and both ranks compute the same decision for it;
nothing else crosses ranks but the flip counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ast import distributed
from megatron_ast.errors import DeepSpeedMismatch, UsageError
from megatron_ast.sparsity.masks import nm_mask
from megatron_ast.sparsity.sparse_linear import SparseLinear
from megatron_ast.sparsity.sparse_weights import sparse_weights


@dataclass
class _Masked:
    name: str  # a Linear's module name, or a fused expert parameter's name
    param: torch.nn.Parameter
    module: torch.nn.Module  # what computes with it (Wanda's input hooks)
    group: int  # sub-group index
    offset: int  # offset of this weight's partition inside the sub-group's flat fp32 partition
    start: int  # global flat index of this rank's first element
    valid: int  # elements of this rank's partition that are real (the rest is padding)
    shape: tuple[int, ...]
    in_features: int
    stride: int  # flat distance between the members of an N:M group: 1, or `out` for a weight stored (in, out)


def masked_parameters(model) -> dict[str, tuple[str, int, int]]:
    """{mask name: (parameter name, in_features, stride)} of what AST may mask: a Linear by its module name
    (SparseLinear's), a fused expert parameter by its own."""
    out = {}
    for w in sparse_weights(model):
        if w.is_linear:
            out[w.module] = (w.name, w.in_features, 1)
        elif w.experts:
            out[w.name] = (w.name, w.in_features, w.out_features if w.transposed else 1)
    return out


def local_mask(mask: torch.Tensor, weight) -> torch.Tensor:
    """This rank's slice of a full `mask` for the ZeRO-3 partitioned `weight` (flat, bool, padding cut off)."""
    ps = weight.partition_numel()
    start = dist.get_rank() * ps
    return mask.reshape(-1)[start : start + ps].bool().clone()


class PartitionedMasks:
    def __init__(self, engine, local: dict[str, torch.Tensor], n: int = 2, m: int = 4, score: str = "magnitude"):
        """`local`: per masked weight (`masked_parameters`' names), this rank's mask slice (`local_mask`), made
        before deepspeed.initialize, or None: the magnitude mask, made here from the fp32 master partitions."""
        self.engine, self.n, self.m, self.score = engine, n, m, score
        self.zero = engine.optimizer
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        _check_zero3(self.zero)
        # masks live beside the fp32 master (the CPU under ZeRO-Offload); collectives go through `distributed`
        self.device = self.zero.fp32_partitioned_groups_flat[0].device
        model = engine.module
        known = masked_parameters(model)
        if unknown := sorted(set(local) - set(known)):
            raise ValueError(f"masks given for {unknown[:3]}..., which are not the engine's sparse weights")
        owner = {}
        for name in local:
            pname, in_features, stride = known[name]
            module = model.get_submodule(pname.rpartition(".")[0])
            if name != pname and not isinstance(module, SparseLinear):
                raise ValueError(f"{name} is a {type(module).__name__}: sparsify it first (sparsify_zero3_)")
            owner[id(model.get_parameter(pname))] = (name, module, in_features, stride)
        self.items: list[_Masked] = []
        for g, params in enumerate(self.zero.fp16_groups):
            offset = 0
            for p in params:
                ps = p.partition_numel()
                if id(p) in owner:
                    name, mod, in_features, stride = owner[id(p)]
                    if ps < m * stride:
                        raise UsageError(f"{name}: a ZeRO-3 partition of {ps} elements is smaller than one block of "
                                         f"{m} x {stride} elements its N:M groups span: train on fewer ranks")
                    start = self.rank * ps
                    self.items.append(_Masked(name, p, mod, g, offset, start, max(0, min(ps, p.ds_numel - start)),
                                              tuple(p.ds_shape), in_features, stride))
                offset += ps
        if {it.name for it in self.items} != set(local):
            raise ValueError(f"masks given for {sorted(set(local) ^ {it.name for it in self.items})[:3]}..., "
                             "which the optimizer does not step")
        self._check_items()
        self.local = {it.name: local[it.name][: it.valid].to(self.device) if local[it.name] is not None
                      else torch.ones(it.valid, dtype=torch.bool, device=self.device) for it in self.items}
        if made_here := {it.name for it in self.items if local[it.name] is None}:  # the same on every rank
            for _, it, window, a in self._windows():  # magnitude from the master partitions, nothing gathered
                if it.name in made_here:
                    self.local[it.name].copy_(self._nm(it, window.abs())[a : a + it.valid])
        self.input_sq = {}  # Wanda: running sum of x_j^2 per masked Linear, where the forward runs (no host sync)
        if score == "wanda":
            if experts := [it.name for it in self.items if len(it.shape) == 3]:
                raise UsageError(f"mask_score wanda: {experts[0]} is a fused expert weight, whose per-expert input "
                                 "norms are not kept in training: use mask_score magnitude, or `ignore` the experts")
            for it in self.items:
                self.input_sq[it.name] = torch.zeros(it.in_features, device=it.param.device)
                it.module.register_forward_pre_hook(self._record_inputs(it.name))
        self.initial = {it.name: self._local_mask(it).clone() for it in self.items}
        self._persistent = [it.param for it in self.items if getattr(it.param, "ds_persist", False)]
        self._install()
        self._masks_changed()

    def _check_items(self) -> None:
        """The masked weights' working partitions are where the flat buffers say, and apart from the master."""
        flats16 = getattr(self.zero, "fp16_partitioned_groups_flat", None)
        for it in self.items:
            work, master = it.param.ds_tensor, self.zero.fp32_partitioned_groups_flat[it.group]
            if work.untyped_storage().data_ptr() == master.untyped_storage().data_ptr():
                raise DeepSpeedMismatch(f"the working partition of {it.name} shares memory with its fp32 master, so "
                                        "masking the working copy would zero the master's pruned weights")
            flat16 = flats16[it.group] if flats16 is not None else None
            if torch.is_tensor(flat16) and flat16.numel() and \
                    work.data_ptr() != flat16.data_ptr() + it.offset * flat16.element_size():
                raise DeepSpeedMismatch(f"{it.name}'s working partition is not at offset {it.offset} of its "
                                        "sub-group's flat buffer, where the partition sizes put it")

    def _install(self) -> None:
        """Wrap the ZeRO-3 optimizer's step: after it copies the fp32 master into the working partitions,
        mask them. Every path that steps (engine.step, any accumulation) then leaves W*M behind."""
        if not self.items:
            return
        step = self.zero.step
        self.zero.optimizer.check_each_step = False  # ZeRO-3 steps one sub-group per call: checked per ZeRO step

        def step_then_mask(*args, **kwargs):
            out = step(*args, **kwargs)
            self.zero.optimizer.check_stepped()
            self.apply()
            return out

        self.zero.step = step_then_mask

    @torch.no_grad()
    def apply(self) -> None:
        """Working partition = fp32 master * M, for every masked weight (pruned master values are kept,
        so a weight whose mask flips back on returns with its trained value)."""
        for it in self.items:
            work = it.param.ds_tensor.data[: it.valid]
            torch.mul(self._fp32(it).to(work.device, non_blocking=True),
                      self._local_mask(it).to(work.device, non_blocking=True), out=work)
        if self._persistent:  # small ("persistent") weights stay gathered between steps: refresh the full copies
            self._persistent[0].partition(param_list=self._persistent, has_been_updated=False)
            self._persistent[0].all_gather(param_list=self._persistent)

    # --- views --------------------------------------------------------------------------------
    def _local_mask(self, it: _Masked) -> torch.Tensor:
        return self.local[it.name]

    def _fp32(self, it: _Masked) -> torch.Tensor:
        flat = self.zero.fp32_partitioned_groups_flat[it.group]
        return flat.data[it.offset : it.offset + it.valid]

    def refresh_indicators(self) -> None:
        """Give the optimizer the flat indicator of every sub-group: 1 - M on masked weights, -1 elsewhere."""
        for g, flat in enumerate(self.zero.fp32_partitioned_groups_flat):
            mine = [it for it in self.items if it.group == g]
            ind = torch.full(flat.shape, -1, dtype=torch.int8, device=flat.device) if mine else None  # None: plain AdamW
            for it in mine:
                ind[it.offset : it.offset + it.valid] = ~self._local_mask(it)
            self.zero.optimizer.set_pruned(flat, ind)

    def _record_inputs(self, name: str):
        def hook(module, args):
            if module.training:
                x = args[0].detach()
                self.input_sq[name] += (x.reshape(-1, x.shape[-1]).float() ** 2).sum(0).to(self.input_sq[name].device)
        return hook

    # --- recompute ------------------------------------------------------------------------------
    def _windows(self):
        """(index, item, window of fp32 values completed to whole blocks of N:M groups, offset a of the partition in
        it). Each rank sends its neighbours, point to point, the first and last k = M * stride - 1 elements of each
        partition: all a cut block needs, since a block spans at most two partitions (ps >= M * stride). Fragments
        are k long on every rank (a shorter last partition pads its head after, its tail before, its real values),
        so the ranks agree on where each item's fragment sits; what a neighbour needs of one is always real."""
        sizes = [self.m * it.stride - 1 for it in self.items]
        heads, tails = [], []
        for it, k in zip(self.items, sizes):
            w, n = self._fp32(it), min(k, it.valid)
            head, tail = torch.zeros(k, device=self.device), torch.zeros(k, device=self.device)
            head[:n], tail[k - n :] = w[:n].float().to(self.device), w[it.valid - n : it.valid].float().to(self.device)
            heads.append(head)
            tails.append(tail)
        empty = torch.zeros(0, device=self.device)
        prev_tail, next_head = distributed.neighbour_exchange(torch.cat(heads) if heads else empty,
                                                              torch.cat(tails) if tails else empty)
        at = 0
        for i, (it, k) in enumerate(zip(self.items, sizes)):
            lo, at = at, at + k
            if it.valid == 0:
                continue
            block = self.m * it.stride
            s, e = it.start, it.start + it.valid
            a, b = s % block, (-e) % block
            if not a and not b:  # no block cut: the partition itself, no copy
                yield i, it, self._fp32(it).float(), 0
                continue
            parts = []
            if a:
                parts.append(prev_tail[lo : lo + k][k - a :])  # the end of the previous rank's partition
            parts.append(self._fp32(it).float())
            if b:
                parts.append(next_head[lo : lo + k][:b])  # the start of the next rank's
            yield i, it, torch.cat(parts), a

    def _nm(self, it: _Masked, score: torch.Tensor) -> torch.Tensor:
        """The N:M mask of a window of whole blocks (flat): groups of M consecutive elements, or M elements
        `stride` apart inside each block of M rows."""
        if it.stride == 1:
            return nm_mask(score.view(1, -1), self.n, self.m).view(-1)
        rows = score.view(-1, self.m, it.stride).transpose(1, 2).reshape(-1, self.m)
        return nm_mask(rows, self.n, self.m).view(-1, it.stride, self.m).transpose(1, 2).reshape(-1)

    def _score(self, it: _Masked, window: torch.Tensor, a: int) -> torch.Tensor:
        score = window.abs()
        if self.score == "wanda":
            cols = (torch.arange(it.start - a, it.start - a + window.numel(), device=score.device) // it.stride) \
                % it.in_features
            score = score * self.input_sq[it.name].to(score.device).sqrt()[cols]
        return score

    def _ramp_thresholds(self, fraction: float) -> dict[str, float]:
        """Per Linear, the score below which a pruning candidate is pruned at `fraction` of the ramp.

        Candidates are the M-N lowest of each group; each rank takes the `fraction` quantile of its
        own candidates and the ranks average them, so all ranks apply one threshold per Linear."""
        local = torch.zeros(len(self.items), 2, dtype=torch.float64, device=self.device)
        for i, it, window, a in self._windows():
            score = self._score(it, window, a)
            keep = self._nm(it, score)
            cand = score[a : a + it.valid][~keep[a : a + it.valid]]
            if cand.numel():
                kth = cand.kthvalue(max(1, round(fraction * cand.numel()))).values
                local[i, 0], local[i, 1] = kth.double(), 1.0
        distributed.all_reduce_(local)
        return {it.name: float(local[i, 0] / local[i, 1].clamp_min(1)) for i, it in enumerate(self.items)}

    @torch.no_grad()
    def recompute(self, fraction: float = 1.0) -> dict:
        """New masks from the updated fp32 master partitions; returns flip rates (all ranks agree).

        `fraction` < 1 prunes only that share of each group's M-N candidates (gradual pruning's ramp):
        the lowest-scoring ones, by one threshold per Linear. 1 gives exact N:M."""
        if self.score == "wanda":
            for name in sorted(self.input_sq):
                distributed.all_reduce_(self.input_sq[name])
        thresholds = self._ramp_thresholds(fraction) if 0 < fraction < 1 else None
        changed_prev = changed_init = total = kept = 0
        for _, it, window, a in self._windows():
            score = self._score(it, window, a)
            new = self._nm(it, score)
            if fraction <= 0:
                new = torch.ones_like(new)
            elif thresholds is not None:
                new |= score > thresholds[it.name]
            new = new[a : a + it.valid]
            old = self._local_mask(it)
            changed_prev += int((new != old).sum())
            changed_init += int((new != self.initial[it.name]).sum())
            total += it.valid
            kept += int(new.sum())
            old.copy_(new)
        changed_prev, changed_init, total, kept = distributed.all_reduced([changed_prev, changed_init, total, kept])
        total = max(total, 1.0)
        self._masks_changed()
        if self.score == "wanda":
            for v in self.input_sq.values():
                v.zero_()
        return {"flip_rate_prev": changed_prev / total, "flip_rate_init": changed_init / total,
                "sparsity": 1.0 - kept / total}

    def _masks_changed(self) -> None:
        """After the local masks were written: the optimizer's indicators and the working partitions follow."""
        self.refresh_indicators()
        self.apply()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's slices of the current and initial masks, where they sit in the flat weight, and
        its Wanda sums (for checkpoints)."""
        out = {}
        for it in self.items:
            out[f"mask.{it.name}.current"] = self._local_mask(it).to(torch.uint8).cpu()
            out[f"mask.{it.name}.initial"] = self.initial[it.name].to(torch.uint8).cpu()
            out[f"mask.{it.name}.range"] = torch.tensor([it.start, it.valid], dtype=torch.int64)
            out[f"mask.{it.name}.shape"] = torch.tensor(it.shape, dtype=torch.int64)
        out.update({f"wanda.{name}": v.cpu() for name, v in self.input_sq.items()})
        return out

    @torch.no_grad()
    def load_rank_files(self, files: list) -> None:
        """Restore from every saving rank's `state_dict` file, saved on any world size: each rank reads
        only the slices overlapping its own partition. Wanda sums (all-reduced before use) go to rank 0."""
        from safetensors import safe_open

        handles = [safe_open(str(f), framework="pt") for f in files]
        for it in self.items:
            for kind, target in (("current", self._local_mask(it)), ("initial", self.initial[it.name])):
                for h in handles:
                    start, valid = h.get_tensor(f"mask.{it.name}.range").tolist()
                    lo, hi = max(start, it.start), min(start + valid, it.start + it.valid)
                    if lo < hi:
                        piece = h.get_slice(f"mask.{it.name}.{kind}")[lo - start : hi - start]
                        target[lo - it.start : hi - it.start] = piece.bool().to(target.device)
        for name, sq in self.input_sq.items():
            sq.copy_(sum(h.get_tensor(f"wanda.{name}") for h in handles) if self.rank == 0 else torch.zeros_like(sq))
        self._masks_changed()


def _check_zero3(zero) -> None:
    """What this module reads of DeepSpeed's ZeRO-3 optimizer, checked before it is relied on."""
    for attr in ("fp16_groups", "fp32_partitioned_groups_flat", "optimizer"):
        if not hasattr(zero, attr):
            raise DeepSpeedMismatch(f"its ZeRO-3 optimizer ({type(zero).__name__}) has no {attr}")
    if not hasattr(zero.optimizer, "set_pruned"):
        raise DeepSpeedMismatch(f"ZeRO-3 steps {type(zero.optimizer).__name__}, not the SR-STE AdamW it was given")
    if getattr(zero, "partial_offload", 1.0) != 1.0:  # the rest would step with DeepSpeed's own AdamW, not ours
        raise UsageError(f"offload_optimizer.ratio {zero.partial_offload}: AST offloads all of the optimizer or none")
    if len(zero.fp16_groups) != len(zero.fp32_partitioned_groups_flat):
        raise DeepSpeedMismatch(f"{len(zero.fp16_groups)} parameter sub-groups but "
                                f"{len(zero.fp32_partitioned_groups_flat)} flat fp32 partitions")
    flat16 = getattr(zero, "fp16_partitioned_groups_flat", None)
    for g, (params, flat) in enumerate(zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat)):
        parts = sum(p.partition_numel() for p in params)
        if parts != flat.numel():
            raise DeepSpeedMismatch(f"the partitions of sub-group {g} add up to {parts} elements, its flat fp32 "
                                    f"master has {flat.numel()}")
        if flat16 is not None and flat16[g] is not None and flat.numel() and \
                (flat is flat16[g] or flat.untyped_storage().data_ptr() == flat16[g].untyped_storage().data_ptr()):
            raise DeepSpeedMismatch(f"sub-group {g}'s fp32 master and its working partition are one tensor, so "
                                    "masking the working copy would zero the master's pruned weights")


class RankMasks:
    """The full masks of a checkpoint, assembled one Linear at a time from every rank's file (`state_dict`):
    `shapes` is read at once (a few bytes per Linear), each mask only when asked for (export streams them)."""

    def __init__(self, files: list, kind: str = "current"):
        from safetensors import safe_open

        self.kind = kind
        self.handles = [safe_open(str(f), framework="pt") for f in files]
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._ranges: dict[str, list[tuple[int, int, int]]] = {}  # name: (handle, start, valid)
        for i, h in enumerate(self.handles):
            for key in h.keys():
                if key.startswith("mask.") and key.endswith(".shape"):
                    name = key[len("mask.") : -len(".shape")]
                    self.shapes[name] = tuple(h.get_tensor(key).tolist())
                    start, valid = h.get_tensor(f"mask.{name}.range").tolist()
                    self._ranges.setdefault(name, []).append((i, start, valid))

    def get(self, name: str) -> torch.Tensor:
        full = torch.zeros(math.prod(self.shapes[name]), dtype=torch.bool)
        for i, start, valid in self._ranges[name]:
            full[start : start + valid] = self.handles[i].get_tensor(f"mask.{name}.{self.kind}").bool()
        return full.view(self.shapes[name])


def masks_from_rank_files(files: list, kind: str = "current") -> dict[str, torch.Tensor]:
    """Every full mask at once (bool, weight-shaped, by Linear name): for inspection and tests, in one process."""
    masks = RankMasks(files, kind)
    return {name: masks.get(name) for name in masks.shapes}

"""`run.yaml` for `megatron-ast train`: a dataclass tree validated on load.

Batch sizes, clipping, precision and ZeRO settings stay in the user's own
DeepSpeed JSON (`deepspeed:`); this file holds what DeepSpeed does not know:
the model, data, masks, SR-STE, distillation, SLoRB and the schedule.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_ast.errors import UsageError
from megatron_ast.fsutil import read_config_file
from megatron_ast.sparsity.pattern import SparsityPattern
from megatron_ast.sparsity.slorb import SLoRBConfig
from megatron_ast.training.distillation import DistillConfig


METHODS = ("ast", "naive", "gmp", "dense")
INIT_METRICS = ("magnitude", "wanda")
PRUNED_VALUES = ("dense", "zero")


@dataclass
class DataConfig:
    train: list[str]
    validation: list[str] = field(default_factory=list)
    seq_len: int = 1024
    seed: int = 1234
    blend: str | None = None  # blend spec file; default: RedPajama's weights


@dataclass
class LRConfig:
    peak: float = 2e-4
    min: float = 2e-5
    warmup: int = 2000


@dataclass
class OptimConfig:
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled, on matrices only (not norm gains or biases), as nanoGPT and the reference
    slorb_weight_decay: bool = True  # SLoRB's S is a matrix too; false exempts it
    # AST's masked weights: Adam's v tracks the update u = m + SR-STE decay (the reference's adamw.py) or, with
    # "gradient", the loss gradient as AdamW's does; the baselines always run plain AdamW
    second_moment: str = "update"


@dataclass
class SRSTEConfig:
    lam: float = 6e-5
    t_inc: int = 10_000


@dataclass
class GMPConfig:
    """Gradual magnitude pruning (Zhu & Gupta 2017), the `gmp` baseline: sparsity ramps cubically
    from 0 at step `start` to the pattern's at step `end` (default: half the steps)."""
    start: int = 0
    end: int | None = None


@dataclass
class TeacherConfig:
    """How the frozen teacher is held. `zero: true`: a ZeRO-3 engine (1/world of it per rank; every layer is
    all-gathered for every micro-batch). `false`: a whole replica per rank in the run's dtype, no all-gather.
    `auto`: the replica when it takes at most `replica_max_fraction` of the GPU's memory, else ZeRO-3; on the
    CPU always ZeRO-3 (a replica per rank multiplies the node's host memory by its ranks)."""
    zero: bool | str = "auto"
    replica_max_fraction: float = 0.25


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0 = only at the end (and on SIGTERM/SIGUSR1)
    keep: int = 3  # complete checkpoints kept (older ones are deleted); 0 = all


@dataclass
class EvalConfig:
    every: int = 0  # steps; 0 = only before and after training
    windows: int = 16  # per domain, of seq_len tokens


@dataclass
class TrainConfig:
    model: str  # the dense model dir: teacher, and the student's weights unless init is a pruned dir
    deepspeed: str  # the user's DeepSpeed JSON
    data: DataConfig
    output_dir: str = "runs/ast"
    # ast | naive (fixed mask, task loss only, no decay) | gmp (gradual magnitude pruning, task loss only)
    # | dense (the same distillation without masks)
    method: str = "ast"
    # magnitude | wanda (|W| * input norms from `init_calib_samples` sequences of the train data through the
    # dense model) | a one-shot pruned model dir (weights + masks.safetensors)
    init: str = "magnitude"
    init_calib_samples: int = 32
    # init a pruned dir: what the master holds where its masks prune: the pruned dir's zeros, or the dense
    # model's values (SLoRB's init, SR-STE and regrowth then see them, but the magnitude recompute overrules a
    # reconstructing pruner's masks at once: 10.6% of entries flipped at the first recompute from SparseGPT)
    pruned_values: str = "zero"
    pattern: str = "2:4"
    ignore: list[str] = field(default_factory=list)  # regexes of parameter names AST leaves dense (as prune's --ignore)
    steps: int = 1000
    mask_interval: int = 10
    mask_score: str = "magnitude"  # magnitude | wanda (running input norms)
    lr: LRConfig = field(default_factory=LRConfig)
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    srste: SRSTEConfig = field(default_factory=SRSTEConfig)
    gmp: GMPConfig = field(default_factory=GMPConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    slorb: SLoRBConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "none"  # none | auto (the newest complete checkpoint in output_dir, if any) | a checkpoint dir
    dist_timeout_s: int = 600  # a collective waiting longer (a dead or hung rank) fails the job instead of hanging
    log_every: int = 1
    activation_checkpointing: bool = False  # recompute decoder layers in the backward: memory for time
    # unpickle DeepSpeed files the weights-only loader refuses (a checkpoint from someone you trust); CLI --trust-checkpoint
    trust_checkpoint: bool = False

    def validate(self) -> "TrainConfig":
        from megatron_ast.sparsity.sparse_weights import check_ignore

        check_ignore(self.ignore)
        if self.method not in METHODS:
            raise UsageError(f"method {self.method!r}: choose {', '.join(METHODS)}")
        if self.mask_score not in ("magnitude", "wanda"):
            raise UsageError(f"mask_score {self.mask_score!r}: choose magnitude or wanda")
        if not self.pattern_obj.structured:
            raise UsageError("AST trains N:M patterns (e.g. 2:4); use `megatron-ast prune` for unstructured sparsity")
        for name in ("steps", "mask_interval", "log_every", "init_calib_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.data.seq_len < 2:
            raise UsageError(f"data.seq_len must be at least 2, got {self.data.seq_len}")
        if not self.data.train:
            raise UsageError("data.train needs at least one token-shard dir")
        if not (0 <= self.lr.min <= self.lr.peak) or self.lr.warmup < 0:
            raise UsageError(f"lr needs 0 <= min <= peak and warmup >= 0, got {self.lr}")
        if self.optimizer.second_moment not in ("update", "gradient"):
            raise UsageError(f"optimizer.second_moment must be update or gradient, got {self.optimizer.second_moment!r}")
        if self.srste.lam < 0 or self.srste.t_inc < 0:
            raise UsageError("srste.lam and srste.t_inc must be >= 0")
        if self.teacher.zero not in (True, False, "auto"):
            raise UsageError(f"teacher.zero must be true, false or auto, got {self.teacher.zero!r}")
        if not 0 < self.teacher.replica_max_fraction <= 1:
            raise UsageError(f"teacher.replica_max_fraction must be in (0, 1], got {self.teacher.replica_max_fraction}")
        if self.dist_timeout_s < 1:
            raise UsageError(f"dist_timeout_s must be at least 1, got {self.dist_timeout_s}")
        if self.checkpoint.every < 0 or self.checkpoint.keep < 0:
            raise UsageError("checkpoint.every and checkpoint.keep must be >= 0")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise UsageError(f"output_dir {self.output_dir!r} is a file: give a directory (new or a run's)")
        if self.resume not in ("none", "auto") and not (Path(self.resume) / "complete.json").is_file():
            raise UsageError(f"resume {self.resume!r}: give none, auto or a complete checkpoint dir (one with complete.json)")
        if self.init not in INIT_METRICS and not (Path(self.init) / "masks.safetensors").is_file():
            raise UsageError(f"init {self.init!r} is neither 'magnitude', 'wanda' nor a pruned model dir "
                             "with masks.safetensors")
        if self.slorb is not None and self.slorb.init == "fitted" and self.method != "dense":
            report = Path(self.init) / "sparsity_report.json"
            group = json.loads(report.read_text()).get("slorb", {}).get("group") if report.is_file() else None
            if group != self.slorb.group:
                raise UsageError(f"slorb init fitted takes S from init's adapter: give init a dir pruned with "
                                 f"--slorb-group {self.slorb.group} (init {self.init!r} has "
                                 f"{'none' if group is None else f'group {group}'})")
        if self.pruned_values not in PRUNED_VALUES:
            raise UsageError(f"pruned_values {self.pruned_values!r}: choose {' or '.join(PRUNED_VALUES)}")
        if self.method == "gmp":
            if self.init != "magnitude":
                raise UsageError("method gmp starts from the dense model and prunes by magnitude: drop `init`")
            if self.gmp.end is None:
                self.gmp.end = max(1, self.steps // 2)
            if not 0 <= self.gmp.start < self.gmp.end <= self.steps:
                raise UsageError(f"gmp needs 0 <= start < end <= steps, got start {self.gmp.start} end {self.gmp.end}")
        return self

    def resolve_paths(self, base: Path | None = None) -> "TrainConfig":
        """Every path made absolute (against `base`, default the working directory), so the run config and
        its checkpoints name the same files wherever a later export, eval or resume is started."""
        base = Path.cwd() if base is None else base

        def absolute(p: str) -> str:
            return str((base / Path(p).expanduser()).resolve())

        self.model, self.deepspeed, self.output_dir = absolute(self.model), absolute(self.deepspeed), absolute(self.output_dir)
        if self.init not in INIT_METRICS:
            self.init = absolute(self.init)
        if self.resume not in ("none", "auto"):
            self.resume = absolute(self.resume)
        self.data.train = [absolute(p) for p in self.data.train]
        self.data.validation = [absolute(p) for p in self.data.validation]
        if self.data.blend:
            self.data.blend = absolute(self.data.blend)
        return self

    @property
    def student_dir(self) -> str:
        """Where the student's weights (and tokenizer) come from."""
        return self.model if self.init in INIT_METRICS else self.init

    def teacher_on_zero3(self, teacher_bytes: int, gpu_bytes: int | None) -> bool:
        """Whether the teacher is a ZeRO-3 engine (see TeacherConfig); `gpu_bytes` None: no GPU."""
        if self.teacher.zero != "auto":
            return bool(self.teacher.zero)
        return gpu_bytes is None or teacher_bytes > self.teacher.replica_max_fraction * gpu_bytes

    @property
    def pattern_obj(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern)


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in args)
    plural = lambda h: _type_name(h).removeprefix("an ").removeprefix("a ") + "s"  # noqa: E731
    if typing.get_origin(hint) is list:
        return f"a list of {plural(args[0])}"
    if typing.get_origin(hint) is tuple:
        return f"{len(args)} {plural(args[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _is(value, hint) -> bool:
    """Whether a YAML/JSON value is of a config field's type (an int is a float; a bool is neither)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_is(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_is(v, args[0]) for v in value)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(_is, value, args))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is Any or dataclasses.is_dataclass(hint):
        return True
    return isinstance(value, hint)


def _build(cls, raw: Any, where: str):
    """Instantiate a (nested) dataclass from a mapping, rejecting unknown keys by name and values of the wrong
    type by key, expected type and value."""
    if not isinstance(raw, dict):
        raise UsageError(f"{where} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UsageError(f"unknown key(s) {unknown} in {where}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in raw.items():
        nested = [h for h in (hints[k], *typing.get_args(hints[k])) if dataclasses.is_dataclass(h)]
        if nested and v is not None:
            kwargs[k] = _build(nested[0], v, f"{where}.{k}")
            continue
        if not _is(v, hints[k]):
            raise UsageError(f"{where}.{k} must be {_type_name(hints[k])}, got {v!r} ({type(v).__name__})")
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UsageError(f"{where}: {e}") from e


def load_config(path: str | Path) -> TrainConfig:
    cfg = _build(TrainConfig, read_config_file(path, "config"), Path(path).name)
    if isinstance(cfg.optimizer.betas, list):
        cfg.optimizer.betas = tuple(cfg.optimizer.betas)
    return cfg.validate().resolve_paths()


def load_ds_config(path: str | Path, world_size: int) -> dict:
    """The user's DeepSpeed JSON, checked for what would clash with AST."""
    p = Path(path)
    ds = read_config_file(p, "DeepSpeed config")
    if not isinstance(ds.get("zero_optimization", {}), dict):
        raise UsageError(f"{p}: zero_optimization must be a mapping, got {ds['zero_optimization']!r}")
    if ds.get("zero_optimization", {}).get("stage") != 3:
        raise UsageError(f"{p}: AST runs student and teacher under ZeRO-3; set zero_optimization.stage to 3")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise UsageError(f"{p} has a '{section}' section: AST uses its own SR-STE AdamW and cosine schedule; "
                             "remove it and set lr/optimizer in run.yaml")
    if ds.get("torch_autocast", {}).get("enabled") is True:
        raise UsageError(f"{p} enables torch_autocast: AST runs DeepSpeed's bf16 section or fp32 (its fp16 grad scaler "
                         "can skip a sub-group's step, which the mask bookkeeping does not follow); use bf16")
    if ds.get("fp16", {}).get("enabled") is True:
        raise UsageError(f"{p} enables fp16: AST runs in bf16 (Ampere or newer) or fp32 (V100-class GPUs), not fp16 "
                         "with loss scaling (untested: DeepSpeed's CPU accelerator has no fp16); set bf16 or remove fp16")
    if any(v == "auto" for v in (ds.get("train_batch_size"), ds.get("train_micro_batch_size_per_gpu"),
                                 ds.get("gradient_accumulation_steps"))):
        raise UsageError(f"{p} uses 'auto' batch sizes (a Hugging Face Trainer convention): give numbers")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        v = ds.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise UsageError(f"{p}: {key} must be a positive integer, got {v!r} ({type(v).__name__})")
    clip = ds.get("gradient_clipping")
    if clip is not None and (not isinstance(clip, (int, float)) or isinstance(clip, bool) or clip < 0):
        raise UsageError(f"{p}: gradient_clipping must be a number >= 0, got {clip!r}")
    for section in ("bf16", "fp16"):
        enabled = (ds.get(section) or {}).get("enabled", False)
        if not isinstance(enabled, bool):
            raise UsageError(f"{p}: {section}.enabled must be true or false, got {enabled!r} ({type(enabled).__name__})")
    mb, gas, tb = ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps", 1), ds.get("train_batch_size")
    if mb is None and tb is None:
        raise UsageError(f"{p}: set train_micro_batch_size_per_gpu (and gradient_accumulation_steps)")
    if mb is None:
        if tb % (gas * world_size):
            raise UsageError(f"{p}: train_batch_size {tb} is not divisible by gradient_accumulation_steps {gas} x world {world_size}")
        mb = tb // (gas * world_size)
    if tb is not None and tb != mb * gas * world_size:
        raise UsageError(f"{p}: train_batch_size {tb} != micro batch {mb} x gradient_accumulation_steps {gas} x "
                         f"world size {world_size} = {mb * gas * world_size}; fix one of them")
    zero = ds["zero_optimization"]
    for what in ("offload_optimizer", "offload_param"):
        if (zero.get(what) or {}).get("device") == "nvme":
            raise UsageError(f"{p}: zero_optimization.{what} to nvme is untested with AST's masks: offload to cpu")
    if int(zero.get("zero_hpz_partition_size", 1)) > 1:
        raise UsageError(f"{p}: zero_hpz_partition_size {zero['zero_hpz_partition_size']} (ZeRO++ hpZ) gathers from a "
                         "secondary copy of the partitions that AST's start-up writes do not reach: remove it")
    ratio = (zero.get("offload_optimizer") or {}).get("ratio", 1.0)
    if ratio != 1.0:
        raise UsageError(f"{p}: offload_optimizer.ratio {ratio}: the rest would step with DeepSpeed's AdamW, not "
                         "AST's SR-STE AdamW; offload all of the optimizer (ratio 1) or none")
    ds.update({"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": gas,
               "train_batch_size": mb * gas * world_size, "zero_allow_untested_optimizer": True,
               # ZeRO-Offload steps AST's SR-STE AdamW on the CPU (one fused kernel: training/sr_ste.py)
               "zero_force_ds_cpu_optimizer": False})
    deepspeed_parses(p, ds)
    return ds


def _top_level_scalars() -> dict[str, bool | int | float]:
    """The top-level switches and numbers DeepSpeed reads unchecked (`get_scalar_param(param_dict, KEY, ...)` in
    deepspeed/runtime/config.py) with their defaults (constants' KEY_DEFAULT): a string for a bool there fails
    deep inside the engine, or silently means true."""
    import inspect
    import re

    import deepspeed.runtime.config as dsc
    import deepspeed.runtime.constants as c

    from megatron_ast.errors import DeepSpeedMismatch

    try:
        source = inspect.getsource(dsc)
    except OSError as e:  # an install without its .py files
        raise DeepSpeedMismatch(f"deepspeed/runtime/config.py's source cannot be read ({e}); the type check of the "
                                "JSON reads which top-level keys it takes") from None
    names = set(re.findall(r"get_scalar_param\(\s*param_dict,\s*([A-Z_0-9]+)", source))
    found = {getattr(c, n): getattr(c, f"{n}_DEFAULT", None) for n in names if hasattr(c, n)}
    found = {k: v for k, v in found.items() if isinstance(v, (bool, int, float))}
    if not {"wall_clock_breakdown", "prescale_gradients", "gradient_predivide_factor"} <= found.keys():
        raise DeepSpeedMismatch("deepspeed/runtime/config.py no longer reads its top-level switches with "
                                "get_scalar_param(param_dict, KEY, KEY_DEFAULT), which the type check of the JSON reads")
    return found


_MISSING = object()


def _section_of(ds: dict, loc: list[str], value: Any) -> str | None:
    """The top-level section holding `value` at `loc` (pydantic names a key inside its model, not the section)."""
    hits = []
    for name, section in ds.items():
        v = section
        for k in loc:
            v = v.get(k, _MISSING) if isinstance(v, dict) else _MISSING
        if v is not _MISSING and v == value:
            hits.append(name)
    return hits[0] if len(hits) == 1 else None


def deepspeed_parses(p: Path, ds: dict) -> None:
    """DeepSpeed's own parse of the JSON at load time, as one line: its pydantic sections check types, ranges and
    misspelt keys, but the engine would report them as a traceback once the models have loaded. Top-level
    switches and numbers, which it reads unchecked, are checked against the types of its defaults."""
    import logging

    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from deepspeed.utils import logger
    from pydantic import ValidationError

    for key, default in _top_level_scalars().items():
        if key not in ds:
            continue
        v = ds[key]
        if isinstance(default, bool):  # DeepSpeed tests these for truth (0 and 1 read as meant; null breaks some)
            if not (isinstance(v, bool) or (isinstance(v, int) and v in (0, 1))):
                raise UsageError(f"{p}: {key} must be true or false, got {v!r} ({type(v).__name__})")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UsageError(f"{p}: {key} must be a number, got {v!r} ({type(v).__name__})")
    level = logger.level
    logger.setLevel(logging.WARNING)  # its INFO lines about the world it sees here say nothing to the user
    try:
        DeepSpeedConfig({k: v for k, v in ds.items() if k != "train_batch_size"})  # it derives that for its world
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        if not loc:  # a check across the section's keys: pydantic's message says which
            raise UsageError(f"{p}: {err['msg']} (DeepSpeed's {e.title})") from None
        section = _section_of(ds, loc, err["input"])
        key = ".".join(([section] if section else [f"(in DeepSpeed's {e.title})"]) + loc)
        hint = " (misspelt?)" if err["type"] == "extra_forbidden" else ""
        raise UsageError(f"{p}: {key}{hint}: {err['msg']} (DeepSpeed's {e.title}), got {err['input']!r}") from None
    except (DeepSpeedConfigError, AssertionError, ValueError, TypeError, KeyError) as e:
        raise UsageError(f"{p}: DeepSpeed cannot read it: {e}") from None
    finally:
        logger.setLevel(level)

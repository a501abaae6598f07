"""`megatron-ast train`: AST with a ZeRO-3 student and teacher; baselines `naive` (fixed mask, task loss
only), `gmp` (gradual magnitude pruning, task loss only) and `dense` (the same distillation without
masks: the reference for AST's overhead).

One optimizer step (nanoGPT-style, the whole thing):
    for each micro-batch of this rank:
        student forward (W*M, STE), teacher forward (frozen) on the same tokens
        loss = w_task CE + w_kl T^2 KL + w_sq SquareHead      (training/distillation.py)
        engine.backward(loss); engine.step()                   (SR-STE decay inside: training/sr_ste.py;
                                                                then working weights = master * M)
    every mask_interval steps: masks from the fp32 master partitions   (training/mask_partitions.py)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import resource
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from megatron_ast import distributed
from megatron_ast.data.blend import BlendSpec
from megatron_ast.data.manifest import verify_shards
from megatron_ast.data.sampler import BlendedSampler
from megatron_ast.data.tokenizer import Tokenizer
from megatron_ast.errors import UsageError
from megatron_ast.fsutil import atomic_write_json, read_config_file
from megatron_ast.eval.perplexity import token_windows
from megatron_ast.training import checkpoint
from megatron_ast.training.config import TrainConfig, load_ds_config
from megatron_ast.training.distillation import DistillConfig, distillation_loss
from megatron_ast.training.engines import input_norms_zero3, load_zero3, sparsify_zero3_
from megatron_ast.training.mask_partitions import PartitionedMasks
from megatron_ast.training.router_load import ExpertLoad, check_balance_term
from megatron_ast.training.schedule import lr_at
from megatron_ast.training.sr_ste import SRSTEAdamW


def _tensorboard(path: Path):
    """A TensorBoard writer when the tensorboard package is installed (log.jsonl is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def param_groups(model, weight_decay: float, slorb_decay: bool = True) -> list[dict]:
    """Decoupled weight decay on matrices only (embeddings and Linears), not on norm gains or biases, as
    nanoGPT and the AST reference group them; `slorb_decay=False` exempts SLoRB's S as well. Shapes are
    read through ZeRO-3's partitioning (`ds_shape`)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        matrix = len(getattr(p, "ds_shape", p.shape)) >= 2 and (slorb_decay or ".slorb." not in name)
        (decay if matrix else plain).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0})
            if g["params"]]


def _rank0_print(*args) -> None:
    if torch.distributed.get_rank() == 0:
        print(*args, file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        import deepspeed

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # under mpirun/mpiexec with no RANK set, DeepSpeed discovers the world through mpi4py
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl",
                                   timeout=timedelta(seconds=cfg.dist_timeout_s),
                                   distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
        if torch.cuda.is_available():
            torch.cuda.set_device(distributed.local_rank())
        distributed.host_group(timedelta(seconds=cfg.dist_timeout_s))  # host numbers (stop flags): no GPU syncs
        distributed.watch_errors()  # a UsageError on any rank now ends every rank
        threads = distributed.cpu_threads_per_rank()
        if threads is not None:
            torch.set_num_threads(threads)
        self.cfg, self.rank, self.world = cfg, torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.ds = load_ds_config(cfg.deepspeed, self.world)
        self.micro, self.gas = self.ds["train_micro_batch_size_per_gpu"], self.ds["gradient_accumulation_steps"]
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.resume_tag = self._resume_tag()
        if self.resume_tag is None:
            self._check_fresh_dir()
        if self.resume_tag is not None and checkpoint.saved_world_size(self.resume_tag) != self.world:
            self.ds.setdefault("checkpoint", {})["load_universal"] = True  # elastic: another world size
        bf16 = self.ds.get("bf16", {}).get("enabled", False)
        dtype = torch.bfloat16 if bf16 else torch.float32
        tok_dir = cfg.student_dir
        self.tokenizer = Tokenizer.load(tok_dir)
        self.blend = BlendSpec.load(cfg.data.blend) if cfg.data.blend else None
        self.sampler = BlendedSampler(cfg.data.train, cfg.data.seq_len, cfg.data.seed, self.blend, self.tokenizer.identity)
        self._verify_shards()
        self.windows = (token_windows(cfg.data.validation, tok_dir, cfg.data.seq_len, cfg.eval.windows)
                        if cfg.data.validation else {})
        pattern = cfg.pattern_obj
        baseline = cfg.method in ("naive", "gmp")
        self.distill = (DistillConfig(1.0, 0.0, 0.0, cfg.distill.temperature, cfg.distill.w_router) if baseline
                        else cfg.distill)

        self.teacher = None
        self.teacher_zero3 = None
        if self.distill.w_kl > 0 or self.distill.w_sq > 0:
            from transformers import AutoConfig

            from megatron_ast.training.plan import param_counts

            total = param_counts(AutoConfig.from_pretrained(cfg.model, local_files_only=True))[0]
            gpu = torch.cuda.get_device_properties(distributed.local_rank()).total_memory if torch.cuda.is_available() else None
            self.teacher_zero3 = cfg.teacher_on_zero3(total * dtype.itemsize, gpu)
            _rank0_print(f"[train] teacher: {cfg.model} (frozen, "
                         f"{'ZeRO-3' if self.teacher_zero3 else 'a whole replica on every rank'}, no optimizer)")
            self.teacher = self._dense_engine(dtype) if self.teacher_zero3 else self._replica(dtype)
            self._teacher_sum = self._teacher_checksum()
        # a resumed run takes its masks from the checkpoint: no calibration pass then
        wanda = cfg.init == "wanda" and cfg.method != "dense" and self.resume_tag is None
        norms = self._wanda_norms(dtype) if wanda else None

        masks_from = {"magnitude": "magnitude masks", "wanda": "Wanda masks"}.get(cfg.init, "one-shot masks")
        masks_from = {"gmp": "dense, ramped by gmp", "dense": "dense, no masks"}.get(cfg.method, masks_from)
        _rank0_print(f"[train] student: {cfg.student_dir} ({masks_from}),"
                     f" ZeRO-3 on {self.world} ranks")
        student = load_zero3(cfg.student_dir, self.ds, dtype)
        masks_file = None if cfg.init in ("magnitude", "wanda") else Path(cfg.init) / "masks.safetensors"
        local_masks, self.startup_read_bytes = ({}, 0) if cfg.method == "dense" else sparsify_zero3_(
            student, pattern.n, pattern.m, masks_file, cfg.slorb, input_norms=norms, dense=cfg.method == "gmp",
            dense_values=cfg.model if cfg.pruned_values == "dense" else None, fitted_s=self._fitted_s(),
            ignore=tuple(cfg.ignore))
        self.n_sparse = len(local_masks)
        if cfg.activation_checkpointing:
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        o = cfg.optimizer
        ast = cfg.method == "ast"  # the baselines: plain AdamW
        opt = SRSTEAdamW(param_groups(student, o.weight_decay, o.slorb_weight_decay), lr=cfg.lr.peak, betas=o.betas,
                         eps=o.eps, weight_decay=o.weight_decay, srste_lambda=cfg.srste.lam if ast else 0.0,
                         srste_t_inc=cfg.srste.t_inc, second_moment=o.second_moment if ast else "gradient")
        self.srste = opt  # DeepSpeed wraps it; the wrapper hands it the flat fp32 partitions
        self.student, self.optimizer, _, _ = deepspeed.initialize(model=student, optimizer=opt, config=self.ds)
        checkpoint.install_checkpoint_engine(self.student, cfg.trust_checkpoint)  # hashes saves, loads weights-only
        self.masks = PartitionedMasks(self.student, local_masks, pattern.n, pattern.m, cfg.mask_score)
        check_balance_term(self.student.module, self.distill.w_router)
        self.expert_load = ExpertLoad(self.student.module)  # MoE: tokens per expert, logged per interval
        if cfg.slorb is not None and any(len(it.shape) == 3 for it in self.masks.items):
            _rank0_print("[train] slorb: branches on the Linears only; fused expert weights take none (a LoRA "
                         "adapter targets nn.Linear)")
        self.slorb_params = sum(int(getattr(p, "ds_numel", p.numel())) for n, p in student.named_parameters()
                                if ".slorb." in n)
        self.step = 0
        self.tokens = 0
        self.ppl_before = None
        self.resumed_from: Path | None = None
        self.stop_signal = 0
        self.last_save_s = 0.0
        if self.resume_tag is not None:
            self._restore(self.resume_tag)

    def _resume_tag(self) -> Path | None:
        if self.cfg.resume == "none":
            return None
        if self.cfg.resume != "auto":
            checkpoint.verify_share(Path(self.cfg.resume))
            return Path(self.cfg.resume)
        tag = checkpoint.find_resumable(self.ckpt_root)
        if tag is None:
            _rank0_print(f"[train] --resume auto: no complete checkpoint in {self.ckpt_root}, starting fresh")
        return tag

    def _check_fresh_dir(self) -> None:
        """A run dir belongs to one run: a fresh start (`resume: none`) into a dir holding another run's checkpoints
        or log is refused; under `--resume auto` with no complete checkpoint, the log of steps never saved goes."""
        log = self.out / "log.jsonl"
        saved = [d.name for d in checkpoint.complete_tags(self.ckpt_root)]  # newest first
        try:
            logged = log.stat().st_size
        except FileNotFoundError:  # none, or rank 0 removed an empty one just now
            logged = 0
        if self.cfg.resume == "none" and (saved or logged):
            what = f"checkpoints {', '.join(saved[:2])}" if saved else "log.jsonl"
            raise UsageError(f"{self.out} holds another run ({what}): pass --resume auto to continue it, or give a new "
                             "output_dir")
        if self.rank == 0 and log.is_file():
            log.unlink()  # steps of a run that never saved: the new run starts from step 0
            _rank0_print(f"[train] no complete checkpoint in {self.ckpt_root}: {log} of the unsaved steps removed")

    def _verify_shards(self) -> None:
        """Every training shard read whole once per run, before the first step: index structure and sha256 against
        its sidecar. The ranks split the shards; `verified_shards.json` in the run dir remembers them by size and
        mtime, so a resume reads only what changed."""
        path = self.out / "verified_shards.json"
        cached = read_config_file(path, "shard cache") if path.is_file() else {}
        shards = [s for stream in self.sampler.streams for s in stream.shards]
        t0 = time.perf_counter()
        new = {k: v for d in distributed.all_gather_json(verify_shards(shards, cached, self.rank, self.world))
               for k, v in d.items()}
        if self.rank == 0 and new:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {**cached, **new})
        _rank0_print(f"[train] {len(new)} of {len(shards)} shards verified ({sum(v[0] for v in new.values()) / 2**30:.2f}"
                     f" GiB, {time.perf_counter() - t0:.1f} s); {len(shards) - len(new)} unchanged since {path.name}")

    def _dense_engine(self, dtype: torch.dtype):
        """The dense model as a frozen ZeRO-3 engine with no optimizer (the teacher)."""
        import deepspeed

        model = load_zero3(self.cfg.model, self.ds, dtype)
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=self.ds)
        engine.eval()
        return engine

    def _replica(self, dtype: torch.dtype):
        """The dense model whole on this rank's device, frozen (`teacher.zero: false`): no all-gathers."""
        from transformers import AutoModelForCausalLM

        from megatron_ast.modeling import check_model_dir

        check_model_dir(self.cfg.model)
        device = torch.device("cuda", distributed.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
        model = AutoModelForCausalLM.from_pretrained(self.cfg.model, dtype=dtype, local_files_only=True,
                                                     device_map={"": str(device)})  # straight to the GPU, not via the host
        return model.requires_grad_(False).eval()

    def _fitted_s(self) -> dict[str, torch.Tensor] | None:
        """SLoRB's S from the pruned dir's adapter (`prune --slorb-group`) for `slorb.init: fitted`."""
        from megatron_ast.sparsity import slorb_adapter

        cfg = self.cfg
        found = slorb_adapter.adapter_dir(cfg.init) if cfg.init not in ("magnitude", "wanda") else None
        if cfg.slorb is None or cfg.slorb.init != "fitted" or cfg.method == "dense":
            if found is not None:
                _rank0_print(f"[train] {found} not used: slorb.init is not fitted, so the student starts from the "
                             "2:4 base alone")
            return None
        return {name: b for name, (_, b) in slorb_adapter.read(found).items()}

    def _wanda_norms(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Wanda's input norms from `init_calib_samples` train sequences (their own seed: the training
        stream is untouched) through the dense model: the teacher, or a temporary engine without one."""
        cfg = self.cfg
        per_rank = math.ceil(cfg.init_calib_samples / self.world)
        calib = BlendedSampler(cfg.data.train, cfg.data.seq_len, cfg.data.seed + 1, self.blend,
                               self.tokenizer.identity).next_batch(per_rank * self.world)
        mine = torch.from_numpy(calib[self.rank * per_rank : (self.rank + 1) * per_rank])
        _rank0_print(f"[train] Wanda input norms from {per_rank * self.world} x {cfg.data.seq_len} tokens")
        engine = self.teacher if self.teacher is not None else self._dense_engine(dtype)
        return input_norms_zero3(engine, [mine[i : i + self.micro] for i in range(0, per_rank, self.micro)],
                                 tuple(cfg.ignore))

    # --- one optimizer step ---------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, d = self.cfg, self.distill
        lr = lr_at(self.step + 1, cfg.steps, cfg.lr.peak, cfg.lr.min, cfg.lr.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # this rank's micro-batches of the global batch: micro-batch i of rank r is rows (i * world + r) * micro ...
        rows = [(i * self.world + self.rank) * self.micro + j for i in range(self.gas) for j in range(self.micro)]
        batch = torch.from_numpy(self.sampler.next_batch(self.micro * self.gas * self.world, rows))
        parts_sum: dict[str, torch.Tensor] = {}  # on the device: read once per logging interval (`_flush`)
        self.student.train()
        for i in range(self.gas):
            x = batch[i * self.micro : (i + 1) * self.micro].to(self.student.device)
            hidden = d.w_sq > 0
            out = self.student(input_ids=x, output_hidden_states=hidden,
                               **({"output_router_logits": True} if d.w_router else {}))
            t_out = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_out = self.teacher(input_ids=x, output_hidden_states=hidden)
            parts = distillation_loss(out.logits, x, d, t_out.logits if t_out is not None else None,
                                      out.hidden_states[1:] if hidden else (), t_out.hidden_states[1:] if hidden else ())
            if d.w_router:  # the family's own Switch-style load-balancing loss on the student's router logits
                parts["router"] = out.aux_loss.float()
                parts["loss"] = parts["loss"] + d.w_router * parts["router"]
            del out, t_out
            self.student.backward(parts["loss"])
            self.student.step()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v.detach() / self.gas
        self.step += 1
        self.tokens += batch.numel() * self.world
        rec = {"step": self.step, "lr": lr, "lambda": self.srste.current_lambda(),
               **{f"loss_{k}" if k != "loss" else "loss": v for k, v in parts_sum.items()},
               "tokens": self.tokens, "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        if cfg.method == "ast" and self.step % cfg.mask_interval == 0:
            rec.update(self.masks.recompute())
        elif cfg.method == "gmp" and (self.step % cfg.mask_interval == 0 or self.step == cfg.gmp.end):
            rec.update(self.masks.recompute(self._gmp_fraction()))
        return rec

    def _flush(self, pending: list[dict], since: float) -> float:
        """The loss parts of the steps since the last flush, read from the device in one transfer (the only host
        sync of the loop outside evaluation and mask recomputes); returns the mean step seconds since `since`."""
        keys = [(r, k) for r in pending for k, v in r.items() if torch.is_tensor(v)]
        values = torch.stack([r[k].float() for r, k in keys]).tolist() if keys else []
        for (r, k), v in zip(keys, values):
            r[k] = v
        step_s = (time.perf_counter() - since) / len(pending)
        for r in pending:
            r.update({"step_s": step_s, "tokens_per_s": self.micro * self.gas * self.world * self.cfg.data.seq_len / step_s})
            if torch.cuda.is_available():
                r["max_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return step_s

    def _gmp_fraction(self) -> float:
        """Zhu & Gupta's cubic ramp: the share of the final sparsity reached at this step."""
        g = self.cfg.gmp
        progress = min(1.0, max(0.0, (self.step - g.start) / (g.end - g.start)))
        return 1.0 - (1.0 - progress) ** 3

    def _dtypes(self) -> dict[str, str]:
        """What each copy is held in: the working weights ZeRO-3 gathers, the master the optimizer steps, the teacher."""
        name = lambda t: str(t.dtype).removeprefix("torch.")  # noqa: E731
        out = {"student_working": name(next(self.student.module.parameters()).ds_tensor),
               "student_master": name(self.student.optimizer.fp32_partitioned_groups_flat[0])}
        if self.teacher is not None:
            p = next(self.teacher.parameters())
            out["teacher"] = name(getattr(p, "ds_tensor", p))
        return out

    def _teacher_checksum(self) -> str:
        """sha256 of this rank's teacher partitions (of a replica, this rank's 1/world of each parameter: together the
        ranks cover it, none copies the whole model to the host): a frozen teacher must stay bit-identical."""
        h = hashlib.sha256()
        for p in self.teacher.parameters():
            part = p.ds_tensor if hasattr(p, "ds_tensor") else p.detach().reshape(-1).tensor_split(self.world)[self.rank]
            h.update(part.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
        return h.hexdigest()

    # --- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation perplexity of the sparse student, windows split across ranks (all ranks run forwards)."""
        self.student.eval()
        result, tot_nll, tot_n = {}, 0.0, 0
        for dom, w in self.windows.items():
            stats = torch.zeros(2, dtype=torch.float64, device=self.student.device)
            n_local = math.ceil(len(w) / self.world)
            for k in range(n_local):  # same number of forwards on every rank (ZeRO-3 gathers are collective)
                idx = self.rank * n_local + k
                x = torch.from_numpy(w[min(idx, len(w) - 1)][None]).to(self.student.device)
                logits = self.student(input_ids=x).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                        reduction="sum")
                if idx < len(w):
                    stats += torch.tensor([nll.item(), x[:, 1:].numel()], dtype=torch.float64, device=stats.device)
            distributed.all_reduce_(stats)
            nll_sum, count = float(stats[0]), int(stats[1])
            result[dom] = {"ppl": math.exp(nll_sum / count), "tokens": count}
            tot_nll, tot_n = tot_nll + nll_sum, tot_n + count
        if tot_n:
            result["all"] = {"ppl": math.exp(tot_nll / tot_n), "tokens": tot_n}
        return result

    # --- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        log = open(self.out / "log.jsonl", "a") if self.rank == 0 else None
        tb = _tensorboard(self.out / "tensorboard") if self.rank == 0 else None
        summary = {"method": cfg.method, "sparse_linears": self.n_sparse, "slorb_params": self.slorb_params,
                   "world_size": self.world, "micro_batch": self.micro, "grad_accum": self.gas,
                   "cpu_threads_per_rank": torch.get_num_threads(), "dtypes": self._dtypes(),
                   "teacher": None if self.teacher is None else "zero3" if self.teacher_zero3 else "replica",
                   # bytes of masks.safetensors and dense values each rank read at start-up (its partition's rows)
                   "startup_read_bytes_per_rank": distributed.all_gather_json(self.startup_read_bytes),
                   "masked_expert_weights": sum(len(it.shape) == 3 for it in self.masks.items)}
        if self.step == 0:
            self.ppl_before = self.evaluate() if self.windows else None
        summary["ppl_before"] = self.ppl_before
        self._install_signal_handlers()
        lines = not sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.method} {cfg.pattern}",
                   disable=self.rank != 0 or lines, file=sys.stderr)
        t0, start, rec, pending, since = time.perf_counter(), self.step, {}, [], time.perf_counter()
        while self.step < cfg.steps:
            rec = self.train_step()
            pending.append(rec)
            evaluate = bool(cfg.eval.every and self.step % cfg.eval.every == 0 and self.windows)
            stop = self._should_stop()
            save = stop or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.steps)
            if save or evaluate or self.step % cfg.log_every == 0 or self.step == cfg.steps:
                step_s = self._flush(pending, since)
                if evaluate:
                    rec["val"] = self.evaluate()
                if self.expert_load and rec["step"] % cfg.log_every == 0:  # a logged record: the shares since the last
                    rec["expert_load"] = self.expert_load.read()
                for r in pending:
                    if log is not None and r["step"] % cfg.log_every == 0:
                        log.write(json.dumps(r) + "\n")
                        if tb is not None:
                            for k, v in r.items():
                                if isinstance(v, (int, float)) and k != "step":
                                    tb.add_scalar(k, v, r["step"])
                if log is not None:
                    log.flush()
                bar.update(len(pending))
                bar.set_postfix_str(f"loss {rec['loss']:.3f} lr {rec['lr']:.2e}", refresh=False)
                if lines:  # no terminal (a launcher's pipe, a log file): a line per flush instead of a bar
                    eta = (time.perf_counter() - t0) / (self.step - start) * (cfg.steps - self.step)
                    _rank0_print(f"[train] step {self.step}/{cfg.steps} loss {rec['loss']:.3f} "
                                 f"{rec['tokens_per_s']:.0f} tokens/s ETA {eta / 60:.1f} min")
                pending = []
                if save:
                    path = self.save()
                    self._check_signal_lead(step_s)
                    if stop:
                        _rank0_print(f"[train] {signal.Signals(stop).name}: saved {path} at step {self.step}; "
                                     "continue with --resume auto")
                        if log is not None:
                            log.close()
                        raise SystemExit(128 + stop)
                since = time.perf_counter()
        bar.close()
        summary["ppl_after"] = self.evaluate() if self.windows else None
        if self.teacher is not None:
            same = distributed.all_reduced([float(self._teacher_checksum() == self._teacher_sum)], "min")
            summary["teacher_unchanged"] = bool(same[0])
        seconds = round(time.perf_counter() - t0, 1)
        final = self.save() if self.step != start else self.resumed_from
        summary.update({"steps": self.step, "tokens": self.tokens, "resumed_at_step": start or None,
                        "seconds": seconds, "final_loss": rec.get("loss"), "checkpoint": str(final),
                        "last_save_s": round(self.last_save_s, 2)})
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            log.close()
        return summary

    # --- checkpoints --------------------------------------------------------------------------------
    def save(self) -> Path:
        """A complete sharded checkpoint of everything the next step depends on (training/checkpoint.py)."""
        state = {"step": self.step, "tokens": self.tokens, "sampler": self.sampler.state_dict(),
                 "dtype": self._dtypes()["student_working"],  # what export writes by default
                 "ppl_before": self.ppl_before,
                 "config": json.loads(json.dumps(self.cfg, default=lambda o: o.__dict__))}
        _, keys, pos, has_gauss, cached = np.random.get_state()
        tensors = {**self.masks.state_dict(), "rng.torch": torch.get_rng_state(),
                   "rng.python": torch.tensor(random.getstate()[1], dtype=torch.int64),
                   "rng.numpy": torch.from_numpy(keys.astype(np.int64)),
                   "rng.numpy_pos_gauss": torch.tensor([pos, has_gauss, cached], dtype=torch.float64)}
        t0 = time.perf_counter()
        path = checkpoint.save(self.student, self.ckpt_root, self.step, state, tensors, self.cfg.checkpoint.keep)
        self.last_save_s = time.perf_counter() - t0
        _rank0_print(f"[train] saved {path} in {self.last_save_s:.1f} s")
        return path

    def _check_signal_lead(self, step_s: float) -> None:
        """Under Slurm (launch/train_slurm.sbatch exports SIGNAL_LEAD_S): the USR1 warning must leave time to finish
        a step and save; say so when the measured step + save takes more than 2/3 of it."""
        lead = float(os.environ.get("SIGNAL_LEAD_S", 0) or 0)
        need = step_s + self.last_save_s
        if lead and need > lead * 2 / 3:
            _rank0_print(f"[train] warning: a step ({step_s:.0f} s) and a save ({self.last_save_s:.0f} s) take {need:.0f} s "
                         f"of the {lead:.0f} s Slurm gives after SIGUSR1: raise --signal=B:USR1@ (and SIGNAL_LEAD_S) "
                         f"to at least {math.ceil(need * 1.5)}")

    def _restore(self, tag_dir: Path) -> None:
        state = checkpoint.load(self.student, tag_dir, self.cfg.trust_checkpoint)
        self.resumed_from = tag_dir
        self.masks.load_rank_files(checkpoint.rank_files(tag_dir))
        tensors = checkpoint.rank_tensors(tag_dir, self.rank)  # RNG states
        self.step, self.tokens, self.ppl_before = state["step"], state["tokens"], state["ppl_before"]
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(tensors["rng.torch"])
        random.setstate((3, tuple(int(v) for v in tensors["rng.python"]), None))
        pos, has_gauss, cached = tensors["rng.numpy_pos_gauss"].tolist()
        np.random.set_state(("MT19937", tensors["rng.numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
        if self.rank == 0 and (self.out / "log.jsonl").is_file():  # drop records of steps after the checkpoint
            log = self.out / "log.jsonl"
            kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            log.write_text("".join(line + "\n" for line in kept))
        _rank0_print(f"[train] resumed from {tag_dir} at step {self.step} ({self.tokens:,} tokens)")

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGUSR1 (Slurm's warning before a time limit): finish the step, save, exit 128+signal."""
        def handler(signum, frame):
            self.stop_signal = signum
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _should_stop(self) -> int:
        """The signal any rank received (all ranks agree, so they save together)."""
        return int(distributed.all_reduced([float(self.stop_signal)], "max")[0])


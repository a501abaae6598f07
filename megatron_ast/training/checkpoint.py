"""Sharded checkpoints that count only once complete, and `--resume auto`.

Layout of `<dir>/<tag>/` (tag = `step<N>`):
    DeepSpeed's own files (ZeRO-3 model and optimizer partitions, one pair per rank)
    rank<r>.safetensors   this rank's trainer tensors (mask slices, RNG states, Wanda sums)
    trainer_state.json    step, tokens, sampler position, world size (the same on every rank)
    complete.json         written last, by rank 0, after every rank finished: size and
                          sha256 of every file above. A tag without it is incomplete.
`<dir>/latest` names the newest complete tag; it is replaced (atomically) only after
complete.json exists, so a crash mid-save leaves the previous checkpoint loadable.
Every file is hashed while it is written (DeepSpeed's through `HashingCheckpointEngine`),
not read back: a save then costs what its writes cost, inside Slurm's signal window.
No pickles of ours: tensors in safetensors, the rest in JSON. DeepSpeed's own files are
pickles; none is unpickled unless the weights-only unpickler accepts it with the allowlist
below (`check_pickles`), or the user passed --trust-checkpoint. The manifest catches
corruption, not tampering: whoever can write the files can rewrite it.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from megatron_ast import distributed
from megatron_ast.errors import DeepSpeedMismatch, UsageError
from megatron_ast.fsutil import atomic_write_bytes, atomic_write_json, free_bytes, human_bytes, out_of_space

COMPLETE = "complete.json"
STATE = "trainer_state.json"
FAILED = "failed.txt"
UNIVERSAL_MB_PER_S = 50  # the slowest conversion rate the automatic universal conversion waits for


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _step_of(tag_dir: Path) -> int:
    m = re.fullmatch(r"step(\d+)", tag_dir.name)
    return int(m.group(1)) if m else -1


def complete_tags(root: Path) -> list[Path]:
    """Tag dirs under `root` with a complete.json, newest first."""
    return [d for d in _tags(root) if (d / COMPLETE).is_file()]


def _tags(root: Path) -> list[Path]:
    """Tag dirs under `root`, newest first."""
    tags = [d for d in root.iterdir() if d.is_dir() and _step_of(d) >= 0] if root.is_dir() else []
    return sorted(tags, key=_step_of, reverse=True)


# --- what DeepSpeed pickles, and nothing else -----------------------------------------------------------------
def _allowed_globals() -> list:
    """Every non-builtin type DeepSpeed 0.19's ZeRO-3 save pickles besides tensors (read off our checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, ZeroStageEnum]


def safe_load(path: str | Path, map_location=None, trust: bool = False, mmap: bool = False):
    """torch.load with the weights-only unpickler and DeepSpeed's allowlist; anything else is a one-line error."""
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except RuntimeError as e:  # a legacy-format (non-zip) file cannot be memory-mapped
        if mmap and "mmap" in str(e):
            return safe_load(path, map_location, trust=False, mmap=False)
        raise
    except pickle.UnpicklingError:
        try:
            allowed = {f"{g.__module__}.{g.__qualname__}" for g in _allowed_globals()}
            what = ", ".join(g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed)
        except Exception:
            what = ""
        what = f"a pickle of {what}, which DeepSpeed does not store" if what else "a pickle the weights-only loader refuses"
        raise UsageError(f"{path} holds {what}: not loading it, since unpickling can run code; pass "
                         "--trust-checkpoint if you trust whoever wrote it") from None


def check_pickles(root: Path, trust: bool = False, rank: int = 0, world: int = 1) -> None:
    """Every pickle (*.pt) under `root`, read by the weights-only unpickler (memory-mapped: tensors not read) before
    DeepSpeed or its scripts (which unpickle freely) touch them. On `world` ranks each reads its share, as the
    manifest check does; a refusal on any rank ends every rank (megatron_ast/distributed.py)."""
    if trust:
        return
    for path in sorted(Path(root).rglob("*.pt"))[rank::world]:
        safe_load(path, map_location="cpu", mmap=True)


def require_complete(tag_dir: Path, fix: str) -> None:
    """One process: `tag_dir` is a complete checkpoint whose every file matches its manifest (else `fix`)."""
    if not (tag_dir / COMPLETE).is_file():
        raise UsageError(f"{tag_dir} is not a complete checkpoint (no {COMPLETE}): pass a checkpoints/stepN dir")
    problem = verify(tag_dir)
    if problem is not None:
        raise UsageError(f"{problem}: {fix}")


class HashingCheckpointEngine:
    """DeepSpeed's torch checkpoint engine, hashing every file as it writes it and loading weights-only."""

    def __init__(self, inner, trust: bool = False):
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        if type(inner) is not TorchCheckpointEngine:
            raise UsageError(f"the DeepSpeed config selects the {type(inner).__name__} checkpoint writer: AST's "
                             "checkpoints use DeepSpeed's default one; remove checkpoint.writer/datastates")
        self.inner, self.trust = inner, trust
        self.digests: dict[str, list] = {}  # file name -> [size, sha256] of what this rank wrote

    def __getattr__(self, name):  # everything but save and load is the torch engine's
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        h, size = hashlib.sha256(), 0

        class Writer:
            def __init__(self, f):
                self.f = f

            def write(self, b) -> int:
                nonlocal size
                h.update(b)
                size += memoryview(b).nbytes
                return self.f.write(b)

            def flush(self) -> None:
                self.f.flush()

        with open(path, "wb") as f:
            torch.save(state_dict, Writer(f), _use_new_zipfile_serialization=self.inner.zipfile_serialization)
        self.digests[Path(path).name] = [size, h.hexdigest()]

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location, self.trust)


def install_checkpoint_engine(engine, trust: bool = False) -> HashingCheckpointEngine:
    if not hasattr(engine, "checkpoint_engine"):
        raise DeepSpeedMismatch("the engine has no checkpoint_engine to hash its files with")
    if not isinstance(engine.checkpoint_engine, HashingCheckpointEngine):
        engine.checkpoint_engine = HashingCheckpointEngine(engine.checkpoint_engine, trust)
    return engine.checkpoint_engine


def _write_hashed(path: Path, data: bytes, digests: dict) -> None:
    atomic_write_bytes(path, data)
    digests[path.name] = [len(data), hashlib.sha256(data).hexdigest()]


def space_needed(root: Path, engine) -> tuple[int, str]:
    """What the next save will write: the newest complete checkpoint's size, or before the first one a lower bound,
    12 bytes per trainable parameter (ZeRO's fp32 master and Adam's two moments; masks and DeepSpeed's small
    files come on top)."""
    complete = complete_tags(root)
    if complete:
        files = json.loads((complete[0] / COMPLETE).read_text())["files"]
        return sum(size for size, _ in files.values()), f"the size of {complete[0].name}"
    params = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters() if p.requires_grad)
    return 12 * params, "12 bytes per trainable parameter"


def _disk_full(tag: str, root: Path, need: int, why: str, during: bool) -> UsageError:
    latest = root / "latest"
    keeps = f"`latest` stays at {latest.read_text()}" if latest.is_file() else "There is no earlier checkpoint"
    what = (f"the disk filled while saving checkpoint {tag} (its partial files are removed)" if during else
            f"no space to save checkpoint {tag}")
    return UsageError(f"{what} under {root}: it needs about {human_bytes(need)} ({why}), {human_bytes(free_bytes(root))} "
                      f"are free. {keeps}: free space (or move output_dir, checkpoints/ with it), then --resume auto")


def save(engine, root: Path, step: int, state: dict, rank_tensors: dict[str, torch.Tensor], keep: int) -> Path:
    """Save on every rank (collective); returns the tag dir once it is complete everywhere.

    Rank 0 first checks the free space against `space_needed`. A save that fails anyway removes its partial
    files on the failing rank; `latest` never moved, and a full disk is one line naming the bytes (exit 2)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    hashing = install_checkpoint_engine(engine)
    tag = f"step{step}"
    tag_dir = root / tag
    root.mkdir(parents=True, exist_ok=True)
    need, why = space_needed(root, engine)
    if rank == 0:
        if tag_dir.exists():  # a crashed save of this step, or one skipped as corrupt: replaced
            shutil.rmtree(tag_dir)
        if free_bytes(root) < need:
            raise _disk_full(tag, root, need, why, during=False)  # before any rank writes (the others wait below)
    distributed.barrier()
    hashing.digests.clear()
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
        mine = dict(hashing.digests)
        _write_hashed(tag_dir / f"rank{rank}.safetensors",
                      safetensors_bytes({k: v.contiguous().cpu() for k, v in rank_tensors.items()}), mine)
        if rank == 0:
            _write_hashed(tag_dir / STATE, (json.dumps({**state, "world_size": world}, indent=2, sort_keys=True)
                                            + "\n").encode(), mine)
        gathered = distributed.all_gather_json(mine)  # every rank's files are on disk
        if rank == 0:
            manifest = {k: v for d in gathered for k, v in d.items()}
            for p in tag_dir.iterdir():  # what DeepSpeed writes past its engine (zero_to_fp32.py, a few KB)
                if p.is_file() and not p.name.startswith(".") and p.name not in manifest:
                    manifest[p.name] = [p.stat().st_size, _sha256(p)]
            atomic_write_json(tag_dir / COMPLETE, {"step": step, "world_size": world, "files": manifest})
            atomic_write_bytes(root / "latest", tag.encode())
    except Exception as e:  # torch's writer reports a full disk as "iostream error": the free space decides
        full = out_of_space(e) or free_bytes(root) < need  # measured before the partial files go
        if world == 1:
            shutil.rmtree(tag_dir, ignore_errors=True)
        if not full:
            raise
        err = _disk_full(tag, root, need, why, during=True)
        # on many ranks the partial files go only once every rank has stopped writing (distributed.fail_every_rank)
        err.cleanup = lambda: shutil.rmtree(tag_dir, ignore_errors=True)
        raise err from e
    distributed.barrier()  # every rank is done with this save: only now may older ones go
    if rank == 0:
        complete = complete_tags(root)
        for old in complete[keep:] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(root / "universal" / old.name, ignore_errors=True)
    return tag_dir


def _problem(tag_dir: Path, rank: int, world: int) -> str | None:
    """What is wrong with this tag (this rank's share of the files), or None."""
    try:
        manifest = json.loads((tag_dir / COMPLETE).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{tag_dir / COMPLETE}: unreadable ({e})"
    for i, (name, (size, digest)) in enumerate(sorted(manifest.items())):
        if i % world != rank:
            continue
        path = tag_dir / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes, the manifest says {size}"
        if _sha256(path) != digest:
            return f"{path}: sha256 differs from the manifest (corrupt)"
    return None


def verify(tag_dir: Path) -> str | None:
    """Every file of a complete checkpoint against its manifest, in one process: the problem, or None."""
    return _problem(tag_dir, 0, 1)


def find_resumable(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` whose files all verify (collective).

    Corrupt or incomplete ones are named in a warning and skipped; every rank returns the same."""
    rank, world = dist.get_rank(), dist.get_world_size()
    candidates = complete_tags(root)
    incomplete = [d for d in _tags(root) if not (d / COMPLETE).is_file()]
    if rank == 0:
        for d in incomplete:
            print(f"[resume] warning: {d} has no {COMPLETE} (a save that did not finish): skipped", file=sys.stderr)
    for tag_dir in candidates:
        problem = _problem(tag_dir, rank, world)
        bad = distributed.all_reduced([0.0 if problem is None else 1.0])[0]
        if problem is not None:
            print(f"[resume] warning: {problem}: skipping {tag_dir.name}", file=sys.stderr)
        if bad == 0:
            return tag_dir
    return None


def verify_share(tag_dir: Path) -> None:
    """An explicitly named checkpoint: this rank checks its share of the files (a problem is this rank's
    UsageError, which ends every rank: megatron_ast/distributed.py)."""
    problem = _problem(tag_dir, dist.get_rank(), dist.get_world_size())
    if problem is not None:
        raise UsageError(f"{problem}: resume from another checkpoint (or --resume auto, which skips bad ones)")


def saved_world_size(tag_dir: Path) -> int:
    return json.loads((tag_dir / STATE).read_text())["world_size"]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def convert_universal(tag_dir: Path, trust: bool = False, timeout_s: float | None = None) -> Path:
    """DeepSpeed's universal form of `tag_dir` (any world size loads it), in one process: `<root>/universal/<tag>`.
    Run it before relaunching on another world size (`megatron-ast checkpoint universal DIR`), or let the
    trainer's rank 0 do it. Idempotent: a finished conversion (its complete.json) is reused."""
    out = tag_dir.parent / "universal" / tag_dir.name
    if (out / COMPLETE).is_file():
        return out
    check_pickles(tag_dir, trust)
    shutil.rmtree(out, ignore_errors=True)
    print(f"[resume] converting {tag_dir} to a universal checkpoint (another world size)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise UsageError(f"converting {tag_dir} to a universal checkpoint took over {timeout_s:.0f} s: run "
                         f"`megatron-ast checkpoint universal {tag_dir}` before relaunching") from None
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise UsageError(f"ds_to_universal failed on {tag_dir}: {tail}")
    atomic_write_json(out / COMPLETE, {"from": str(tag_dir), "seconds": round(time.perf_counter() - t0, 1)})
    return out


def universal(tag_dir: Path, trust: bool = False, poll_s: float = 1.0) -> Path:
    """The universal form of `tag_dir`, converted by rank 0 while the others wait on the file system, not in a
    collective (a 70B conversion outlasts any collective timeout); collective. The wait is sized by the
    checkpoint: its bytes at UNIVERSAL_MB_PER_S, at least 10 minutes."""
    out = tag_dir.parent / "universal" / tag_dir.name
    timeout_s = max(600.0, _size(tag_dir) / (UNIVERSAL_MB_PER_S * 1e6))
    failed = out.parent / f"{out.name}.{FAILED}"
    if dist.get_rank() == 0:
        failed.unlink(missing_ok=True)
    distributed.barrier()  # no rank reads a stale failure
    if dist.get_rank() == 0:
        try:
            convert_universal(tag_dir, trust, timeout_s)
        except UsageError as e:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(failed, str(e).encode())
            raise
    else:
        deadline = time.monotonic() + timeout_s + 60
        while not (out / COMPLETE).is_file():
            if failed.is_file():
                raise UsageError(failed.read_text())
            if time.monotonic() > deadline:
                raise UsageError(f"rank 0 did not finish converting {tag_dir} within {timeout_s + 60:.0f} s: run "
                                 f"`megatron-ast checkpoint universal {tag_dir}` before relaunching")
            time.sleep(poll_s)
    distributed.barrier()
    return out


def load(engine, tag_dir: Path, trust: bool = False) -> dict:
    """Restore DeepSpeed's state into `engine` (from the universal form when the world size changed,
    which the engine must have been configured for); returns the trainer state. Nothing is unpickled that
    the weights-only loader refuses, unless `trust`."""
    state = json.loads((tag_dir / STATE).read_text())
    src = universal(tag_dir, trust) if state["world_size"] != dist.get_world_size() else tag_dir
    check_pickles(src, trust, dist.get_rank(), dist.get_world_size())  # its universal loader unpickles past the engine
    distributed.barrier()  # every share checked before any rank loads
    install_checkpoint_engine(engine, trust)
    path, _ = engine.load_checkpoint(str(src.parent), tag=src.name, load_lr_scheduler_states=False)
    if path is None:
        raise UsageError(f"DeepSpeed could not load {src}")
    return state


def rank_files(tag_dir: Path) -> list[Path]:
    """Every saving rank's tensor file, in rank order."""
    return [tag_dir / f"rank{r}.safetensors" for r in range(saved_world_size(tag_dir))]


def rank_tensors(tag_dir: Path, rank: int) -> dict[str, torch.Tensor]:
    """What `rank` saved; on a larger world, ranks past the saved ones get the last saved rank's."""
    files = rank_files(tag_dir)
    return load_file(str(files[min(rank, len(files) - 1)]))

"""Sharded checkpoints that count only once complete, and `--resume auto`.

Layout of `<dir>/<tag>/` (tag = `step<N>`):
    DeepSpeed's own files (ZeRO-3 model and optimizer partitions, one pair per rank)
    rank<r>.safetensors   this rank's trainer tensors (mask slices, RNG states, Wanda sums)
    trainer_state.json    step, tokens, sampler position, world size (the same on every rank)
    complete.json         written last, by rank 0, after every rank finished: size and
                          sha256 of every file above. A tag without it is incomplete.
`<dir>/latest` names the newest complete tag; it is replaced (atomically) only after
complete.json exists, so a crash mid-save leaves the previous checkpoint loadable.
No pickles of ours: tensors in safetensors, the rest in JSON.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megatron_ast.errors import UsageError
from megatron_ast.fsutil import atomic_write_bytes, atomic_write_json, tmp_name

COMPLETE = "complete.json"
STATE = "trainer_state.json"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _step_of(tag_dir: Path) -> int:
    return int(tag_dir.name.removeprefix("step")) if tag_dir.name.startswith("step") else -1


def save(engine, root: Path, step: int, state: dict, rank_tensors: dict[str, torch.Tensor], keep: int) -> Path:
    """Save on every rank (collective); returns the tag dir once it is complete everywhere."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = f"step{step}"
    tag_dir = root / tag
    if rank == 0 and tag_dir.exists():  # a crashed save of this step, or one skipped as corrupt: replaced
        shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    mine = tag_dir / f"rank{rank}.safetensors"
    tmp = tmp_name(mine)
    save_file({k: v.contiguous().cpu() for k, v in rank_tensors.items()}, str(tmp))
    tmp.replace(mine)
    if rank == 0:
        atomic_write_json(tag_dir / STATE, {**state, "world_size": world})
    dist.barrier()  # every rank's files are on disk
    files = sorted(p.name for p in tag_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    digests = {name: (tag_dir / name).stat().st_size for name in files}
    for i, name in enumerate(files):  # hashing is shared out across ranks
        if i % world == rank:
            digests[name] = [digests[name], _sha256(tag_dir / name)]
    gathered = [None] * world
    dist.all_gather_object(gathered, {k: v for k, v in digests.items() if isinstance(v, list)})
    if rank == 0:
        manifest = {k: v for d in gathered for k, v in d.items()}
        atomic_write_json(tag_dir / COMPLETE, {"step": step, "world_size": world, "files": manifest})
        atomic_write_bytes(root / "latest", tag.encode())
        complete = sorted((d for d in root.iterdir() if (d / COMPLETE).is_file()), key=_step_of)
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
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


def find_resumable(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` whose files all verify (collective).

    Corrupt or incomplete ones are named in a warning and skipped; every rank returns the same."""
    rank, world = dist.get_rank(), dist.get_world_size()
    candidates = sorted((d for d in root.iterdir() if d.is_dir() and (d / COMPLETE).is_file()), key=_step_of,
                        reverse=True) if root.is_dir() else []
    incomplete = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step") and not (d / COMPLETE).is_file()] \
        if root.is_dir() else []
    if rank == 0:
        for d in incomplete:
            print(f"[resume] warning: {d} has no {COMPLETE} (a save that did not finish): skipped", file=sys.stderr)
    for tag_dir in candidates:
        problem = _problem(tag_dir, rank, world)
        bad = torch.tensor([0.0 if problem is None else 1.0])
        dist.all_reduce(bad)
        if problem is not None:
            print(f"[resume] warning: {problem}: skipping {tag_dir.name}", file=sys.stderr)
        if bad.item() == 0:
            return tag_dir
    return None


def load(engine, tag_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore DeepSpeed's state into `engine`; returns (trainer state, this rank's tensors)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    state = json.loads((tag_dir / STATE).read_text())
    if state["world_size"] != world:
        raise UsageError(f"{tag_dir} was saved on {state['world_size']} ranks, this run has {world}: "
                         "resume on the same world size")
    path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_lr_scheduler_states=False)
    if path is None:
        raise UsageError(f"DeepSpeed could not load {tag_dir}")
    return state, load_file(str(tag_dir / f"rank{rank}.safetensors"))

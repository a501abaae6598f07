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
import re
import shutil
import subprocess
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
    m = re.fullmatch(r"step(\d+)", tag_dir.name)
    return int(m.group(1)) if m else -1


def _tags(root: Path) -> list[Path]:
    """Tag dirs under `root`, newest first."""
    tags = [d for d in root.iterdir() if d.is_dir() and _step_of(d) >= 0] if root.is_dir() else []
    return sorted(tags, key=_step_of, reverse=True)


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
        complete = [d for d in _tags(root) if (d / COMPLETE).is_file()]
        for old in complete[keep:] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(root / "universal" / old.name, ignore_errors=True)
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


def verify(tag_dir: Path) -> str | None:
    """Every file of a complete checkpoint against its manifest, in one process: the problem, or None."""
    return _problem(tag_dir, 0, 1)


def find_resumable(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` whose files all verify (collective).

    Corrupt or incomplete ones are named in a warning and skipped; every rank returns the same."""
    rank, world = dist.get_rank(), dist.get_world_size()
    candidates = [d for d in _tags(root) if (d / COMPLETE).is_file()]
    incomplete = [d for d in _tags(root) if not (d / COMPLETE).is_file()]
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


def saved_world_size(tag_dir: Path) -> int:
    return json.loads((tag_dir / STATE).read_text())["world_size"]


def universal(tag_dir: Path) -> Path:
    """DeepSpeed's universal form of `tag_dir` (any world size can load it), converted once by rank 0 (collective)."""
    out = tag_dir.parent / "universal" / tag_dir.name
    if dist.get_rank() == 0 and not (out / COMPLETE).is_file():
        print(f"[resume] converting {tag_dir} to a universal checkpoint (another world size)", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(tag_dir), "--output_folder", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {tag_dir}:\n{proc.stderr[-2000:]}")
        atomic_write_json(out / COMPLETE, {"from": str(tag_dir)})
    dist.barrier()
    return out


def load(engine, tag_dir: Path) -> dict:
    """Restore DeepSpeed's state into `engine` (from the universal form when the world size changed,
    which the engine must have been configured for); returns the trainer state."""
    state = json.loads((tag_dir / STATE).read_text())
    src = universal(tag_dir) if state["world_size"] != dist.get_world_size() else tag_dir
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

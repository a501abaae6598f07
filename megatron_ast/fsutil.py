"""Atomic file and directory writes: a reader never sees a half-written output."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from megatron_ast.errors import UsageError


def tmp_name(path: Path) -> Path:
    """Temporary sibling of `path` that is unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def make_dirs(path: str | Path) -> list[Path]:
    """`mkdir -p path`; returns the dirs it made, innermost first, for `remove_empty` after a failure. Resolved
    first: `new/../old` must not name `old` as made."""
    p = Path(path).resolve()
    top = existing_ancestor(p)
    if not top.is_dir():
        raise UsageError(f"{path}: {top} is a file, not a directory; give a path under a directory")
    made = [p, *p.parents][: len(p.parts) - len(top.parts)]
    p.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty(made: list[Path]) -> None:
    """Remove those of `made` that are empty, innermost first: an error leaves no empty output dirs behind. A dir
    something else filled (another rank's output) stays."""
    for d in made:
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def new_dirs(path: str | Path) -> Iterator[Path]:
    """`path`, created with its parents; if the block fails, those this call made go again once empty. For one
    process: ranks sharing the dir call `remove_empty` once all of them have stopped writing (preprocess)."""
    made = make_dirs(path)
    try:
        yield Path(path)
    except BaseException:
        remove_empty(made)
        raise


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that becomes `final` only if the block completes.

    `final` must not exist yet; on error the scratch directory is removed, and the parents it had to make.
    """
    final = Path(final)
    with new_dirs(final.parent):
        scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(scratch, 0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            yield scratch
            os.replace(scratch, final)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def read_config_file(path: str | Path, what: str, fix: str = "") -> Any:
    """Parse a JSON or (by suffix) YAML file; a missing or malformed one is a UsageError naming it."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} {p} does not exist")
    as_yaml = p.suffix in (".yaml", ".yml")
    try:
        if as_yaml:
            import yaml

            return yaml.safe_load(p.read_text())
        return json.loads(p.read_text())
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise UsageError(f"{what} {p} is not valid {'YAML' if as_yaml else 'JSON'} ({e}){fix}") from e


def out_of_space(e: BaseException | None) -> bool:
    """`e`, or an error it was raised from, is a full disk or quota (an OSError, or safetensors' Rust error text)."""
    seen = set()
    while e is not None and id(e) not in seen:  # a chain can loop (`raise e from e`)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def existing_ancestor(path: str | Path) -> Path:
    """`path` itself if it exists, else its nearest ancestor that does: where creating it would start."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | Path) -> int:
    """Free bytes (for this user) on the file system that holds `path`, or would hold it once created."""
    return shutil.disk_usage(existing_ancestor(path)).free


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB ({int(n):,} bytes)" if n >= 2**30 else f"{n / 2**20:.1f} MiB ({int(n):,} bytes)"


def no_space(path: str | Path) -> UsageError:
    """The one-line error for a write that filled the disk (the writer has removed its partial output)."""
    return UsageError(f"no space left on the device of {path} ({human_bytes(free_bytes(path))} free after removing the "
                      "partial output): free space or write elsewhere")

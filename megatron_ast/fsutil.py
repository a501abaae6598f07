"""Atomic file and directory writes: a reader never sees a half-written output."""
from __future__ import annotations

import contextlib
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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that becomes `final` only if the block completes.

    `final` must not exist yet; on error the scratch directory is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
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

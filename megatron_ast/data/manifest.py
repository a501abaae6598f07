"""The manifest of a token-shard directory: which tokenizer, and per shard its source and checksums.

Each shard `<dir>/<name>.bin/.idx` has a sidecar `<name>.meta.json`, written
only after both files are complete: the sidecar is the shard's "done" mark,
so a killed run never mistakes a partial shard for a finished one.
`manifest.json` is the union of the sidecars, rebuilt after every run.
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_ast.data.indexed import META_SUFFIX, IndexedShard, bin_path, idx_path, meta_path
from megatron_ast.data.tokenizer import TokenizerIdentity
from megatron_ast.errors import UsageError
from megatron_ast.fsutil import atomic_write_json, read_config_file

MANIFEST = "manifest.json"
FORMAT = "megatron-ast-token-shards/1"


def read_meta(prefix: Path) -> dict | None:
    """The sidecar of a complete shard, or None when the shard is missing or incomplete."""
    mp = meta_path(prefix)
    if not (mp.is_file() and bin_path(prefix).is_file() and idx_path(prefix).is_file()):
        return None
    try:
        meta = json.loads(mp.read_text())
    except json.JSONDecodeError:
        return None
    if bin_path(prefix).stat().st_size != meta.get("bin_bytes"):
        return None
    return meta


def _sidecars(directory: Path) -> dict[str, dict]:
    out = {}
    for mp in sorted(Path(directory).glob(f"*{META_SUFFIX}")):
        name = mp.name[: -len(META_SUFFIX)]
        meta = read_meta(Path(directory) / name)
        if meta is not None:
            out[name] = meta
    return out


def check_tokenizer(directory: Path, identity: TokenizerIdentity) -> None:
    """Refuse to add shards of one tokenizer to a directory holding another's."""
    directory = Path(directory)
    found = []
    if (directory / MANIFEST).is_file():
        found.append((directory / MANIFEST, json.loads((directory / MANIFEST).read_text())["tokenizer"]))
    found += [(meta_path(directory / n), m["tokenizer"]) for n, m in _sidecars(directory).items()]
    for where, tok in found:
        if not identity.same_vocab(tok):
            raise UsageError(
                f"{directory} holds shards of tokenizer {tok.get('name')!r} ({where.name}), not "
                f"{identity.name!r}: use another --output-dir or the matching --tokenizer"
            )


def write_manifest(directory: Path) -> dict:
    """Rebuild `manifest.json` from the complete shards' sidecars."""
    shards = _sidecars(directory)
    if not shards:
        (Path(directory) / MANIFEST).unlink(missing_ok=True)  # an earlier run's, naming shards that are gone
        raise UsageError(f"{directory} holds no complete token shards (a --max-tokens below the first document's "
                         "tokens writes none)")
    first = next(iter(shards.values()))
    dtypes = {m["dtype"] for m in shards.values()}
    if len(dtypes) > 1:  # Megatron-LM and datatrove pick int32 at other vocabulary sizes than we do
        raise UsageError(f"{directory} holds shards of dtypes {sorted(dtypes)}: one dir holds one dtype; put the "
                         "others in their own dir (training reads several dirs)")
    manifest = {
        "format": FORMAT,
        "tokenizer": first["tokenizer"],
        "dtype": first["dtype"],
        "documents": sum(m["documents"] for m in shards.values()),
        "tokens": sum(m["tokens"] for m in shards.values()),
        "shards": {n: {k: v for k, v in m.items() if k not in ("tokenizer", "dtype")} for n, m in shards.items()},
    }
    atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


ADOPT_HINT = "run `megatron-ast inspect --adopt {path} --tokenizer MODEL_DIR` to check them and write it"


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        if any(Path(directory).glob("*.idx")):
            raise UsageError(f"{directory} holds .bin/.idx shards but no {MANIFEST} (made by Megatron-LM?): "
                             + ADOPT_HINT.format(path=directory))
        raise UsageError(f"{directory} has no {MANIFEST}: it is not a token-shard directory (run `megatron-ast preprocess`)")
    manifest = read_config_file(path, "manifest", ": re-run `megatron-ast preprocess` on that directory")
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def verify_shards(shards: list[IndexedShard], cache: dict[str, list], rank: int = 0, world: int = 1) -> dict[str, list]:
    """`IndexedShard.verify` on this rank's share of the shards that `cache` does not vouch for; returns the cache
    entries of those it verified. An entry is `.bin` path -> [bytes, mtime_ns, sha256]: a shard rewritten or
    touched since is read again. Training verifies its shards once per run this way (training/trainer.py)."""
    todo = []
    for s in shards:
        st = bin_path(s.prefix).stat()
        key, stamp = str(bin_path(s.prefix).resolve()), [st.st_size, st.st_mtime_ns, (s.meta or {}).get("sha256")]
        if cache.get(key) != stamp:
            todo.append((key, stamp, s))
    mine = {}
    for key, stamp, s in sorted(todo, key=lambda t: -t[1][0])[rank::world]:  # largest first: balanced shares
        s.verify()
        mine[key] = stamp
    return mine


def shard_set(path: str | Path) -> tuple[dict, list[tuple[Path, dict]]]:
    """(tokenizer, [(prefix, sidecar with tokenizer and dtype)]) of a shard dir or of one shard prefix: what every
    reader of shards (training, eval, calibration, merge, inspect) accepts."""
    p = Path(path)
    if p.is_dir():
        m = read_manifest(p)
        common = {"tokenizer": m["tokenizer"], "dtype": m["dtype"]}
        return m["tokenizer"], [(p / n, {**meta, **common}) for n, meta in sorted(m["shards"].items())]
    if bin_path(p).is_file() and idx_path(p).is_file():
        if not meta_path(p).is_file():
            raise UsageError(f"shard {p} has no sidecar {meta_path(p).name} (made by Megatron-LM?): "
                             + ADOPT_HINT.format(path=p))
        meta = read_config_file(meta_path(p), "shard sidecar", ": re-run `megatron-ast preprocess` on its source")
        return meta["tokenizer"], [(p, meta)]
    raise UsageError(f"{p} is neither a token-shard dir nor a shard prefix (PREFIX.bin and PREFIX.idx)")


def is_shards(path: str | Path) -> bool:
    """A shard dir (ours, or one of .bin/.idx files) or a shard prefix: not documents to tokenize."""
    p = Path(path)
    return (p / MANIFEST).is_file() or (p.is_dir() and any(p.glob("*.idx"))) or idx_path(p).is_file()

"""Safetensors files written one tensor at a time, sharded as Hugging Face shards them.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the bytes. Every shape and dtype of an export is known before any value is
(the checkpoint's shapes, the target dtype), so the header is written first and each tensor is made,
written and dropped in turn: the process holds one tensor, not the model. Shards follow transformers'
layout: `model.safetensors` alone, or `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`
(`weight_map` and `metadata.total_size`), which `from_pretrained`, vLLM and `safe_open` read.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

TAGS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.bool: "BOOL", torch.uint8: "U8",
        torch.int8: "I8", torch.int32: "I32", torch.int64: "I64"}
Spec = tuple[str, torch.dtype, tuple[int, ...]]


def _nbytes(spec: Spec) -> int:
    n = 1
    for d in spec[2]:
        n *= d
    return n * torch.empty(0, dtype=spec[1]).element_size()


def write_file(path: Path, specs: list[Spec], make: Callable[[str], torch.Tensor],
               metadata: dict[str, str] | None = None, progress: Callable[[], None] | None = None) -> None:
    """One safetensors file of `specs` (name, dtype, shape) in that order, each tensor from `make(name)`."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        size = _nbytes((name, dtype, shape))
        header[name] = {"dtype": TAGS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, shape in specs:
            t = make(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: made {t.dtype} {tuple(t.shape)}, the header says {dtype} {tuple(shape)}")
            f.write(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))  # no copy
            if progress is not None:
                progress()


def plan_shards(specs: Iterable[Spec], max_bytes: int) -> list[list[Spec]]:
    """Consecutive tensors grouped into shards of at most `max_bytes` (a larger tensor gets a shard alone)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        b = _nbytes(spec)
        if shards[-1] and size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += b
    return shards


def write_sharded(out: Path, specs: list[Spec], make: Callable[[str], torch.Tensor], max_bytes: int,
                  metadata: dict[str, str] | None = None, desc: str = "writing") -> list[Path]:
    """`specs` into `out` as transformers' `model*.safetensors` (with an index when there are several)."""
    from tqdm import tqdm

    shards = plan_shards(specs, max_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with tqdm(total=len(specs), desc=desc, unit="tensor") as bar:
        for name, shard in zip(names, shards):
            write_file(out / name, shard, make, metadata, lambda: bar.update(1))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(s) for s in specs)},
                 "weight_map": {s[0]: n for n, shard in zip(names, shards) for s in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out / n for n in names]


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes (transformers' max_shard_size convention)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for u, mult in units.items():
        if t.endswith(u) and t[: -len(u)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(u)]) * mult)
    if t.isdigit():
        return int(t)
    from megatron_ast.errors import UsageError

    raise UsageError(f"shard size {text!r}: give bytes or a size such as 5GB, 500MB, 2GiB")

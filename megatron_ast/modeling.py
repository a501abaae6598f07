"""Loading Hugging Face causal LMs from local dirs only (no hub, no remote code unless asked)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from megatron_ast.errors import UsageError
from megatron_ast.fsutil import read_config_file

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_safetensors(path: str | Path) -> None:
    """A safetensors file whose size is what its header promises (8 + header + the last tensor's end): a file cut
    short or damaged is one line naming it, not safetensors' Rust error from deep inside a load. Reads the header."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p} does not exist: copy or write it again")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        try:
            header = json.loads(f.read(n)) if n is not None and n <= min(size - 8, 100 << 20) else None
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            header = None
    problem = ("it is shorter than a safetensors header" if n is None else
               f"its header claims {n:,} bytes of the file's {size:,}" if n > size - 8 else
               f"its header claims {n:,} bytes, over safetensors' 100 MB limit" if n > 100 << 20 else
               "its header is not a safetensors header" if header is None else
               f"{size:,} bytes, its header promises {8 + n + end:,}" if 8 + n + end != size else None)
    if problem:
        raise UsageError(f"{p} is not a whole safetensors file ({problem}): it was cut short or damaged; copy or "
                         "write it again")


def check_model_dir(path: str | Path) -> Path:
    """A local Hugging Face model dir: a config.json that parses, and every safetensors weight file whole."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UsageError(f"{p} is not a Hugging Face model dir (no config.json): pass --model a local model dir")
    read_config_file(p / "config.json", "model config", ": fix it or copy the model dir again")
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise UsageError(f"{p} has a config.json but no weights ({', '.join(WEIGHT_FILES[:2])}): re-export the model")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_config_file(index, "weight index", ": copy the model dir again").get("weight_map", {})
        for f in sorted(set(weight_map.values())):
            check_safetensors(p / f)
    elif (p / "model.safetensors").is_file():
        check_safetensors(p / "model.safetensors")
    return p


def load_causal_lm(path: str | Path, dtype=None, trust_remote_code: bool = False, adapter: bool = True):
    """The model in a local dir; with its SLoRB adapter (`slorb_adapter/`) when it has one and `adapter`:
    a run with SLoRB is its 2:4 base plus that branch, and is measured as such. Says on stderr which."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from megatron_ast.sparsity import slorb_adapter

    logging.disable_progress_bar()  # our own progress bars say what is going on
    p = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(
        p, dtype=dtype or torch.float32, local_files_only=True, trust_remote_code=trust_remote_code
    )
    found = slorb_adapter.adapter_dir(p)
    if found is not None and adapter:
        n = slorb_adapter.attach_(model, found)
        print(f"[model] {p} + SLoRB adapter {found.name}/ ({n:,} parameters)", file=sys.stderr)
    elif found is not None:
        print(f"[model] {p} without its SLoRB adapter (--no-adapter)", file=sys.stderr)
    return model


def read_flat(handle, key: str, start: int, stop: int) -> tuple["torch.Tensor", int]:  # noqa: F821
    """Elements [start, stop) of a tensor in a safetensors file, flattened row-major, reading only the rows that
    hold them (`get_slice`); returns them and the bytes read (what a ZeRO-3 rank needs of its partition)."""
    sl = handle.get_slice(key)
    shape = sl.get_shape()
    cols = 1
    for d in shape[1:]:
        cols *= d
    if stop <= start:  # a rank past the end of a small tensor holds only padding
        return sl[0:0].reshape(-1), 0
    r0, r1 = start // cols, -(-stop // cols)
    rows = sl[r0:r1]
    return rows.reshape(-1)[start - r0 * cols : stop - r0 * cols], rows.numel() * rows.element_size()


class WeightReader:
    """Tensors of a local HF dir's safetensors weights by name, one at a time (sharded dirs too): the dense
    values a one-shot init keeps under its masks, read one Linear at a time."""

    def __init__(self, path: str | Path):
        p = check_model_dir(path)
        index = p / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: p / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (p / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(p / "model.safetensors"), framework="pt") as h:
                self.files = {k: p / "model.safetensors" for k in h.keys()}
        else:
            raise UsageError(f"{p} stores its weights as pytorch_model.bin: re-save it with safetensors "
                             "(save_pretrained(..., safe_serialization=True))")
        self.path = p
        self.bytes_read = 0

    def _known(self, name: str) -> None:
        if name not in self.files:
            raise UsageError(f"{self.path} has no tensor {name}: is it the dense model the pruned dir was made from?")

    def get(self, name: str):
        from safetensors import safe_open

        self._known(name)
        with safe_open(str(self.files[name]), framework="pt") as h:
            return h.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        self._known(name)
        with safe_open(str(self.files[name]), framework="pt") as h:
            return tuple(h.get_slice(name).get_shape())

    def flat(self, name: str, start: int, stop: int) -> "torch.Tensor":  # noqa: F821
        """`read_flat` of one tensor, the bytes counted in `bytes_read`."""
        from safetensors import safe_open

        self._known(name)
        with safe_open(str(self.files[name]), framework="pt") as h:
            values, n = read_flat(h, name, start, stop)
        self.bytes_read += n
        return values

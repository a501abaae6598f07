"""Run NVIDIA/Megatron-LM's own tools/preprocess_data.py from a checkout, as its users do, on Python 3.11
and a CPU-only torch. Two shims, for this bench only, neither on the path a document takes:
- `typing.override` (Python 3.12) from typing_extensions: megatron/training imports it;
- modules that import triton at the top (GPU kernels for MoE and Mamba, imported by megatron.core's
  package __init__ chain, never called while tokenizing) are replaced by stubs that raise if called.
  `triton_modules(checkout)` lists them, outside the timed process; the list comes in MEGATRON_STUBS.

    PYTHONPATH=MEGATRON_LM MEGATRON_STUBS=a.b,c.d python bench/megatron_preprocess.py \
        MEGATRON_LM/tools/preprocess_data.py ARGS...
"""
import os
import re
import runpy
import sys
import types
import typing
from pathlib import Path

import typing_extensions


def _kernel(*args, **kwargs):
    raise RuntimeError("a triton kernel was called while preprocessing")


def _attr(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _kernel


def triton_modules(checkout: Path) -> list[str]:
    """The modules of a Megatron-LM checkout that import triton at their top."""
    return [".".join(f.relative_to(checkout).with_suffix("").parts) for f in sorted((checkout / "megatron").rglob("*.py"))
            if re.search(r"^(import|from) triton", f.read_text(errors="ignore"), re.M)]


def main() -> None:
    typing.override = getattr(typing, "override", typing_extensions.override)
    for name in filter(None, os.environ.get("MEGATRON_STUBS", "").split(",")):
        stub = types.ModuleType(name)
        stub.__getattr__ = _attr
        sys.modules[name] = stub
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()

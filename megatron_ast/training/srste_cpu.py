"""SR-STE's CPU step as one fused C loop (srste_cpu.c), built at first use with the system's C compiler.

ZeRO-Offload steps each rank's whole flat fp32 partition on the CPU. As chains of eager torch ops that step
moved every temporary through memory (7.3x DeepSpeed's fused CPU Adam, bench/offload_step.py); the C loop
reads and writes each element once, with OpenMP threads and the compiler's SIMD. It is built like
DeepSpeed builds its CPU Adam (a JIT op), but from plain C with no torch headers: well under a second,
once per machine and source version, into the cache (MEGATRON_AST_CACHE, default ~/.cache/megatron_ast),
portable (no -march=native: a cache on a shared home is used by every node). `CC` picks the compiler.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from megatron_ast.errors import UsageError

SOURCE = Path(__file__).with_name("srste_cpu.c")
FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=c99"]


def _cache_dir() -> Path:
    from megatron_ast.assets import cache_root

    return cache_root() / "kernels"


@functools.cache
def _lib() -> ctypes.CDLL:
    src = SOURCE.read_bytes()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    key = hashlib.sha256(src + " ".join(FLAGS).encode()).hexdigest()[:16]
    so = _cache_dir() / f"srste_cpu-{key}.so"
    if not so.is_file():
        if cc is None:
            raise UsageError("SR-STE's CPU step (ZeRO-Offload, CPU ranks) is built at first use with a C compiler, "
                             "and none was found: install gcc, or set CC")
        so.parent.mkdir(parents=True, exist_ok=True)
        tmp = so.with_name(f".{so.name}.tmp-{os.getpid()}")
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            first = (proc.stderr.strip().splitlines() or ["no output"])[0]
            raise UsageError(f"building SR-STE's CPU step with {cc} failed ({first}): it needs a C99 compiler "
                             "with OpenMP (gcc, clang with libomp); set CC to one")
        os.replace(tmp, so)  # two ranks building at once: each renames its own complete file
    lib = ctypes.CDLL(str(so))
    d, i64, i32, ptr = ctypes.c_double, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    for suffix in ("f32", "f64"):
        getattr(lib, f"srste_masked_{suffix}").argtypes = [ptr] * 5 + [i64] + [d] * 7 + [i32, i32]
        getattr(lib, f"srste_plain_{suffix}").argtypes = [ptr] * 4 + [i64] + [d] * 6 + [i32]
    return lib


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _check(*tensors: torch.Tensor) -> str:
    p = tensors[0]
    if p.dtype not in _SUFFIX:
        raise TypeError(f"SR-STE's CPU step takes float32 or float64 masters, got {p.dtype}")
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() != p.numel():
            raise ValueError("SR-STE's CPU step takes contiguous CPU tensors of one size")
    for t in tensors[1:4]:
        if t.dtype != p.dtype:
            raise TypeError(f"SR-STE's CPU step: {t.dtype} beside a {p.dtype} master")
    return _SUFFIX[p.dtype]


def step_masked(p, g, m, v, ind, b1, b2, lam, lr_wd, step_size, bc2, eps, v_of_update: bool) -> None:
    """In place: AST's update (sr_ste.py) of p, m, v; `ind` the int8 indicator (1 pruned, 0 kept, -1 not masked)."""
    suffix = _check(p, g, m, v, ind)
    if ind.dtype != torch.int8:
        raise TypeError(f"the pruned indicator must be int8, got {ind.dtype}")
    getattr(_lib(), f"srste_masked_{suffix}")(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), ind.data_ptr(),
                                              p.numel(), b1, b2, lam, lr_wd, step_size, bc2, eps, int(v_of_update),
                                              torch.get_num_threads())


def step_plain(p, g, m, v, b1, b2, lr_wd, step_size, bc2, eps) -> None:
    """In place: AdamW with the same roundings as `step_masked` on indicator -1."""
    suffix = _check(p, g, m, v)
    getattr(_lib(), f"srste_plain_{suffix}")(p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(),
                                             b1, b2, lr_wd, step_size, bc2, eps, torch.get_num_threads())

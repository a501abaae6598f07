"""What machine a benchmark ran on, recorded beside its figures."""
from __future__ import annotations

import os
import platform
import sys


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    except ImportError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "python": sys.version.split()[0],
            "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def peak_rss_of(fn_args, target) -> tuple[object, float, float]:
    """Run `target(*fn_args)` in a child process; sample RSS of it and its children.

    Returns (result, peak total RSS of the process tree in GiB, peak RSS of any one process in GiB).
    """
    import multiprocessing as mp
    import time

    import psutil

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, target, fn_args))
    p.start()
    peak_total = peak_one = 0.0
    proc = psutil.Process(p.pid)
    while p.is_alive():
        try:
            rss = [proc.memory_info().rss] + [c.memory_info().rss for c in proc.children(recursive=True)]
        except psutil.Error:
            rss = [0]
        peak_total, peak_one = max(peak_total, sum(rss)), max(peak_one, max(rss))
        if not q.empty():
            break
        time.sleep(0.05)
    result = q.get()
    p.join()
    if isinstance(result, BaseException):
        raise result
    return result, peak_total / 2**30, peak_one / 2**30


def _child(q, target, args):
    try:
        q.put(target(*args))
    except BaseException as e:  # report to the parent instead of hanging it
        q.put(e)

"""What machine a benchmark ran on, recorded beside its figures."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


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
    from importlib import metadata

    for package in ("torch", "deepspeed", "transformers", "tokenizers"):  # what the figures depend on
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def write_result(bench: str, name: str, result: dict) -> Path:
    """bench/results/<bench>-<name>.json: `result` with the machine it ran on and the date."""
    import json
    import time

    path = Path(__file__).resolve().parent / "results" / f"{bench}-{name}.json"
    path.write_text(json.dumps({**result, "machine": machine_info(), "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def _tree_rss(proc) -> list[int]:
    import psutil

    try:
        return [proc.memory_info().rss] + [c.memory_info().rss for c in proc.children(recursive=True)]
    except psutil.Error:
        return [0]


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
        rss = _tree_rss(proc)
        peak_total, peak_one = max(peak_total, sum(rss)), max(peak_one, max(rss))
        if not q.empty():
            break
        time.sleep(0.05)
    result = q.get()
    p.join()
    if isinstance(result, BaseException):
        raise result
    return result, peak_total / 2**30, peak_one / 2**30


def _anon(proc) -> int:
    """RssAnon of `proc` (bytes): its own memory, without the file pages it maps (safetensors, torch mmap loads),
    which the kernel can drop and which RSS counts too."""
    try:
        for line in open(f"/proc/{proc.pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_process(cmd: list[str], log: Path, env: dict | None = None, cwd: str | Path | None = None) -> dict:
    """Run `cmd` as a whole process (start-up included), its output to `log`; its wall seconds, the CPU seconds
    of its process tree (user + system), the peak RSS of the tree (sampled every 20 ms) and of its largest
    process, and the peak RssAnon of its largest process, in GiB. Raises on a non-zero exit."""
    import subprocess
    import time

    import psutil

    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        proc, peak_total, peak_one, peak_anon = psutil.Process(p.pid), 0, 0, 0
        while p.poll() is None:
            rss = _tree_rss(proc)
            peak_total, peak_one = max(peak_total, sum(rss)), max(peak_one, max(rss))
            try:
                peak_anon = max([peak_anon, _anon(proc), *(_anon(c) for c in proc.children(recursive=True))])
            except psutil.Error:
                pass
            time.sleep(0.02)
        seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the process and every child it waited for
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {p.returncode}: {Path(log).read_text()[-2000:]}")
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_gib_tree": peak_total / 2**30,
            "peak_rss_gib_max_process": peak_one / 2**30, "peak_anon_gib_max_process": peak_anon / 2**30}


def _child(q, target, args):
    try:
        q.put(target(*args))
    except BaseException as e:  # report to the parent instead of hanging it
        q.put(e)


class TensorBytes:
    """Live and peak bytes of every tensor storage made while active (forward and backward, autograd's saved
    tensors included): the allocator's view, measured in this process, for comparing two codes side by side.

        with TensorBytes() as mem:
            ...
        mem.peak  # bytes above what was live on entry
    """

    def __enter__(self) -> "TensorBytes":
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.live = self.peak = 0
        self._seen: set[int] = set()

        def free(key: int, nbytes: int) -> None:
            tracker._seen.discard(key)
            tracker.live -= nbytes

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if any(r.alias_info is not None for r in func._schema.returns):
                    return out  # a view or an in-place op: no new storage
                for t in tree_flatten(out)[0]:
                    if hasattr(t, "untyped_storage") and t.device.type != "meta":
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if key and key not in tracker._seen:
                            tracker._seen.add(key)
                            tracker.live += st.nbytes()
                            tracker.peak = max(tracker.peak, tracker.live)
                            weakref.finalize(st, free, key, st.nbytes())
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

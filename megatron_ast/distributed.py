"""The one way into torch.distributed: every tensor a collective sees lives on the backend's device.

NCCL takes CUDA tensors only, on this rank's GPU (cuda:LOCAL_RANK); gloo takes CPU tensors. A tensor
made on the CPU (a flag, a count) or living there (ZeRO-Offload's fp32 master) goes through these
helpers, which move it to the backend's device and the result back. No module of megatron_ast calls a
collective another way (tests/test_distributed.py checks the source).

Errors are collective too: a UsageError seen by one rank (a bad file only it reads) ends every rank
with the same one-line message and exit 2, within seconds, instead of leaving the others blocked in a
collective until `dist_timeout_s`. The failing rank publishes the message in the job's rendezvous
store (MASTER_ADDR:MASTER_PORT, which every launcher here sets up); every other rank watches for it
from a daemon thread, which works while the main thread is blocked inside NCCL or gloo.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from megatron_ast.errors import report


def local_rank() -> int:
    """This rank's index on its node (torchrun, the deepspeed launcher and DeepSpeed's MPI discovery set LOCAL_RANK)."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def device_for_backend(backend: str, local: int) -> torch.device:
    """Where `backend` wants the tensors of its collectives."""
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", local)
    from deepspeed.accelerator import get_accelerator  # ccl, hccl, ...: the accelerator's own device

    return torch.device(get_accelerator().device_name(local))


def backend_device() -> torch.device:
    return device_for_backend(dist.get_backend(), local_rank())


def _on_backend(t: torch.Tensor) -> torch.Tensor:
    dev = backend_device()
    return t if t.device == dev else t.to(dev)


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place, on whatever device `t` lives on."""
    work = _on_backend(t)
    dist.all_reduce(work, op=_OPS[op])
    if work is not t:
        t.copy_(work)
    return t


_HOST_GROUP: list = []


def host_group(timeout: timedelta | None = None):
    """A gloo group over the default group's ranks, for numbers that live on the host: a stop flag reduced every
    step through NCCL would copy to the GPU and back, a host sync per step. Megatron-LM makes such gloo groups
    too; like its, it needs TCP between the nodes' ranks (set GLOO_SOCKET_IFNAME to the interface when the
    hostname resolves to a loopback address). The trainer makes it right after the default group, with the
    run's `dist_timeout_s`; a first `all_reduced` elsewhere makes it with torch's default timeout."""
    if dist.get_backend() == "gloo":
        return None  # the default group already is
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.new_group(backend="gloo", timeout=timeout))
    return _HOST_GROUP[0]


def all_reduced(values: list[float], op: str = "sum") -> list[float]:
    """A few host numbers reduced over all ranks (float64, one gloo collective: no GPU sync)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=_OPS[op], group=host_group())
    return t.tolist()


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `t` (same shape on every rank), on `t`'s device."""
    work = _on_backend(t.contiguous())
    out = [torch.empty_like(work) for _ in range(dist.get_world_size())]
    dist.all_gather(out, work)
    return [o.to(t.device) for o in out]


def neighbour_exchange(head: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the previous rank's `tail`, the next rank's `head`; None at the ends), on `head`'s device: what a rank needs
    of its neighbours' partitions, point to point (an all-gather would send it to every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    h, t = _on_backend(head.contiguous()), _on_backend(tail.contiguous())
    prev_tail = torch.empty_like(t) if rank > 0 else None
    next_head = torch.empty_like(h) if rank < world - 1 else None
    ops = []
    if prev_tail is not None:
        ops += [dist.P2POp(dist.isend, h, rank - 1), dist.P2POp(dist.irecv, prev_tail, rank - 1)]
    if next_head is not None:
        ops += [dist.P2POp(dist.isend, t, rank + 1), dist.P2POp(dist.irecv, next_head, rank + 1)]
    for req in dist.batch_isend_irecv(ops) if ops else ():
        req.wait()
    return tuple(x.to(head.device) if x is not None else None for x in (prev_tail, next_head))


def all_gather_json(obj) -> list:
    """Every rank's JSON-serialisable `obj` (no pickles cross ranks)."""
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(backend_device())
    sizes = all_gather(torch.tensor([data.numel()], dtype=torch.int64, device=data.device))
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8, device=data.device)
    padded[: data.numel()] = data
    return [json.loads(bytes(p[: int(s.item())].cpu().tolist())) for p, s in zip(all_gather(padded), sizes)]


def cpu_threads_per_rank() -> int | None:
    """This rank's share of the cores it is bound to (collective), when the user set no OMP_NUM_THREADS (None then).

    srun and mpirun bind each rank to its own cores (--cpus-per-task=12: 12 each), torchrun and the deepspeed
    launcher leave every rank on all of the node's: the ranks of one host with the same affinity set split it.
    torch's default, every core in every rank, oversubscribes the second case (4 threads on 2 cores here)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    mine = sorted(os.sched_getaffinity(0))
    digest = hashlib.blake2b(json.dumps([socket.gethostname(), mine]).encode(), digest_size=7).digest()
    key = torch.tensor([int.from_bytes(digest, "little")], dtype=torch.int64)
    sharers = sum(int(k.item() == key.item()) for k in all_gather(key))
    return max(1, len(mine) // sharers)


def barrier() -> None:
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[local_rank()])
    else:
        dist.barrier()


# --- errors that end every rank ------------------------------------------------------------------------------
_STORE_TIMEOUT_S = 30


class _ErrorChannel:
    """A key in the rendezvous store: the first rank that sets it takes every other rank down with its message."""

    POLL_S = 0.5

    def __init__(self) -> None:
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=timedelta(seconds=_STORE_TIMEOUT_S), wait_for_workers=False)
        # keys of this process group only: torchrun's store outlives a restart, and its restart counts are per node
        run = int(all_reduced([float(random.getrandbits(52)) if dist.get_rank() == 0 else 0.0], "max")[0])
        self.key, self.acks = f"megatron_ast/{run}/error", f"megatron_ast/{run}/error_acks"
        self.published = False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="megatron-ast-errors", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopped.wait(self.POLL_S):
            try:
                if self.published or not self.store.check([self.key]):
                    continue
                msg = self.store.get(self.key).decode()
                self.store.add(self.acks, 1)
            except Exception:  # the store's host has gone (the job is ending): nothing left to watch
                return
            if not _ending.acquire(blocking=False):
                return  # this rank's own error is being reported: its main thread ends the rank
            report(msg)
            os._exit(2)

    def publish(self, msg: str, wait_s: float = 10.0) -> None:
        """Tell every other rank, and give them `wait_s` to read it before this rank (maybe the store's host) exits."""
        self.published = True
        try:
            self.store.set(self.key, msg)
            deadline = time.monotonic() + wait_s
            while self.store.add(self.acks, 0) < dist.get_world_size() - 1 and time.monotonic() < deadline:
                time.sleep(0.1)
        except Exception:
            pass  # the others then end through the launcher or the collective timeout


_channel: _ErrorChannel | None = None
# one line per rank: its main thread failing and its watcher relaying another rank's error take this first
_ending = threading.Lock()


def watch_errors() -> None:
    """Start watching for another rank's error (after init_distributed; a world of one needs none)."""
    global _channel
    if _channel is None and dist.get_world_size() > 1 and "MASTER_ADDR" in os.environ:
        _channel = _ErrorChannel()


def fail_every_rank(msg: str, cleanup: Callable[[], None] | None = None) -> None:
    """Print `msg` as the CLI's one-line error and end this rank and every other with exit 2. `cleanup` runs once
    the others have read the message and stopped (what they were writing, e.g. a checkpoint's files, then goes)."""
    _ending.acquire()  # held by the watcher if it is reporting another rank's error: it ends the rank then
    report(msg)
    sys.stdout.flush()
    # a launcher that ends the job once another rank has exited (torchrun: SIGTERM) still sees exit 2 here
    signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
    if _channel is not None:
        _channel.publish(msg)
    if cleanup is not None:
        time.sleep(_ErrorChannel.POLL_S)  # a rank that acknowledged is exiting; let its last write land first
        cleanup()
    os._exit(2)


def stop_watching() -> None:
    """Before a normal teardown: the store's host may leave first. Waits for the watcher to leave the store's C++
    code: a daemon thread still inside it when the interpreter finalizes is ended by pthread_exit, which unwinds
    through a noexcept frame and aborts the process ("terminate called without an active exception", exit -6)."""
    global _channel
    if _channel is not None:
        _channel.stopped.set()
        _channel.thread.join(timeout=_STORE_TIMEOUT_S + 5)  # a store call returns or fails within its timeout
        _channel = None

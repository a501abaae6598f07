"""megatron_ast/distributed.py: one way into torch.distributed; CPU threads from each rank's own cores."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ast.distributed import device_for_backend
from tests.training.conftest import REPO, free_port

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "barrier", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
               "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "monitored_barrier"}


def _direct_collectives(path: Path) -> list[str]:
    """Calls like dist.all_reduce(...) / torch.distributed.barrier(...) in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed", "deepspeed.comm", "comm"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {owner}.{node.func.attr}")
    return found


def test_every_collective_in_the_package_goes_through_the_helper():
    """NCCL takes tensors on cuda:LOCAL_RANK only: a flag built on the CPU and handed to dist.all_reduce runs under
    gloo here and crashes the first GPU job. Only megatron_ast/distributed.py may call torch.distributed's collectives."""
    helper = REPO / "megatron_ast" / "distributed.py"
    files = [p for p in sorted((REPO / "megatron_ast").rglob("*.py")) if p != helper]
    assert len(files) > 40
    assert [c for p in files for c in _direct_collectives(p)] == []
    assert _direct_collectives(helper)  # the scan does see calls (the helper's own)


def test_each_backend_gets_tensors_on_its_device():
    assert device_for_backend("gloo", 3) == torch.device("cpu")
    assert device_for_backend("nccl", 3) == torch.device("cuda", 3)


def _threads(cores: str, ranks: int, **env) -> list[dict]:
    """Each rank's threads, `ranks` processes started by hand (torchrun would set OMP_NUM_THREADS=1 for them)."""
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    base.update(env, WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "threads_worker.py"), cores], env={**base, "RANK": str(r)},
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-2000:]
        out += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return sorted(out, key=lambda r: r["rank"])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_a_rank_bound_to_its_own_cores_uses_all_of_them():
    """srun --ntasks-per-node=8 --cpus-per-task=2: each task is bound to its own cores (here: all of this machine's),
    so it takes them all; dividing by the 8 local tasks gave it a quarter (2 cores: 1)."""
    (r,) = _threads("all", 1, SLURM_NTASKS_PER_NODE="8", SLURM_LOCALID="0", LOCAL_WORLD_SIZE="8")
    assert r["cores"] == len(os.sched_getaffinity(0)) >= 2 and r["threads"] == r["cores"]
    (r,) = _threads("0", 1, SLURM_NTASKS_PER_NODE="8")
    assert r["cores"] == 1 and r["threads"] == 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_ranks_sharing_their_cores_split_them():
    """torchrun and the deepspeed launcher leave every rank on all the node's cores: two ranks split them (2 cores:
    1 each), found by comparing the ranks' affinity sets, not by trusting the launcher's local size."""
    half = len(os.sched_getaffinity(0)) // 2
    assert [r["threads"] for r in _threads("all", 2, LOCAL_WORLD_SIZE="2")] == [half, half]
    assert [r["threads"] for r in _threads("all", 2)] == [half, half]  # whatever the launcher says of the node


_WATCHER = """
import os, torch.distributed as dist
from megatron_ast import distributed
dist.init_process_group("gloo", rank=0, world_size=1)
distributed._channel = channel = distributed._ErrorChannel()
assert channel.thread.is_alive()
distributed.stop_watching()
print(channel.thread.is_alive())
dist.destroy_process_group()
"""


def test_stopping_the_error_watcher_waits_for_its_thread():
    """A watcher still inside a store call when the interpreter finalizes aborts the rank at exit (CI saw a clean
    2-rank run end with SIGABRT): stop_watching returns only once the thread is gone."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _WATCHER], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"

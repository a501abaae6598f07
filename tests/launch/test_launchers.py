"""Launchers: --dry-run, the deepspeed launcher with a localhost hostfile, mpirun (MPICH), a dead rank."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_ast.cli import main
from tests.training.conftest import REPO, TRAIN_ENV, config_file, free_port

LAUNCH = REPO / "launch"
BIN = Path(sys.executable).parent


def _cfg(run_dir, out: str, **over):
    cfg = {"output_dir": str(run_dir / out), "steps": 3, "mask_interval": 2, "eval": {"every": 0, "windows": 2},
           "slorb": None, "activation_checkpointing": False}
    return config_file(run_dir, **{**cfg, **over})


def _env(**extra) -> dict:
    return {**TRAIN_ENV, "PATH": f"{BIN}:{os.environ['PATH']}", "MASTER_PORT": str(free_port()), **extra}


def test_dry_run_prints_the_world_batch_and_memory_without_starting(run_dir, capsys, monkeypatch):
    cfg = _cfg(run_dir, "dry")
    assert main(["train", "--config", str(cfg), "--dry-run", "--world-size", "8", "--nodes", "2"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["world"] == {"launcher": "--world-size", "world_size": 8, "rank": 0, "per_node": 4, "nodes": 2}
    assert p["batch"]["global_batch"] == 2 * 2 * 8 and p["batch"]["tokens_per_step"] == 32 * 64
    assert p["model"]["masked_params"] == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    mem = p["memory_gib_per_rank"]
    assert mem["teacher_params"] > 0 and mem["masks_current_and_initial"] > 0 and mem["srste_indicator_int8"] > 0
    assert mem["gpu_total"] == pytest.approx(sum(v for k, v in mem.items() if not k.endswith("_total")), rel=1e-3)
    assert mem["activations"] > 0 and mem["logits_and_loss"] > 0 and mem["teacher_forward"] > 0
    # 0.7M parameters fit any GPU: auto holds a replica (the whole teacher, more than a partition), no all-gather
    assert p["teacher"]["held_as"] == "replica" and p["teacher"]["all_gather_gib_per_step"] == 0 and p["fits"] == "yes"
    assert main(["train", "--config", str(cfg), "--dry-run", "--world-size", "8", "--gpu-gib", "0"]) == 0
    cpu = json.loads(capsys.readouterr().out)
    assert cpu["teacher"]["held_as"] == "zero3" and cpu["memory_gib_per_rank"]["teacher_params"] < mem["teacher_params"]
    assert not (run_dir / "dry").exists()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "6")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "3")
    assert main(["train", "--config", str(cfg), "--dry-run"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["world"]["launcher"] == "openmpi" and p["world"]["nodes"] == 2 and p["batch"]["global_batch"] == 24


@pytest.mark.slow
def test_deepspeed_launcher_with_a_localhost_hostfile(run_dir, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    proc = subprocess.run([str(LAUNCH / "train_deepspeed.sh"), str(_cfg(run_dir, "ds_launcher"))], cwd=REPO,
                          env=_env(HOSTFILE=str(hostfile), NODE_RANK="0", MASTER_ADDR="127.0.0.1"), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "ds_launcher" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3


def _mpirun_path(impl: str) -> str:
    """PATH whose first mpirun is MPICH's (the `mpich` wheel in this venv) or Open MPI's (Debian's openmpi-bin)."""
    if impl == "mpich":
        if shutil.which("mpirun", path=str(BIN)) is None:
            pytest.skip("no MPICH mpirun in this venv: pip install mpich (part of the dev extra)")
        return f"{BIN}:{os.environ['PATH']}"
    found = shutil.which("mpirun", path="/usr/bin")
    if found is None or "Open MPI" not in subprocess.run([found, "--version"], capture_output=True, text=True).stdout:
        pytest.skip("Open MPI is not installed: apt-get install openmpi-bin libopenmpi-dev (.ci/run does, as root)")
    return f"/usr/bin:{BIN}:{os.environ['PATH']}"


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize("impl", ["mpich", "openmpi"])
def test_mpirun_two_ranks_discovered_through_mpi4py(run_dir, impl):
    out = run_dir / f"mpirun_{impl}"
    proc = subprocess.run([str(LAUNCH / "train_mpirun.sh"), str(_cfg(run_dir, out.name))], cwd=REPO,
                          env=_env(NP="2", PATH=_mpirun_path(impl)), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dead", "hung"])
def test_a_dead_or_hung_rank_fails_the_whole_job_in_bounded_time(run_dir, tmp_path, sig):
    """SIGKILL: the peers' collectives fail at once; SIGSTOP: they time out after dist_timeout_s."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = run_dir / f"rank_{sig.name}"
    cmd = [str(LAUNCH / "train_deepspeed.sh"), str(_cfg(run_dir, out.name, steps=10_000, dist_timeout_s=20))]
    env = _env(HOSTFILE=str(hostfile), NODE_RANK="0", MASTER_ADDR="127.0.0.1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not ((out / "log.jsonl").is_file() and len((out / "log.jsonl").read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    job = psutil.Process(proc.pid).children(recursive=True)
    ranks = [p for p in job if "--local_rank=1" in " ".join(p.cmdline())]
    assert len(ranks) == 1
    t0 = time.time()
    ranks[0].send_signal(sig)
    try:
        code = proc.wait(timeout=120)
    finally:
        _, alive = psutil.wait_procs(job, timeout=30)
        for p in alive:
            p.kill()
    assert code != 0 and time.time() - t0 < 120  # the launcher notices and fails the job
    assert not alive  # and no rank is left hanging


def test_train_without_a_launcher_is_one_process_and_world_size_needs_dry_run(run_dir, capsys):
    """A newcomer's first try: no launcher. It trains as world size 1 (DeepSpeed's MPI discovery wanted mpi4py
    and crashed); --world-size without --dry-run is refused in one line instead of being ignored."""
    env = {k: v for k, v in TRAIN_ENV.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    cfg = _cfg(run_dir, "plain", steps=1)
    proc = subprocess.run([sys.executable, "-m", "megatron_ast.cli", "train", "--config", str(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no launcher: one process" in proc.stderr
    assert json.loads((run_dir / "plain" / "summary.json").read_text())["world_size"] == 1
    assert main(["train", "--config", str(cfg), "--world-size", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--world-size and --nodes plan another world with --dry-run" in err[0]
    # a fresh start into the finished run's dir is refused (it appended to its log and moved `latest` before)
    log = (run_dir / "plain" / "log.jsonl").read_text()
    again = subprocess.run([sys.executable, "-m", "megatron_ast.cli", "train", "--config", str(cfg)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "holds another run (checkpoints step1): pass --resume auto" in again.stderr
    assert (run_dir / "plain" / "log.jsonl").read_text() == log

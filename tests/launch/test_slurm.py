"""launch/train_slurm.sbatch's control flow, with stub `srun` and `scontrol` on PATH: Slurm's SIGUSR1 must lead
to a save (the ranks exit 128+10), then a requeue; a finished run is not requeued, a crash is not either."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.training.conftest import REPO

SRUN = """#!/usr/bin/env bash
# stands in for srun and the ranks it starts: on SIGUSR1 "save" and exit 128+10, as the trainer does
trap 'echo saved >> "$STUB_LOG"; exit 138' USR1  # before it says it started: the test signals on that line
echo "master $MASTER_ADDR" >> "$STUB_LOG"
echo "srun $*" >> "$STUB_LOG"
case "$STUB_MODE" in
  finish) sleep 0.5; echo finished >> "$STUB_LOG"; exit 0 ;;
  crash) sleep 0.5; exit 1 ;;
esac
while true; do sleep 0.05; done
"""
SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) for i in $(seq -w 1 20000); do echo "node$i"; done ;;  # a big allocation: more than a pipe holds
  requeue) echo "requeue $2" >> "$STUB_LOG" ;;
esac
"""


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_MODE": mode,
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-02]"}
    proc = subprocess.Popen(["bash", str(REPO / "launch" / "train_slurm.sbatch"), "run.yaml"], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while "srun" not in log.read_text():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    return proc, log


def test_usr1_leads_to_a_save_then_a_requeue(tmp_path):
    proc, log = _start(tmp_path, "run")
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@LEAD sends to the batch shell
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    text = log.read_text()
    assert text.startswith("master node00001\nsrun --kill-on-bad-exit=1 bash -c") and "megatron-ast train --config" in text
    assert "--resume auto" in text and text.splitlines()[-3].endswith("run.yaml")
    assert text.splitlines()[-2:] == ["saved", "requeue 4242"]
    assert "requeueing job 4242" in proc.stderr.read()


@pytest.mark.parametrize("mode,code", [("finish", 0), ("crash", 1)])
def test_no_signal_no_requeue(tmp_path, mode, code):
    proc, log = _start(tmp_path, mode)
    assert proc.wait(timeout=30) == code
    assert "requeue" not in log.read_text()


def test_the_master_address_is_the_first_node(tmp_path):
    """`scontrol show hostnames | head -n 1` under pipefail: scontrol dies of SIGPIPE and the script with it."""
    proc, log = _start(tmp_path, "finish")
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert log.read_text().startswith("master node00001\n")


def test_the_lead_time_given_to_the_trainer_is_the_signals():
    text = (REPO / "launch" / "train_slurm.sbatch").read_text()
    lead = int(text.split("#SBATCH --signal=B:USR1@")[1].split()[0])
    assert f"SIGNAL_LEAD_S=${{SIGNAL_LEAD_S:-{lead}}}" in text

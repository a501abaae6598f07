"""Checkpoints: exact resume after SIGKILL, SIGTERM saves and stops, corrupt/incomplete ones skipped. 2 ranks, CPU."""
import json
import random
import signal
import subprocess
import time

import psutil
import pytest
import torch

from tests.training.conftest import REPO, TRAIN_ENV, ckpt_masks, config_file, consolidated, train, train_cmd

STEPS = 8


def _cfg(run_dir, out: str, **over):
    cfg = {"output_dir": str(run_dir / out), "steps": STEPS, "mask_interval": 2, "checkpoint": {"every": 2, "keep": 3},
           "eval": {"every": 0, "windows": 2}, "srste": {"lam": 2e-4, "t_inc": 4}}
    return config_file(run_dir, **{**cfg, **over})


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _steps_logged(out) -> int:
    try:
        return len((out / "log.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _interrupt(run_dir, out: str, sig: int, at_step: int, **over) -> tuple[int, str]:
    """Start a run, send `sig` to its whole process group once `at_step` steps are logged; (exit code, stderr)."""
    err = run_dir / f"{out}.stderr"
    with open(err, "w") as f:
        proc = subprocess.Popen(train_cmd(_cfg(run_dir, out, **over)), env=TRAIN_ENV, cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=f)
        deadline = time.time() + 600
        while _steps_logged(run_dir / out) < at_step and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the signal"
        # every process of the job, as a dying node or Slurm would (torchrun's workers have their own sessions)
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in procs:
            p.send_signal(sig)
        proc.wait(timeout=300)
        psutil.wait_procs(procs, timeout=300)
    return proc.returncode, err.read_text()


@pytest.fixture(scope="module")
def reference(run_dir):
    """The uninterrupted run."""
    train(_cfg(run_dir, "ref"))
    return run_dir / "ref"


def _assert_same_run(ref, out) -> None:
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in _log(ref)]  # bit-identical losses, every step
    a = consolidated(ref / "checkpoints" / f"step{STEPS}")
    b = consolidated(out / "checkpoints" / f"step{STEPS}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_auto_is_bit_identical(run_dir, reference):
    kill_then_resume(run_dir, reference, "killed")


def kill_then_resume(run_dir, reference, name: str, **over) -> None:
    """SIGKILL every process of a run at a random step, `--resume auto`: the same run as `reference`, bit for bit."""
    # at >= 3: once step 3 is logged the step-2 save has completed (rank 0 writes complete.json before
    # the next step); the save of the step it was killed at may or may not have
    at = random.Random().randint(3, STEPS - 1)
    print(f"killing at step {at}")
    _interrupt(run_dir, name, signal.SIGKILL, at, **over)
    out = run_dir / name
    assert not (out / "summary.json").exists()
    proc = train(_cfg(run_dir, name, **over), "--resume", "auto")
    resumed = json.loads((out / "summary.json").read_text())["resumed_at_step"]
    assert resumed % 2 == 0 and 2 <= resumed and abs(resumed - at) <= 2 and f"resumed from {out / 'checkpoints'}/step{resumed}" in proc.stderr
    _assert_same_run(reference, out)
    complete = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "complete.json").is_file())
    assert complete == ["step4", "step6", "step8"]  # keep: 3
    assert (out / "checkpoints" / "latest").read_text() == "step8"


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_exits_128_plus_15(run_dir, reference):
    code, stderr = _interrupt(run_dir, "termed", signal.SIGTERM, 3)
    out = run_dir / "termed"
    assert code != 0 and not (out / "summary.json").exists()
    latest = (out / "checkpoints" / "latest").read_text()
    step = json.loads((out / "checkpoints" / latest / "complete.json").read_text())["step"]
    assert f"SIGTERM: saved {out / 'checkpoints' / latest} at step {step}" in stderr
    assert step == len(_log(out)) >= 3  # saved at the step it stopped after, not at the last periodic one
    train(_cfg(run_dir, "termed"), "--resume", "auto")
    assert json.loads((out / "summary.json").read_text())["resumed_at_step"] == step
    _assert_same_run(reference, out)


@pytest.mark.slow
def test_corrupt_and_incomplete_checkpoints_are_named_and_skipped(run_dir, reference):
    import shutil

    out = run_dir / "corrupt"
    shutil.copytree(reference, out)
    ckpts = out / "checkpoints"
    (ckpts / "step8" / "summary.json").unlink(missing_ok=True)
    victim = ckpts / "step8" / "rank1.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    victim.write_bytes(bytes(data))
    (ckpts / "step9").mkdir()  # a save that died before complete.json
    (out / "summary.json").unlink()
    proc = train(_cfg(run_dir, "corrupt"), "--resume", "auto")
    assert f"{victim}: sha256 differs from the manifest (corrupt): skipping step8" in proc.stderr
    assert "step9 has no complete.json" in proc.stderr
    assert f"resumed from {ckpts / 'step6'} at step 6" in proc.stderr
    _assert_same_run(reference, out)


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3)])
def test_elastic_resume_on_another_world_size_keeps_masks_and_sampler_position(run_dir, before, after):
    # a collective timeout (3 s) shorter than rank 0's conversion (~4 s here): the other ranks must not wait in one
    elastic_resume(run_dir, f"elastic{before}to{after}", before, after, resume_over={"dist_timeout_s": 3})


def elastic_resume(run_dir, name: str, before: int, after: int, resume_over: dict | None = None, **over) -> None:
    """4 steps on `before` ranks, a 5th on `after`: the masks, the sampler position and the log carry over."""
    out = run_dir / name
    train(_cfg(run_dir, name, steps=4, **over), ranks=before)
    proc = train(_cfg(run_dir, name, steps=5, **over, **(resume_over or {})), "--resume", "auto", ranks=after)
    assert f"converting {out / 'checkpoints' / 'step4'} to a universal checkpoint" in proc.stderr
    assert json.loads((out / "summary.json").read_text())["resumed_at_step"] == 4
    a, b = consolidated(out / "checkpoints" / "step4"), consolidated(out / "checkpoints" / "step5")
    ma, mb = ckpt_masks(out / "checkpoints" / "step4"), ckpt_masks(out / "checkpoints" / "step5")
    assert len(ma) == 14 and ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)  # step 5 recomputes none
    assert all(not torch.equal(a[k], b[k]) for k in a if k.endswith("proj.weight"))  # it trained
    s4 = json.loads((out / "checkpoints" / "step4" / "trainer_state.json").read_text())["sampler"]["sample"]
    s5 = json.loads((out / "checkpoints" / "step5" / "trainer_state.json").read_text())["sampler"]["sample"]
    assert s4 == 4 * 2 * 2 * before and s5 == s4 + 2 * 2 * after  # the next unseen samples: none skipped or repeated
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and log[4]["tokens"] == log[3]["tokens"] + 2 * 2 * after * 64


def _copy_checkpoint(reference, run_dir, name: str, tag: str = "step8"):
    import shutil

    out = run_dir / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(reference / "checkpoints" / tag, out / "checkpoints" / tag)
    return out, out / "checkpoints" / tag


@pytest.mark.slow
def test_a_bad_file_only_rank_1_reads_ends_every_rank_with_its_message(run_dir, reference):
    """--resume DIR: each rank verifies its share of the files. A corrupt file in rank 1's share used to end rank 1
    and leave rank 0 waiting in a collective for dist_timeout_s (600 s); now both end with exit 2, the same line."""
    out, tag = _copy_checkpoint(reference, run_dir, "bad_share")
    names = sorted(json.loads((tag / "complete.json").read_text())["files"])
    victim = tag / names[1]  # file i is checked by rank i % world
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    t0 = time.time()
    proc = subprocess.run(train_cmd(_cfg(run_dir, "bad_share"), "--resume", str(tag)), capture_output=True, text=True,
                          timeout=300, env=TRAIN_ENV, cwd=REPO)
    elapsed = time.time() - t0
    line = f"megatron-ast: error: {victim}: sha256 differs from the manifest (corrupt): resume from another checkpoint ("
    own = [x for x in proc.stderr.splitlines() if x.startswith(line)]  # the ranks' lines, not torchrun's copies
    assert proc.returncode != 0 and len(own) == 2, proc.stderr[-3000:]  # rank 1's and rank 0's
    assert proc.stderr.count("exitcode  : 2") == 2  # torchrun's report: both ranks exited 2, and it names the line
    assert proc.stderr.count(f"traceback : {line}") == 2, proc.stderr[-3000:]
    assert proc.stderr.count(line) == 4  # nowhere else (a traceback quoting it, say)
    assert elapsed < 120  # the collective timeout is 600 s


class _RunsCode:
    """What a tampered checkpoint can hold: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _tamper(tag, marker) -> None:
    """Add a code-running object to rank 0's model states and fix the manifest, as whoever can write the files can."""
    import hashlib

    victim = tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    state = torch.load(victim, weights_only=False)  # our own file, just written by the reference run
    state["extra"] = _RunsCode(marker)
    torch.save(state, victim)
    manifest = json.loads((tag / "complete.json").read_text())
    manifest["files"][victim.name] = [victim.stat().st_size, hashlib.sha256(victim.read_bytes()).hexdigest()]
    (tag / "complete.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_a_checkpoint_holding_other_pickles_is_refused_unless_trusted(run_dir, reference, tmp_path, capsys):
    from megatron_ast.cli import main

    out, tag = _copy_checkpoint(reference, run_dir, "tampered")
    marker = tmp_path / "code-ran"
    _tamper(tag, marker)
    refusal = f"{tag / 'zero_pp_rank_0_mp_rank_00_model_states.pt'} holds a pickle of posix.system, which DeepSpeed"
    assert main(["export", str(tag), "--out", str(tmp_path / "hf")]) == 2
    assert refusal in capsys.readouterr().err and not marker.exists() and not (tmp_path / "hf").exists()
    proc = subprocess.run(train_cmd(_cfg(run_dir, "tampered"), "--resume", str(tag)), capture_output=True, text=True,
                          timeout=300, env=TRAIN_ENV, cwd=REPO)
    own = [x for x in proc.stderr.splitlines() if x.startswith(f"megatron-ast: error: {refusal}")]
    assert proc.returncode != 0 and len(own) == 2, proc.stderr[-3000:]
    assert proc.stderr.count(f"traceback : megatron-ast: error: {refusal}") == 2 and proc.stderr.count(refusal) == 4
    assert not marker.exists()
    # the user's call: trusted, it loads (and runs what it holds)
    assert main(["export", str(tag), "--out", str(tmp_path / "hf"), "--trust-checkpoint"]) == 0
    assert marker.exists() and (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_zero_offload_runs_ast_as_without_it(run_dir, reference):
    """offload_optimizer to the CPU (ds_configs/zero3_offload.json's setting): the fp32 master, Adam's moments, the
    masks and their collectives on the CPU side, SR-STE's fused CPU step. Same run as without offload."""
    ds = json.loads((run_dir / "ds.json").read_text())
    ds["zero_optimization"] = {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    (run_dir / "ds_offload.json").write_text(json.dumps(ds))
    out = run_dir / "offload"
    train(_cfg(run_dir, "offload", deepspeed=str(run_dir / "ds_offload.json")))
    ref, got = _log(reference), _log(out)
    assert len(got) == STEPS and all(r["loss"] == pytest.approx(q["loss"], rel=1e-5) for r, q in zip(got, ref))
    assert [r.get("flip_rate_init") for r in got] == pytest.approx([r.get("flip_rate_init") for r in ref], abs=1e-3)
    a, b = ckpt_masks(reference / "checkpoints" / f"step{STEPS}"), ckpt_masks(out / "checkpoints" / f"step{STEPS}")
    assert len(a) == 14 and all((a[k] != b[k]).float().mean() < 1e-3 for k in a)


def _checkpoint_bytes(tag) -> int:
    return sum(size for size, _ in json.loads((tag / "complete.json").read_text())["files"].values())


def _train_on(run_dir, out, **over) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(_cfg(run_dir, "unused", output_dir=str(out), **over)), capture_output=True,
                          text=True, timeout=600, env=TRAIN_ENV, cwd=REPO)


@pytest.mark.slow
def test_a_full_disk_before_a_save_keeps_latest_and_names_the_bytes(run_dir, reference, small_disk):
    """Before: torch's `basic_ios::clear: iostream error` traceback and partial files of the failed save.
    Now rank 0 checks the free space against the last checkpoint's size first: one line, exit 2, step2 intact."""
    out = small_disk(int(_checkpoint_bytes(reference / "checkpoints" / f"step{STEPS}") * 1.6)) / "run"
    proc = _train_on(run_dir, out, steps=4)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("megatron-ast: error: "))
    size = _checkpoint_bytes(out / "checkpoints" / "step2")
    assert "no space to save checkpoint step4" in line and f"({size:,} bytes) (the size of step2)" in line, line
    assert "`latest` stays at step2" in line and "--resume auto" in line
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step2" and sorted(p.name for p in ckpts.glob("step*")) == ["step2"]


@pytest.mark.slow
def test_a_disk_that_fills_during_the_save_leaves_no_partial_files(run_dir, reference, small_disk):
    """The first save's estimate (12 bytes per trainable parameter) is a lower bound: a disk between it and the real
    size fills mid-save. Before: 314 MB of partial files, no message about space. Now they go, and one line says so."""
    from transformers import AutoModelForCausalLM

    summary = json.loads((reference / "summary.json").read_text())
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(run_dir / "dense").parameters())
    estimate, size = 12 * (params + summary["slorb_params"]), _checkpoint_bytes(reference / "checkpoints" / f"step{STEPS}")
    assert estimate < size
    out = small_disk((estimate + size) // 2) / "run"
    proc = _train_on(run_dir, out, steps=2)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("megatron-ast: error: "))
    assert "the disk filled while saving checkpoint step2 (its partial files are removed)" in line, line
    assert "There is no earlier checkpoint" in line
    assert not list((out / "checkpoints").glob("step*")) and not (out / "checkpoints" / "latest").exists()

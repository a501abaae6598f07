"""A wheel (not `pip install -e`) installed into a fresh venv outside the checkout: the configs and launchers ship
with it, and `init`, its dry run and the quickstart's first stages work from another directory."""
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.pruning.conftest import calib_file, model_dir, tiny  # noqa: F401
from tests.training.test_recipe import pruned  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.assets
def test_a_wheel_in_a_fresh_venv_ships_configs_and_launchers_and_runs_init_elsewhere(tmp_path, model_dir, pruned,  # noqa: F811
                                                                                     reference_assets):
    """Before: the wheel had no ds_configs/ or launch/, and quickstart looked for ds_configs/ next to the checkout."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, capture_output=True)
    wheel = next(dist.glob("megatron_ast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("ds_configs/zero3_bf16.json", "ds_configs/zero3_cpu.json", "launch/train_slurm.sbatch", "launch/run_ast.yaml"):
        assert f"megatron_ast/examples/{f}" in names, f
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout's on the path
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--ignore-installed", "-q",
                    str(wheel)], check=True, capture_output=True, env=env, cwd=tmp_path)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co. from this venv, after it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*cmd):
        proc = subprocess.run([str(venv / "bin" / cmd[0]), *cmd[1:]], capture_output=True, text=True, cwd=elsewhere,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    where = json.loads(run("python", "-c", "import json, megatron_ast, megatron_ast.quickstart as q; "
                                           "print(json.dumps([megatron_ast.__file__, str(q.CPU_DS_CONFIG)]))"
                           ).strip().splitlines()[-1])
    assert all(p.startswith(str(venv)) for p in where) and Path(where[1]).is_file(), where
    run("megatron-ast", "init", "--model", str(model_dir), "--pruned", str(pruned), "--out", "run", "--nodes", "8")
    assert os.access(elsewhere / "run" / "train_slurm.sbatch", os.X_OK)
    out = run("megatron-ast", "train", "--config", "run/run.yaml", "--dry-run", "--world-size", "64", "--nodes", "8")
    dry = json.loads(out[out.index("\n{") + 1:] if not out.startswith("{") else out)  # after DeepSpeed's log lines
    assert dry["batch"]["global_batch"] == 512
    # the main job's first stages from the wheel, in another directory: assets (the cache), shards, dense eval
    out = run("megatron-ast", "quickstart", "--out", "qs", "--stop-after", "eval_dense", "--max-windows", "2")
    assert "[3/11] eval_dense" in out and "stopped after eval_dense" in out
    report = json.loads((elsewhere / "qs" / "report.json").read_text())
    assert set(report["stages"]) == {"assets", "preprocess", "eval_dense"} and report["complete"] is False
    assert report["stages"]["eval_dense"]["perplexity"]["all"]["windows"] == 4

"""bench/sparse_speed.py: says so and exits 0 without a GPU; measures and records with one."""
import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "sparse_speed.py"


def test_sparse_speed_runs_on_this_machine(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tokens", "16", "--out", str(out)], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if not torch.cuda.is_available():
        assert "no CUDA GPU here" in proc.stdout and not out.exists()
        return
    result = json.loads(out.read_text())
    assert result["rows"] and all(r["max_rel_err"] < 0.05 for r in result["rows"] + result["forward"])

"""bench/gpu.sh: every GPU check in one command; without CUDA it says so and exits 0, measuring nothing."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this runs the whole ~9-minute bench")
def test_without_a_gpu_it_says_so_and_exits_0():
    results = sorted((REPO / "bench" / "results").iterdir())
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh")], capture_output=True, text=True, timeout=120,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "bench/gpu.sh: no CUDA GPU here: nothing measured (run it on a GPU machine)"
    assert sorted((REPO / "bench" / "results").iterdir()) == results
